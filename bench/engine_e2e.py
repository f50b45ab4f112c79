"""End to end: the PC-MoE engine training a ~1.9B-parameter MoE (olmoe-1b-7b's layers, 4 of them) for a few
steps, per party: tokens/s, model FLOPs utilisation, peak GPU memory and what it holds, the bytes each party
sends per step and the share of step time the GPU waits on the wire.

    PYTHONPATH=. python bench/engine_e2e.py --out e2e.json                       # 1 party (centralized)
    PYTHONPATH=. torchrun --nproc-per-node 2 bench/engine_e2e.py --out e2e.json  # 2 parties, one GPU each
    PYTHONPATH=. torchrun --nproc-per-node 2 bench/engine_e2e.py --set train.device=cuda  # 2 parties, 1 GPU
    PYTHONPATH=. torchrun --nproc-per-node 4 bench/engine_e2e.py --set model.num_layers=16 \\
        --variants pair,token,token_host,token_host_fp8 --out DIR      # one model, each variant in turn

Parties that share a GPU (the third line, on a 1-GPU machine) exchange over gloo through host memory and
split the GPU's time: their per-party memory is what it would be on GPUs of their own, their speed is not.

``--variants`` (names of VARIANTS: wire and memory options) runs them one after the other on the same parties,
model and data, each for --steps steps, and writes each one's JSON as soon as it ends
(``scale_<gpu>_<n>p_<commit>_<variant>.json``, or the ``--out`` file with ``_<variant>`` added), so a run cut
short keeps what it measured; peak memory restarts with each variant.

Fields per party: ``mfu``: model FLOPs per token, 6 x active parameters (every backbone matrix but the
embedding, plus top_k of num_experts of the routed experts) + 6 x layers x seq_len x hidden for causal
attention scores, times the party's tokens/s, over the dense bf16 matmul rate measured in the same run.
``exposed_comm_share``: the time the GPU's compute stream stalled waiting for exchanges (CUDA events around
each wait, wire.ExchangeTimer) over the step time, in the timed steps; ``exchanges`` lists one timed step's
exchanges with their bytes, the compute queued while each was in flight (``window_s``) and the stall
(``exposed_s``): what bench/projection.py projects to slower links. ``host_blocked_share``: the time the host
waited on the GPU for each layer's split sizes, over the step time: the party a slow run waits for (its host the
slowest) waits least there, while a party whose GPU is the slowest waits as much as the rest.
``nccl_kernel_share`` (with --profiled):
NCCL kernels' GPU time over step time, which counts waiting for slower peers too. ``bytes_sent_per_step``:
every kind this party sent in one step. Memory: parameters, gradients (fp32, as large as the parameters;
none with train.optimizer_in_backward) and optimizer state from their sizes; activations and workspace
(autocast's bf16 weight copies included) are the measured ``peak_memory_bytes`` minus those.
"""

import argparse
import gc
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ceilings, environment  # noqa: E402
from bench.report import RESULTS, gpu_tag  # noqa: E402
from pcmoe_engine.config import load_config  # noqa: E402
from pcmoe_engine.optim import StepInBackward, build_optimizer  # noqa: E402
from pcmoe_engine.party import Party, party_device, process_group_backend  # noqa: E402
from pcmoe_engine.protocol import DistributedExperts  # noqa: E402
from pcmoe_engine.wire import ExchangeTimer  # noqa: E402

MODEL = ["model.preset=olmoe-1b-7b", "model.num_layers=4", "train.batch_size=8", "data.seq_len=1024"]
_MEMORY = ["train.activation_checkpointing=true", "train.optimizer_8bit=true", "train.optimizer_in_backward=true"]
# Issue 13's options, by name: the protocol before it (one row per (token, expert), foreach AdamW) and each step.
VARIANTS = {
    "pair": ["wire.dispatch=pair", "train.fused_optimizer=false"],  # the protocol and optimizer before issue 13
    "token": [],  # dispatch once per (token, host); fused AdamW
    "token_host": ["wire.combine=host"],
    "token_host_fp8": ["wire.combine=host", "wire.hidden_dtype=fp8", "wire.grad_dtype=fp8"],
    "token_fp8": ["wire.hidden_dtype=fp8", "wire.grad_dtype=fp8"],
    "ac": _MEMORY[:1],  # activation checkpointing that replays what crossed
    "ac_8bit": _MEMORY[:2],
    "ac_8bit_release": _MEMORY,
    "ac_8bit_release_host": [*_MEMORY, "wire.combine=host"],  # what crossed and is kept: one row per (token, host)
    "8bit_release": _MEMORY[1:],
}


