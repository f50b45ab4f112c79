"""Whole MoE layer, forward and forward+backward: csrc_triton.FusedMoE against transformers' own block with
``experts_implementation`` "eager" and "grouped_mm", on the same block (FusedMoE.from_hf shares its weights).

    PYTHONPATH=. python bench/moe_layer.py --out bench/results/moe_layer.json

Prints a table (ms, TFLOP/s, peak memory, speed-up) and writes JSON with device, commit, date and shapes.
"""

import argparse
import json
import time

import torch
import triton

from bench.common import ceilings, environment, fmt_table, time_ms
from csrc_triton import FusedMoE
from csrc_triton.moe import SUPPORTED_BLOCKS

SHAPES = {
    # name: (family, hidden, experts, top_k, intermediate, shared intermediate)
    "olmoe-1b-7b": ("olmoe", 2048, 64, 8, 1024, 0),
    "qwen1.5-moe-a2.7b": ("qwen2", 2048, 60, 4, 1408, 5632),
}


def make_hf_block(family, hidden, experts, top_k, inter, shared):
    from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    if family == "olmoe":
        cfg = OlmoeConfig(hidden_size=hidden, intermediate_size=inter, num_experts=experts,
                          num_experts_per_tok=top_k, norm_topk_prob=False)
        block = OlmoeSparseMoeBlock(cfg)
    else:
        cfg = Qwen2MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                             num_experts_per_tok=top_k, norm_topk_prob=False, shared_expert_intermediate_size=shared)
        block = Qwen2MoeSparseMoeBlock(cfg)
    assert type(block).__name__ in SUPPORTED_BLOCKS
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block


def layer_flops(tokens, hidden, experts, top_k, inter, shared):
    """Forward FLOPs: router GEMM, routed SwiGLU experts (3 GEMMs per pair), shared expert (3 GEMMs per token)."""
    return 2 * tokens * hidden * (experts + 3 * top_k * inter + 3 * shared + (1 if shared else 0))


def bench_shape(name, tokens, dtype, warmup_ms, rep_ms):
    family, hidden, experts, top_k, inter, shared = SHAPES[name]
    block = make_hf_block(family, hidden, experts, top_k, inter, shared).cuda().to(dtype)
    fused = FusedMoE.from_hf(block)
    inputs = [torch.randn(1, tokens, hidden, device="cuda", dtype=dtype) for _ in range(3)]
    grad = torch.randn(1, tokens, hidden, device="cuda", dtype=dtype)
    flops = layer_flops(tokens, hidden, experts, top_k, inter, shared)

    def use(impl):
        block.experts.config._experts_implementation = impl if impl != "pcmoe" else "eager"
        return fused if impl == "pcmoe" else block

    # Correctness on this very input, against transformers' eager block (same bf16 logits, same routing).
    x = inputs[0].clone().requires_grad_()
    ref = use("eager")(x)
    ref.backward(grad)
    ref_grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    block.zero_grad(set_to_none=True)
    x.grad = None
    out = use("pcmoe")(x)
    out.backward(grad)
    ours = [x.grad] + [p.grad for p in block.parameters()]
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    check = {"out_rel_err": rel(out, ref), "max_grad_rel_err": max(rel(a, b) for a, b in zip(ours, ref_grads))}
    block.zero_grad(set_to_none=True)
    del x, out, ref, ours, ref_grads

    rows = []
    for impl in ("pcmoe", "grouped_mm", "eager"):
        module = use(impl)
        counter = iter(range(10**9))

        def forward():
            with torch.no_grad():
                module(inputs[next(counter) % len(inputs)])

        def forward_backward():
            x = inputs[next(counter) % len(inputs)].requires_grad_()
            module(x).backward(grad)
            x.requires_grad_(False)
            x.grad = None

        try:
            fwd = time_ms(forward, warmup_ms, rep_ms)
            fwd_bwd = time_ms(forward_backward, warmup_ms, rep_ms, grad_to_none=list(block.parameters()))
            torch.cuda.synchronize()
            block.zero_grad(set_to_none=True)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            forward_backward()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            block.zero_grad(set_to_none=True)
            # Host time to enqueue one forward+backward: if it nears fwd_bwd_ms, launches (not kernels) bound it.
            start = time.perf_counter()
            forward_backward()
            host_ms = (time.perf_counter() - start) * 1e3
            torch.cuda.synchronize()
            block.zero_grad(set_to_none=True)
            rows.append(dict(impl=impl, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, fwd_tflops=flops / fwd / 1e9,
                             fwd_bwd_tflops=3 * flops / fwd_bwd / 1e9, peak_bytes=peak, host_fwd_bwd_ms=host_ms))
        except Exception as e:  # a peer that cannot run is reported with its reason, never dropped
            rows.append(dict(impl=impl, error=f"{type(e).__name__}: {e}"[:300]))
    pcmoe = rows[0]
    for row in rows:
        if "error" not in row and "error" not in pcmoe:
            row["pcmoe_speedup_fwd"] = row["fwd_ms"] / pcmoe["fwd_ms"]
            row["pcmoe_speedup_fwd_bwd"] = row["fwd_bwd_ms"] / pcmoe["fwd_bwd_ms"]
    return dict(shape=name, family=family, tokens=tokens, hidden=hidden, experts=experts, top_k=top_k,
                intermediate=inter, shared_intermediate=shared, dtype=str(dtype), flops_fwd=flops,
                check=check, results=rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--warmup-ms", type=float, default=100)
    parser.add_argument("--rep-ms", type=float, default=500)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    report = dict(environment(), benchmark="moe_layer", ceilings=ceilings(), cases=[])
    for name in args.shapes:
        report["cases"].append(bench_shape(name, args.tokens, torch.bfloat16, args.warmup_ms, args.rep_ms))
        torch.cuda.empty_cache()
    from csrc_triton.experts import _wgrad_kernel

    report["wgrad_tuned_configs"] = {str(key): str(cfg) for key, cfg in _wgrad_kernel.cache.items()}
    print(fmt_table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    assert triton is not None and torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    main()
