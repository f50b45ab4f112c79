"""The routed experts (csrc_triton.expert_mlp) forward and forward+backward, this tree's kernels against another
checkout's, alternating in one process: a change worth a few percent shows through the run-to-run spread that
separate runs (or separate machines) add.

    git worktree add /tmp/base <commit>
    PYTHONPATH=. python profiling/ab_trees.py --base /tmp/base --case sonicmoe-7b:24576 --case qwen3-30b-a3b:32768

The peers suite's inputs (bench/bench_experts.py: balanced random routing, bf16, transformers' experts module of
that shape); each round times both trees (do_bench medians), forward under no_grad, forward+backward with every
gradient reset between calls.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

import csrc_triton
from bench.bench_experts import experts_inputs
from bench.common import time_ms
from bench.shapes import PROFILED_CASES, SHAPES, Case, add_case_option, routed_flops


def load_base(root: Path):
    """The other checkout's csrc_triton, imported as the package ``csrc_base`` (its relative imports stay in it)."""
    spec = importlib.util.spec_from_file_location("csrc_base", root / "csrc_triton" / "__init__.py",
                                                  submodule_search_locations=[str(root / "csrc_triton")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["csrc_base"] = module
    spec.loader.exec_module(module)
    return module


def case(shape_name: str, tokens: int, trees: dict, rounds: int):
    inputs = experts_inputs(Case(shape_name, tokens, "balanced"))  # what the peers suite times (bench_experts.py)
    experts, ids, weights, dout = inputs["experts"], inputs["ids"], inputs["weights"], inputs["grad"]
    x = inputs["inputs"][0]
    leaves = [experts.gate_up_proj, experts.down_proj, weights]

    def forward(tree):
        with torch.no_grad():
            return tree.expert_mlp(x, weights, ids, experts.gate_up_proj, experts.down_proj)

    def forward_backward(tree):
        out = tree.expert_mlp(x.clone().requires_grad_(), weights, ids, experts.gate_up_proj, experts.down_proj)
        out.backward(dout)

    for tree in trees.values():  # compile and autotune outside the timings
        forward(tree)
        forward_backward(tree)
    times = {}
    for _ in range(rounds):
        for label, tree in trees.items():
            times.setdefault((label, "fwd"), []).append(time_ms(lambda: forward(tree)))
            times.setdefault((label, "f+b"), []).append(time_ms(lambda: forward_backward(tree), grad_to_none=leaves))
    flops = routed_flops(tokens, SHAPES[shape_name])
    for kind, count in (("fwd", flops), ("f+b", 3 * flops)):
        for label in trees:
            ms = times[(label, kind)]
            print(f"{shape_name} T={tokens} {kind} {label:4s} ms {' '.join(f'{v:.3f}' for v in ms)}  TFLOP/s "
                  f"{' '.join(f'{count / v / 1e9:.0f}' for v in ms)}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="root of the other checkout (holds csrc_triton/)")
    add_case_option(parser)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profiling/ab_trees.py times CUDA kernels: run it on a machine with a GPU")
    if not (args.base / "csrc_triton" / "__init__.py").is_file():
        sys.exit(f"--base {args.base}: no csrc_triton/ there; pass the root of a checkout (git worktree add)")
    trees = {"new": csrc_triton, "base": load_base(args.base)}
    print(f"{torch.cuda.get_device_name()}; new: {Path(csrc_triton.__file__).parent}, base: {args.base}")
    for shape, tokens in args.case or PROFILED_CASES:
        case(shape, tokens, trees, args.rounds)


if __name__ == "__main__":
    main()