def flops_per_token(m) -> float:
    attention = m.hidden_size * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
    shared = 3 * m.hidden_size * m.shared_intermediate_size
    routed = 3 * m.hidden_size * m.expert_intermediate_size * m.top_k
    active = m.num_layers * (attention + m.hidden_size * m.num_experts + shared + routed) + m.hidden_size * m.vocab_size
    return 6 * active


def party_result(summary: dict, steps: list[dict], timed: slice, nccl_share: float | None, cfg, ceiling,
                 exposed: list[float] = (), blocked: list[float] = ()) -> dict:
    """One party's numbers from its summary and step records (``exposed``: seconds the GPU stalled on exchanges
    per timed step; ``blocked``: seconds the host waited on the GPU for split sizes)."""
    timed_steps = steps[timed]
    seconds = sum(r["step_time_s"] for r in timed_steps)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    tokens_per_s = tokens_per_step * len(timed_steps) / seconds
    m = cfg.model
    model_flops = flops_per_token(m) + 6 * m.num_layers * cfg.data.seq_len * m.hidden_size
    mem = summary["memory"]
    params = mem["backbone_params_bytes"] + mem["expert_params_bytes"]
    split = dict(backbone_params=mem["backbone_params_bytes"], local_expert_params=mem["expert_params_bytes"],
                 gradients=0 if cfg.train.optimizer_in_backward else params,
                 optimizer_state=mem["optimizer_state_bytes"])
    split["activations_and_workspace"] = summary["peak_memory_bytes"] - sum(split.values())
    sent = [r["bytes_sent"] for r in steps]
    return dict(party=summary["party"], tokens_per_s=tokens_per_s, step_ms=seconds / len(timed_steps) * 1e3,
                step_times_ms=[r["step_time_s"] * 1e3 for r in steps],
                mfu=tokens_per_s * model_flops / (ceiling["bf16_matmul_tflops"] * 1e12),
                model_flops_per_token=model_flops, peak_memory_bytes=summary["peak_memory_bytes"],
                memory=split, memory_share={k: v / summary["peak_memory_bytes"] for k, v in split.items()},
                exposed_comm_share=sum(exposed) / seconds if exposed else 0.0,
                host_blocked_share=sum(blocked) / seconds if blocked else 0.0,
                nccl_kernel_share=nccl_share, comm_share=nccl_share,  # comm_share: the README table's older name
                bytes_sent_per_step=sent[-1] - sent[-2] if len(sent) > 1 else sent[-1],
                parameters=summary["parameters"], bytes_sent=summary["bytes_sent"],
                final_loss=summary["final_loss"], losses=[r["loss"] for r in steps])


def use_variant(party: Party, cfg) -> None:
    """Run ``party`` with ``cfg``'s wire and memory options from its next step on (same weights and data)."""
    t, before = cfg.train, party.cfg.train
    party.cfg = cfg
    party.experts = DistributedExperts(party.shard, party.wire, cfg.wire)
    optimizer_options = ("fused_optimizer", "optimizer_8bit", "optimizer_in_backward")
    if any(getattr(t, name) != getattr(before, name) for name in optimizer_options):
        if isinstance(party.optimizer, StepInBackward):
            party.optimizer.close()
        party.optimizer = None  # its state goes before the next one's comes
        gc.collect()
        party.optimizer = build_optimizer(cfg, (party.backbone, party.shard), party.device)
    if party.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run(party: Party, cfg, args, ceiling, world: int, nccl: bool) -> dict:
    """--steps steps of ``party`` as configured; this party's result."""
    first_timed, first_profiled = args.warmup, args.steps - args.profiled
    prof = profile(activities=[ProfilerActivity.CUDA]) if nccl and args.profiled else None
    steps, exposed, blocked, exchanges = [], [], [], []
    for i in range(args.steps):
        party.wire.timer = ExchangeTimer(party.device) if first_timed <= i < first_profiled else None
        if prof is not None and i == first_profiled:
            prof.start()
        steps.append(party.step())
        if party.wire.timer is not None:
            exchanges = party.wire.timer.collect()
            exposed.append(sum(e["exposed_s"] for e in exchanges))
            blocked.append(party.wire.timer.host_blocked_s)
    party.wire.timer = None
    nccl_share = 0.0 if world == 1 else None
    if prof is not None:
        prof.stop()
        nccl_us = sum(e.device_time for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA and "nccl" in e.name.lower())
        nccl_share = nccl_us / 1e6 / sum(r["step_time_s"] for r in steps[first_profiled:])
    result = party_result(party.summary(), steps, slice(first_timed, first_profiled), nccl_share, cfg,
                          ceiling or {"bf16_matmul_tflops": float("nan")}, exposed, blocked)
    return dict(result, exchanges=exchanges)


