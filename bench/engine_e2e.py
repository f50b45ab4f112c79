"""End to end: the PC-MoE engine training a ~1.9B-parameter MoE (olmoe-1b-7b's layers, 4 of them) for a few
steps, per party: tokens/s, model FLOPs utilisation, peak GPU memory and what it holds, and the share of
step time spent in communication.

    PYTHONPATH=. python bench/engine_e2e.py --out e2e.json                       # 1 party (centralized)
    PYTHONPATH=. torchrun --nproc-per-node 2 bench/engine_e2e.py --out e2e.json  # 2 parties, one GPU each
    PYTHONPATH=. torchrun --nproc-per-node 2 bench/engine_e2e.py --set train.device=cuda  # 2 parties, 1 GPU

Parties that share a GPU (the last line, on a 1-GPU machine) exchange over gloo through host memory and
split the GPU's time: their per-party memory is what it would be on GPUs of their own, their speed is not.

MFU: model FLOPs per token, 6 x active parameters (every backbone matrix but the embedding, plus top_k of
num_experts of the routed experts) + 6 x layers x seq_len x hidden for causal attention scores (QK^T and AV,
forward 2 x S x H per token per layer after halving for causality, backward twice that), times each party's
tokens/s, over the dense bf16 matmul rate measured in the same run. Communication share: GPU time of NCCL
kernels over step time in the last profiled steps (0 with one party: the exchanges are local; not measured
over gloo). Memory: parameters, gradients (fp32, as large as the parameters) and AdamW state from their sizes;
activations and workspace (autocast's bf16 weight copies included) are the measured peak minus those.
"""

import argparse
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
from pcmoe_engine.party import Party, party_device, process_group_backend  # noqa: E402

MODEL = ["model.preset=olmoe-1b-7b", "model.num_layers=4", "train.batch_size=8", "data.seq_len=1024"]


def flops_per_token(m) -> float:
    attention = m.hidden_size * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
    shared = 3 * m.hidden_size * m.shared_intermediate_size
    routed = 3 * m.hidden_size * m.expert_intermediate_size * m.top_k
    active = m.num_layers * (attention + m.hidden_size * m.num_experts + shared + routed) + m.hidden_size * m.vocab_size
    return 6 * active


def party_result(summary: dict, steps: list[dict], timed: slice, nccl_share: float | None, cfg, ceiling) -> dict:
    timed_steps = steps[timed]
    seconds = sum(r["step_time_s"] for r in timed_steps)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    tokens_per_s = tokens_per_step * len(timed_steps) / seconds
    m = cfg.model
    model_flops = flops_per_token(m) + 6 * m.num_layers * cfg.data.seq_len * m.hidden_size
    mem = summary["memory"]
    params = mem["backbone_params_bytes"] + mem["expert_params_bytes"]
    split = dict(backbone_params=mem["backbone_params_bytes"], local_expert_params=mem["expert_params_bytes"],
                 gradients=params, optimizer_state=mem["optimizer_state_bytes"])
    split["activations_and_workspace"] = summary["peak_memory_bytes"] - sum(split.values())
    return dict(party=summary["party"], tokens_per_s=tokens_per_s, step_ms=seconds / len(timed_steps) * 1e3,
                mfu=tokens_per_s * model_flops / (ceiling["bf16_matmul_tflops"] * 1e12),
                model_flops_per_token=model_flops, peak_memory_bytes=summary["peak_memory_bytes"],
                memory=split, memory_share={k: v / summary["peak_memory_bytes"] for k, v in split.items()},
                comm_share=nccl_share, parameters=summary["parameters"], bytes_sent=summary["bytes_sent"],
                final_loss=summary["final_loss"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the throughput")
    parser.add_argument("--profiled", type=int, default=2, help="last steps, under torch.profiler for NCCL time")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default=None, help="JSON file, or a folder for e2e_<gpu>_<n>p_<commit>.json "
                                                    "(default bench/results)")
    args = parser.parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cfg = load_config(None, [*MODEL, f"train.steps={args.steps}", *args.overrides], parties=world)
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
    first_profiled = args.steps - args.profiled + 1
    prof = profile(activities=[ProfilerActivity.CUDA]) if nccl and args.profiled else None
    steps = []
    try:
        party = Party(cfg, rank)
        while party.step_count < args.steps:
            if prof is not None and party.step_count == first_profiled - 1:
                prof.start()
            steps.append(party.step())
        if prof is not None:
            prof.stop()
        summary = party.summary()
        nccl_share = 0.0 if world == 1 else None
        if prof is not None:
            nccl_us = sum(e.device_time for e in prof.events()
                          if e.device_type == torch.autograd.DeviceType.CUDA and "nccl" in e.name.lower())
            nccl_share = nccl_us / 1e6 / sum(r["step_time_s"] for r in steps[first_profiled - 1:])
        result = party_result(summary, steps, slice(args.warmup, first_profiled - 1 if prof else None), nccl_share,
                              cfg, ceiling or {"bf16_matmul_tflops": float("nan")})
        results = [None] * world
        if world > 1:
            dist.all_gather_object(results, result)  # benchmark numbers, after training: no protocol traffic
        else:
            results = [result]
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank:
        return
    env = environment()
    gpus = min(world, torch.cuda.device_count()) if cuda else 0  # fewer than parties: they share GPUs
    report = dict(env, benchmark="engine-e2e", ceilings=ceiling, parties=world, gpus=gpus,
                  backend=process_group_backend(cfg) if world > 1 else None, config=cfg.to_dict(),
                  total_parameters=sum(results[0]["parameters"].values()) if world == 1 else
                  results[0]["parameters"]["backbone"] + sum(r["parameters"]["local_experts"] for r in results),
                  tokens_per_s_total=sum(r["tokens_per_s"] for r in results), per_party=results)
    out = Path(args.out or RESULTS)
    if out.is_dir():
        shared = "_shared" if cuda and gpus < world else ""
        out = out / f"e2e_{gpu_tag(env['device'])}_{world}p{shared}_{env['commit']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for r in results:
        print(f"party {r['party']}/{world}: {r['tokens_per_s']:,.0f} tokens/s, step {r['step_ms']:.1f} ms, "
              f"MFU {r['mfu']:.1%}, peak {r['peak_memory_bytes'] / 2**30:.1f} GiB "
              f"({', '.join(f'{k} {v:.0%}' for k, v in r['memory_share'].items())}), comm share "
              f"{r['comm_share'] if r['comm_share'] is None else format(r['comm_share'], '.1%')}")
    print(f"total parameters {report['total_parameters'] / 1e9:.2f} B; results: {out}")


if __name__ == "__main__":
    main()
