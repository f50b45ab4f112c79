"""Per-kernel GPU time of one MoE layer forward+backward (FusedMoE, or transformers' block with its
"grouped_mm" or "eager" experts), from torch.profiler: which kernel a speed-up must come from.

    PYTHONPATH=. python profiling/moe_layer_kernels.py --shape olmoe-1b-7b [--impl grouped_mm] [--trace out.json]

With --steps 0 it only runs (warm-up included): the driver profiling/ncu_kernel.sh runs under Nsight Compute.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.peers import layer_module
from bench.shapes import SHAPES, make_hf_block
from csrc_triton import FusedMoE


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="olmoe-1b-7b", choices=list(SHAPES))
    parser.add_argument("--impl", default="pcmoe", choices=["pcmoe", "hf_grouped_mm", "hf_eager"])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=3, help="forward+backward steps profiled (0: run only)")
    parser.add_argument("--trace", default=None, help="write a Chrome trace here")
    args = parser.parse_args()
    block = make_hf_block(SHAPES[args.shape], "cuda", torch.bfloat16)
    module = layer_module(args.impl, block, FusedMoE.from_hf(block))
    x = torch.randn(1, args.tokens, block.gate.weight.shape[1], device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    grad = torch.randn_like(x)
    for _ in range(2):  # compile and warm up
        module(x).backward(grad)
    torch.cuda.synchronize()
    if not args.steps:
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            module(x).backward(grad)
        torch.cuda.synchronize()
    print(f"{args.shape} {args.impl}: per-kernel CUDA time over {args.steps} forward+backward steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
