"""Routed experts with the weighted combine, the routing given, forward and forward+backward: x [T, H], top-k
ids and weights [T, k] -> sum_j weights[t, j] * SwiGLU_{ids[t, j]}(x[t]). What the published fused-MoE kernels
time, and how they count it: 6 T k H I FLOPs forward, 3x that forward+backward (shapes.routed_flops).

Every implementation runs on one transformers experts module (its weights): ours (csrc_triton.expert_mlp,
its routing plan included), transformers' grouped_mm experts, Liger-Kernel's and SonicMoE's fused MoE
(peers.experts_fn). The backward gives x, both weight tensors and the routing weights their gradients. Each
peer's output and gradients are checked against ours once per case (``check``)."""

import pytest
import torch

from .common import DEVICE, cached
from .peers import EXPERTS_IMPLS, agreement, experts_fn, outputs_and_grads
from .shapes import DTYPE, imbalance, make_hf_block, routed_flops, router_logits, topk_routing


def experts_inputs(case):
    s, gen = case.spec, torch.Generator().manual_seed(4)
    weights, ids = topk_routing(router_logits(case.tokens, s.experts, case.routing, gen), s.top_k, s.norm_topk_prob)
    torch.manual_seed(4)
    experts = make_hf_block(s, DEVICE, DTYPE).experts
    return dict(experts=experts, ids=ids.to(DEVICE), weights=weights.to(DEVICE, DTYPE).requires_grad_(),
                inputs=[torch.randn(case.tokens, s.hidden, device=DEVICE, dtype=DTYPE) for _ in range(3)],
                grad=torch.randn(case.tokens, s.hidden, device=DEVICE, dtype=DTYPE),
                imbalance=imbalance(ids, s.experts))


def _inputs(case):
    return cached(("experts", case), lambda: experts_inputs(case))


def leaves(d) -> list:
    return [d["experts"].gate_up_proj, d["experts"].down_proj, d["weights"]]


def outputs(impl, d) -> list:
    """``impl``'s output and the gradients of x, both weight tensors and the routing weights, on input set 0."""
    fn, x = experts_fn(impl, d["experts"]), d["inputs"][0].clone().requires_grad_()
    return outputs_and_grads(lambda: fn(x, d["ids"], d["weights"]), [x, *leaves(d)], d["grad"])


def forward_backward(fn, d, x):
    x.requires_grad_()
    fn(x, d["ids"], d["weights"]).backward(d["grad"])
    x.requires_grad_(False)
    x.grad = None


@pytest.mark.impls(*EXPERTS_IMPLS)
def bench_experts_fwd(case, impl, measure):
    d = _inputs(case)

    def build(row):
        fn, calls = experts_fn(impl, d["experts"]), iter(range(10**12))
        return torch.no_grad()(lambda: fn(d["inputs"][next(calls) % 3], d["ids"], d["weights"]))

    measure("experts_fwd", case, impl, build, flops=routed_flops(case.tokens, case.spec), imbalance=d["imbalance"])


@pytest.mark.impls(*EXPERTS_IMPLS)
def bench_experts_fwd_bwd(case, impl, measure):
    d = _inputs(case)

    def build(row):
        if impl != "pcmoe":
            if "ours" not in d:
                d["ours"] = outputs("pcmoe", d)
            row["check"] = agreement(outputs(impl, d), d["ours"], "pcmoe")
        fn, calls = experts_fn(impl, d["experts"]), iter(range(10**12))
        return lambda: forward_backward(fn, d, d["inputs"][next(calls) % 3]), leaves(d)

    measure("experts_fwd_bwd", case, impl, build, flops=3 * routed_flops(case.tokens, case.spec),
            imbalance=d["imbalance"])