def write(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for r in report["per_party"]:
        print(f"{report.get('variant') or 'party'} {r['party']}/{report['parties']}: "
              f"{r['tokens_per_s']:,.0f} tokens/s, step {r['step_ms']:.1f} ms, MFU {r['mfu']:.1%}, "
              f"peak {r['peak_memory_bytes'] / 2**30:.1f} GiB "
              f"({', '.join(f'{k} {v:.0%}' for k, v in r['memory_share'].items())}), exposed comm "
              f"{r['exposed_comm_share']:.1%}, host blocked {r['host_blocked_share']:.1%}, "
              f"sent {r['bytes_sent_per_step'] / 2**30:.2f} GiB/step", flush=True)
    print(f"total parameters {report['total_parameters'] / 1e9:.2f} B; results: {out}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the throughput")
    parser.add_argument("--profiled", type=int, default=2, help="last steps, under torch.profiler for NCCL time")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--variants", default="", help=f"comma-separated, among {', '.join(VARIANTS)}")
    parser.add_argument("--out", default=None, help="JSON file, or a folder for e2e_<gpu>_<n>p_<commit>.json "
                                                    "(default bench/results)")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: choose among {', '.join(VARIANTS)}")
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    base = [*MODEL, f"train.steps={args.steps}", *args.overrides]
    cfg = load_config(None, base + VARIANTS[variants[0]] if variants else base, parties=world)
    device = party_device(cfg)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    ceiling = ceilings() if cuda else None
    if cuda:  # the ceilings' buffers are not the engine's peak memory
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if world > 1:
        dist.init_process_group(process_group_backend(cfg), timeout=timedelta(minutes=10))
    nccl = world > 1 and process_group_backend(cfg) == "nccl"
    env = environment() if rank == 0 else None
    try:
        party = Party(cfg, rank)
        for variant in variants or [None]:  # each variant's config read as it starts: one that fails leaves the rest
            variant_cfg = load_config(None, base + VARIANTS[variant], parties=world) if variant else cfg
            use_variant(party, variant_cfg)
            result = run(party, variant_cfg, args, ceiling, world, nccl)
            results = [None] * world
            if world > 1:
                dist.all_gather_object(results, result)  # benchmark numbers, after the steps: no protocol traffic
            else:
                results = [result]
            if rank:
                continue
            gpus = min(world, torch.cuda.device_count()) if cuda else 0  # fewer than parties: they share GPUs
            report = dict(env, benchmark="engine-e2e", variant=variant, ceilings=ceiling, parties=world, gpus=gpus,
                          backend=process_group_backend(cfg) if world > 1 else None, config=variant_cfg.to_dict(),
                          total_parameters=sum(results[0]["parameters"].values()) if world == 1 else
                          results[0]["parameters"]["backbone"] + sum(r["parameters"]["local_experts"] for r in results),
                          tokens_per_s_total=sum(r["tokens_per_s"] for r in results), per_party=results)
            out = Path(args.out or RESULTS)
            prefix = "scale" if variant else "e2e"
            if out.is_dir() or not out.suffix:
                shared = "_shared" if cuda and gpus < world else ""
                out = out / f"{prefix}_{gpu_tag(env['device'])}_{world}p{shared}_{env['commit']}.json"
            if variant:
                out = out.with_name(f"{out.stem}_{variant}{out.suffix}")
            write(out, report)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
