"""The two halves of a Qwen1.5-MoE-like layer timed apart: the shared expert (ours, and the same MLP as a
plain chain of cuBLAS linears and elementwise ops) and the routed experts, plus cuBLAS's rate on the shared
expert's GEMM shapes, which bounds what that half can reach.

    PYTHONPATH=. python profiling/expert_parts.py [--tokens 16384]
"""

import argparse

import torch
import torch.nn.functional as F

import csrc_triton as ct
from bench.common import time_ms

HIDDEN, SHARED, EXPERTS, TOP_K, INTER = 2048, 5632, 60, 4, 1408


def report(name, fn, leaves, dout, flops):
    """Forward and forward+backward of fn() (which reads the leaves) at their medians."""
    def forward():
        with torch.no_grad():
            fn()

    def forward_backward():
        fn().backward(dout)

    fwd, fwd_bwd = time_ms(forward), time_ms(forward_backward, grad_to_none=leaves)
    print(f"{name:24s} fwd {fwd:7.3f} ms {flops / fwd / 1e9:5.0f} TFLOP/s   "
          f"fwd+bwd {fwd_bwd:7.3f} ms {3 * flops / fwd_bwd / 1e9:5.0f} TFLOP/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    tokens = parser.parse_args().tokens
    torch.manual_seed(0)
    leaf = lambda *shape, std=1.0: (torch.randn(*shape, device="cuda") * std).bfloat16().requires_grad_()
    x, dout = leaf(tokens, HIDDEN), torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    w_gate, w_up, w_down = leaf(SHARED, HIDDEN, std=0.02), leaf(SHARED, HIDDEN, std=0.02), leaf(HIDDEN, SHARED, std=0.02)
    gate = torch.rand(tokens, 1, device="cuda")
    shared = [x, w_gate, w_up, w_down]
    flops = 2 * tokens * HIDDEN * 3 * SHARED
    report("shared, pcmoe", lambda: ct.shared_expert_mlp(x, w_gate, w_up, w_down, gate), shared, dout, flops)
    report("shared, cuBLAS chain", lambda: gate * F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down),
           shared, dout, flops)
    a, b = torch.randn(tokens, HIDDEN, device="cuda").bfloat16(), torch.randn(HIDDEN, 2 * SHARED, device="cuda").bfloat16()
    ms = time_ms(lambda: a @ b)
    print(f"{'cuBLAS [T,H] x [H,2S]':24s} {ms:7.3f} ms {2 * tokens * HIDDEN * 2 * SHARED / ms / 1e9:5.0f} TFLOP/s")

    routing = ct.route(torch.randn(tokens, EXPERTS, device="cuda", dtype=torch.bfloat16), top_k=TOP_K)
    w_gate_up, w_down_r = leaf(EXPERTS, 2 * INTER, HIDDEN, std=0.02), leaf(EXPERTS, HIDDEN, INTER, std=0.02)
    weights = routing.weights.bfloat16()
    report("routed, pcmoe", lambda: ct.expert_mlp(x, weights, routing.expert_ids, w_gate_up, w_down_r),
           [x, w_gate_up, w_down_r], dout, 2 * tokens * TOP_K * HIDDEN * 3 * INTER)


if __name__ == "__main__":
    main()
