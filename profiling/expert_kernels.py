"""Each kernel of the routed experts (csrc_triton.expert_mlp) timed alone at one shape, against a dense cuBLAS
GEMM of the same size, and each row-scheduled grouped GEMM under other tile configurations: where the
forward+backward's time goes, and which tiles a kernel wants at that shape.

    PYTHONPATH=. python profiling/expert_kernels.py --case sonicmoe-7b:24576 --case qwen3-30b-a3b:32768

Balanced random routing (as the suites' "balanced" cases), bf16, medians of do_bench.
"""

import argparse

import torch
import triton

from bench.common import ceilings, time_ms
from bench.shapes import PROFILED_CASES, SHAPES, add_case_option, make_hf_block, router_logits, topk_routing
from csrc_triton import _wgrad_hopper, plan_routing
from csrc_triton._grouped_gemm import Groups, TileConfig, grouped_gemm, wgrad, _wgrad_kernel
from csrc_triton._swiglu import swiglu_backward
from csrc_triton.permute import combine
from csrc_triton.routed_experts import gate_up

# (BM, BN, BK, warps, stages); the first is tile_config's. BN of the gate-up GEMM spans gate and up columns.
# The deeper BK=32 pipelines: the gate-up GEMM's and the down dgrad's gathered rows are pointer loads, which wanted
# more stages in flight in the wgrads (notes/experts.md, entry 12).
SWEEP = [TileConfig(128, 256, 64, 8, 3), TileConfig(128, 128, 64, 8, 3), TileConfig(128, 256, 32, 8, 4),
         TileConfig(256, 128, 64, 8, 3), TileConfig(128, 128, 64, 4, 4), TileConfig(128, 256, 32, 8, 5),
         TileConfig(128, 256, 32, 8, 6)]
WGRAD_SWEEP = [(128, 128, 32, 4, 5), (128, 256, 32, 8, 6), (128, 256, 32, 8, 7), (256, 128, 32, 8, 5),
               (256, 128, 32, 8, 7), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)]


def row(name, ms, flops=None, nbytes=None, note=""):
    rate = f"{flops / ms / 1e9:6.0f} TFLOP/s" if flops else f"{nbytes / ms / 1e6:6.0f} GB/s  "
    print(f"  {name:34s} {ms:8.3f} ms  {rate}  {note}", flush=True)


