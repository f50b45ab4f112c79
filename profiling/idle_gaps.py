"""Where the GPU waits during the routed experts' forward+backward (csrc_triton.expert_mlp): a torch.profiler
trace of a few steps: the kernels' busy time, the GPU's idle time between them and how much of it waited for the
host's launches (profiling/engine_step.py's tables), by the step's part (forward, backward) that launched what
ended the wait. Idle time is what no kernel change recovers.

    PYTHONPATH=. python profiling/idle_gaps.py --case qwen3-30b-a3b:32768 [--base /tmp/base]

The peers suite's inputs (bench/bench_experts.py); with --base, another checkout's csrc_triton the same way.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

import csrc_triton
from bench.bench_experts import experts_inputs
from bench.common import time_ms
from bench.shapes import PROFILED_CASES, Case, add_case_option
from profiling.ab_trees import load_base
from profiling.engine_step import gpu_tables, idle_line

STEPS = 5


def trace(tree, shape: str, tokens: int):
    inputs = experts_inputs(Case(shape, tokens, "balanced"))
    experts, ids, weights, dout, x0 = (inputs["experts"], inputs["ids"], inputs["weights"], inputs["grad"],
                                       inputs["inputs"][0])
    leaves = [experts.gate_up_proj, experts.down_proj, weights]

    def step():
        with record_function("forward"):
            out = tree.expert_mlp(x0.clone().requires_grad_(), weights, ids, experts.gate_up_proj, experts.down_proj)
        with record_function("backward"):
            out.backward(dout)
        for t in leaves:
            t.grad = None

    for _ in range(3):  # compile and autotune outside the trace
        step()
    median = time_ms(step)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        g = gpu_tables(json.loads(Path(f.name).read_text())["traceEvents"], STEPS)
    print(f"{shape} T={tokens}: do_bench {median:.3f} ms a step; traced: GPU busy {g['gpu_busy_ms']:.3f} ms a step, "
          f"{idle_line(g)}")
    for k in g["kernels"][:12]:
        print(f"  {k['gpu_ms']:7.3f} ms  {k['calls_per_step']:4g} calls  {k['kernel'][:90]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_option(parser)
    parser.add_argument("--base", type=Path, help="root of another checkout, traced after this one")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profiling/idle_gaps.py traces CUDA kernels: run it on a machine with a GPU")
    trees = {"this tree": csrc_triton} | ({f"base {args.base}": load_base(args.base)} if args.base else {})
    for shape, tokens in args.case or PROFILED_CASES:
        for label, tree in trees.items():
            print(f"[{label}] ", end="")
            trace(tree, shape, tokens)


if __name__ == "__main__":
    main()
