"""Grouped SwiGLU expert GEMMs on rows already in expert order (the permutation is timed on its own):
forward (gate-up, SwiGLU, down), dgrad (gradient of the rows) and wgrad (of the expert weights).

Ours: csrc_triton.grouped_mlp (its routing plan over the sorted rows included). Peers: torch._grouped_mm
with group offsets, and the eager loop of one GEMM pair per expert (transformers' "eager" experts). Our
backward computes dgrad and wgrad in one call, so our dgrad and wgrad rows are the GPU time of their kernels
from torch.profiler (``method``: "kernels"), with the whole call's do_bench time beside them as ``bwd_ms``.
"""

import pytest
import torch
import torch.nn.functional as F

from .common import DEVICE, cached, kernel_ms, time_ms
from .peers import (OURS_BACKWARD_KERNELS, eager_dgrad, eager_forward, eager_wgrad, grouped_mm_dgrad,
                    grouped_mm_forward, grouped_mm_wgrad, ours_gemm_backward, ours_gemm_forward,
                    swiglu_backward_act)
from .shapes import expert_flops, imbalance, router_logits, topk_routing

IMPLS = ("pcmoe", "grouped_mm", "eager")


def gemm_inputs(case):
    s, gen = case.spec, torch.Generator().manual_seed(2)
    _, ids = topk_routing(router_logits(case.tokens, s.experts, case.routing, gen), s.top_k, s.norm_topk_prob)
    counts = torch.bincount(ids.flatten(), minlength=s.experts)
    offsets = torch.zeros(s.experts + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    rows = ids.numel()
    dev = dict(device=DEVICE, dtype=torch.bfloat16)
    x, dy = torch.randn(rows, s.hidden, **dev), torch.randn(rows, s.hidden, **dev)
    w_gate_up = torch.randn(s.experts, 2 * s.inter, s.hidden, **dev) * 0.02
    w_down = torch.randn(s.experts, s.hidden, s.inter, **dev) * 0.02
    offsets = offsets.to(DEVICE)
    _, h = grouped_mm_forward(x, offsets[1:], w_gate_up, w_down)
    gate, up = h.chunk(2, -1)
    dh = swiglu_backward_act(h, torch._grouped_mm(dy, w_down, offs=offsets[1:]))
    expert_of_row = torch.repeat_interleave(torch.arange(s.experts), counts).int().to(DEVICE)
    return dict(x=x, dy=dy, w_gate_up=w_gate_up, w_down=w_down, expert_of_row=expert_of_row, ends=offsets[1:],
                bounds=offsets.tolist(), h=h, act=F.silu(gate) * up, dh=dh, imbalance=imbalance(ids, s.experts))


def _inputs(case):
    return cached(("gemm", case), lambda: gemm_inputs(case))


def _flops(case):
    return expert_flops(case.tokens * case.spec.top_k, case.spec.hidden, case.spec.inter)


@pytest.mark.impls(*IMPLS)
def bench_gemm_fwd(case, impl, measure):
    d = _inputs(case)
    fn = {"pcmoe": lambda: ours_gemm_forward(d["x"], d["expert_of_row"], d["w_gate_up"], d["w_down"]),
          "grouped_mm": lambda: grouped_mm_forward(d["x"], d["ends"], d["w_gate_up"], d["w_down"]),
          "eager": lambda: eager_forward(d["x"], d["bounds"], d["w_gate_up"], d["w_down"])}[impl]
    measure("gemm_fwd", case, impl, lambda row: fn, flops=_flops(case), imbalance=d["imbalance"])


def _ours_split(measure, stage, case, d):
    """Our dgrad or wgrad: kernel time from the profiler, with the whole backward call's do_bench time (both
    measured once per case, for the dgrad and the wgrad row)."""
    if "ours_backward" not in d:
        fn, leaves = ours_gemm_backward(d["x"], d["expert_of_row"], d["w_gate_up"], d["w_down"], d["dy"])
        opt = measure.config.getoption
        bwd_ms = time_ms(fn, opt("--bench-warmup-ms"), opt("--bench-rep-ms"), grad_to_none=leaves)
        split = kernel_ms(fn, OURS_BACKWARD_KERNELS) if DEVICE == "cuda" else dict.fromkeys(OURS_BACKWARD_KERNELS,
                                                                                              bwd_ms)
        d["ours_backward"] = bwd_ms, split
    bwd_ms, split = d["ours_backward"]
    row = dict(stage=stage, shape=case.shape, tokens=case.tokens, routing=case.routing, impl="pcmoe",
               flops=_flops(case), bytes=None, imbalance=d["imbalance"], method="kernels", bwd_ms=bwd_ms)
    row["ms"] = measure.benchmark.pedantic(lambda: split[stage], rounds=1, iterations=1)
    measure.record(row)


@pytest.mark.impls(*IMPLS)
def bench_gemm_dgrad(case, impl, measure):
    d = _inputs(case)
    if impl == "pcmoe":
        return _ours_split(measure, "gemm_dgrad", case, d)
    fn = {"grouped_mm": lambda: grouped_mm_dgrad(d["dy"], d["h"], d["ends"], d["w_gate_up"], d["w_down"]),
          "eager": lambda: eager_dgrad(d["dy"], d["h"], d["bounds"], d["w_gate_up"], d["w_down"])}[impl]
    measure("gemm_dgrad", case, impl, lambda row: fn, flops=_flops(case), imbalance=d["imbalance"])


@pytest.mark.impls(*IMPLS)
def bench_gemm_wgrad(case, impl, measure):
    d = _inputs(case)
    if impl == "pcmoe":
        return _ours_split(measure, "gemm_wgrad", case, d)
    fn = {"grouped_mm": lambda: grouped_mm_wgrad(d["dy"], d["act"], d["dh"], d["x"], d["ends"]),
          "eager": lambda: eager_wgrad(d["dy"], d["act"], d["dh"], d["x"], d["bounds"], d["w_gate_up"],
                                       d["w_down"])}[impl]
    measure("gemm_wgrad", case, impl, lambda row: fn, flops=_flops(case), imbalance=d["imbalance"])