def case(shape_name, tokens, sweep):
    s = SHAPES[shape_name]
    torch.manual_seed(0)
    experts = make_hf_block(s, "cuda", torch.bfloat16).experts
    weights, ids = topk_routing(router_logits(tokens, s.experts, "balanced", torch.Generator().manual_seed(4)),
                                s.top_k, s.norm_topk_prob)
    ids, weights = ids.cuda(), weights.cuda().bfloat16()
    w_gate_up, w_down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    num_experts, hidden, inter = w_down.shape
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(x)
    plan = plan_routing(ids, num_experts, validate=False)
    slots = ids.numel()
    slot_weight = weights.reshape(-1)[plan.sorted_pair.long()].float()
    new = lambda *shape: torch.empty(*shape, device="cuda", dtype=torch.bfloat16)
    h, act, y, dh, dx_slot = new(slots, 2 * inter), new(slots, inter), new(slots, hidden), new(slots, 2 * inter), \
        new(slots, hidden)
    dw_down, dw_gate_up = torch.empty_like(w_down), torch.empty_like(w_gate_up)
    flops_gu, flops_down = 2 * slots * hidden * 2 * inter, 2 * slots * inter * hidden
    print(f"\n{shape_name} at {tokens} tokens: H={hidden} I={inter} E={num_experts} k={s.top_k}, {slots} slots; "
          f"f+b counted {3 * (flops_gu + flops_down) / 1e12:.2f} TFLOP")

    # (name, launch(groups, tma), FLOPs, the same GEMM dense [M, K] x [K, N])
    gemms = [
        ("gate-up fwd (gather, SwiGLU)", lambda g, tma: gate_up(x, g, w_gate_up, h, act, tma), flops_gu,
         (slots, hidden, 2 * inter)),
        ("down fwd", lambda g, tma: grouped_gemm(act, g, False, w_down, (w_down.stride(1), w_down.stride(2)), y,
                                                 hidden, inter, tma), flops_down, (slots, inter, hidden)),
        ("down dgrad (gather)", lambda g, tma: grouped_gemm(dout, g, True, w_down,
                                                            (w_down.stride(2), w_down.stride(1)), dh[:, inter:],
                                                            inter, hidden, tma), flops_down, (slots, hidden, inter)),
        ("up dgrad (K = 2I)", lambda g, tma: grouped_gemm(dh, g, False, w_gate_up,
                                                          (w_gate_up.stride(2), w_gate_up.stride(1)), dx_slot,
                                                          hidden, 2 * inter, tma), flops_gu,
         (slots, 2 * inter, hidden)),
    ]
    default = Groups.of(plan, torch.bfloat16)
    wgrads = [  # (name, launch(tma), FLOPs, (gathered, plain))
        ("wgrad W_down (gather A)", lambda tma: wgrad(dout, default.token, act, None, dw_down, default, tma),
         flops_down, (dout, act)),
        ("wgrad W_gate_up (gather B)", lambda tma: wgrad(dh, None, x, default.token, dw_gate_up, default, tma),
         flops_gu, (x, dh))]
    total = 0.0
    for name, launch, flops, (m, k, n) in gemms:
        ms = time_ms(lambda: launch(default, True))
        total += ms
        a, b = new(m, k).normal_(), new(k, n).normal_()
        row(name, ms, flops, note=f"(cuBLAS dense {m}x{k}x{n}: {flops / time_ms(lambda: a @ b) / 1e9:.0f} TFLOP/s)")
    for name, launch, flops, operands in wgrads:
        ms = time_ms(lambda: launch(True))
        total += ms
        row(name, ms, flops, note="warp-specialised (_wgrad_hopper.py)" if _wgrad_hopper.supports(*operands)
            else f"tuned: {_wgrad_kernel.best_config}")
    for name, launch, nbytes in [
        ("SwiGLU backward (+ w a)", lambda: swiglu_backward(dh[:, inter:], h[:, :inter], h[:, inter:], slot_weight,
                                                            dh[:, :inter], dh[:, inter:], act=act,
                                                            need_dscale=True), 2 * slots * inter * 2 * 4),
        ("combine fwd (weighted)", lambda: combine(y, plan.slot_of_pair, weights), 2 * (slots + tokens) * hidden),
        ("combine bwd (dx)", lambda: combine(dx_slot, plan.slot_of_pair), 2 * (slots + tokens) * hidden),
        ("plan_routing", lambda: plan_routing(ids, num_experts, validate=False), 4 * 4 * slots)]:
        ms = time_ms(launch)
        total += ms
        row(name, ms, nbytes=nbytes)
    print(f"  {'sum of the above':34s} {total:8.3f} ms  {3 * (flops_gu + flops_down) / total / 1e9:6.0f} TFLOP/s")

    if sweep:
        print("  tile sweep (BM, BN, BK, warps, stages[, pointer loads]): ms, TFLOP/s; the five fastest")
        for name, launch, flops, _ in gemms:
            results = []
            for tile in SWEEP:
                groups = Groups.of(plan, torch.bfloat16, tile)
                for tma in (True, False):
                    results.append((_time_or_none(name, tile, lambda: launch(groups, tma)), tile, tma))
            _print_fastest(name, results, flops)
        tuned = _wgrad_kernel.configs
        hopper = _wgrad_hopper.supports
        _wgrad_hopper.supports = lambda *operands: False  # the sweep tunes the Triton kernel
        for name, launch, flops, _ in wgrads:
            results = []
            for bm, bn, bk, warps, stages in WGRAD_SWEEP:
                # one config at a time: the autotuner then runs it without tuning
                _wgrad_kernel.configs = [triton.Config(dict(BM=bm, BN=bn, BK=bk), num_warps=warps, num_stages=stages,
                                                       pre_hook=tuned[0].pre_hook)]
                for tma in (True, False):
                    _wgrad_kernel.cache.clear()
                    results.append((_time_or_none(name, (bm, bn, bk, warps, stages), lambda: launch(tma)),
                                    TileConfig(bm, bn, bk, warps, stages), tma))
            _print_fastest(name, results, flops)
        _wgrad_kernel.configs = tuned
        _wgrad_kernel.cache.clear()
        _wgrad_hopper.supports = hopper


def _time_or_none(name, tile, launch):
    try:
        return time_ms(launch)
    except Exception as error:  # e.g. out of shared memory: recorded, not fatal
        print(f"    {name}: {tuple(tile)} failed: {str(error).splitlines()[0][:100]}")
        return None


def _print_fastest(name, results, flops):
    results = sorted((r for r in results if r[0] is not None), key=lambda r: r[0])
    print(f"    {name}: " + "; ".join(f"{tuple(t)}{'' if tma else ' ptr'} {ms:.3f} {flops / ms / 1e9:.0f}"
                                      for ms, t, tma in results[:5]), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_case_option(parser)
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}; ceilings: {ceilings()}")
    for shape, tokens in args.case or PROFILED_CASES:
        case(shape, tokens, not args.no_sweep)


if __name__ == "__main__":
    main()
