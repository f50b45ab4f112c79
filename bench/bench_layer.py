"""The whole MoE layer, forward and forward+backward: FusedMoE.from_hf(block) against transformers' own block
with experts_implementation "grouped_mm" and "eager" (the same weights: from_hf shares them) and megablocks'
dMoE (its own router and weights, same sizes). Also: peak memory of one forward+backward beyond weights and
inputs, and, at the smallest token count, our outputs and gradients against the eager block's."""

import pytest
import torch

from .common import DEVICE, cached, sync
from .peers import LAYER_IMPLS, Unavailable, layer_module, megablocks_dmoe, megablocks_probe
from .shapes import imbalance, layer_flops, make_hf_block, skewing_input
from csrc_triton import FusedMoE

DTYPE = torch.bfloat16


def layer_inputs(case):
    s = case.spec
    torch.manual_seed(3)
    block = make_hf_block(s, DEVICE, DTYPE)
    skew = skewing_input(block.gate.weight.detach(), case.routing).to(DEVICE)
    inputs = [(torch.randn(1, case.tokens, s.hidden, device=DEVICE) + skew).to(DTYPE) for _ in range(3)]
    with torch.no_grad():
        ids = torch.topk(inputs[0][0].float() @ block.gate.weight.float().t(), s.top_k, dim=-1).indices
    return dict(block=block, fused=FusedMoE.from_hf(block), inputs=inputs, imbalance=imbalance(ids, s.experts),
                grad=torch.randn(1, case.tokens, s.hidden, device=DEVICE, dtype=DTYPE))


def module_for(impl, case, d):
    """(module, its parameters, extra row fields); megablocks is built on first use and kept with the case."""
    if impl != "megablocks":
        return layer_module(impl, d["block"], d["fused"]), list(d["block"].parameters()), {}
    if "megablocks" not in d:
        try:
            megablocks_probe("dmoe")
            d["megablocks"] = megablocks_dmoe(case.spec, DTYPE)
        except Unavailable as e:
            d["megablocks"] = e
    if isinstance(d["megablocks"], Unavailable):
        raise d["megablocks"]
    module, backend = d["megablocks"]
    return module, list(module.parameters()), {"backend": backend}


def shaped(impl, x):
    return x.view(x.shape[1], 1, x.shape[2]) if impl == "megablocks" else x  # dMoE takes [seq, batch, hidden]


def forward_backward(module, impl, x, grad):
    x.requires_grad_()
    out = module(shaped(impl, x))
    out.backward(shaped(impl, grad))
    x.requires_grad_(False)
    x.grad = None


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_against_eager(d):
    """Our output and every gradient against transformers' eager block on the same input."""
    block, x, grad = d["block"], d["inputs"][0].clone().requires_grad_(), d["grad"]
    results = []
    for impl in ("hf_eager", "pcmoe"):
        block.zero_grad(set_to_none=True)
        x.grad = None
        out = layer_module(impl, block, d["fused"])(x)
        out.backward(grad)
        results.append((out.detach(), [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]))
    block.zero_grad(set_to_none=True)
    (ref, ref_grads), (out, grads) = results
    return dict(out_rel_err=rel(out, ref), max_grad_rel_err=max(rel(a, b) for a, b in zip(grads, ref_grads)))


def peak_extra_bytes(module, impl, params, x, grad):
    """What one forward+backward allocates beyond what was already there (weights, inputs)."""
    for p in params:
        p.grad = None
    sync()
    if DEVICE == "cpu":
        return None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward_backward(module, impl, x, grad)
    sync()
    peak = torch.cuda.max_memory_allocated() - base
    for p in params:
        p.grad = None
    return peak


@torch.no_grad()
def _forward(module, x):
    return module(x)


@pytest.mark.impls(*LAYER_IMPLS)
def bench_layer_fwd(case, impl, measure):
    d = cached(("layer", case), lambda: layer_inputs(case))

    def build(row):
        module, _, extra = module_for(impl, case, d)
        row.update(extra)
        calls = iter(range(10**12))
        return lambda: _forward(module, shaped(impl, d["inputs"][next(calls) % 3]))

    measure("layer_fwd", case, impl, build, flops=layer_flops(case.tokens, case.spec), imbalance=d["imbalance"])


@pytest.mark.impls(*LAYER_IMPLS)
def bench_layer_fwd_bwd(case, impl, measure, request):
    d = cached(("layer", case), lambda: layer_inputs(case))
    extra = {"imbalance": d["imbalance"]}
    if impl == "pcmoe" and case.tokens == min(map(int, request.config.getoption("--bench-tokens").split(","))):
        extra["check"] = check_against_eager(d)
    run = {}

    def build(row):
        module, params, more = module_for(impl, case, d)
        row.update(more)
        run.update(module=module, params=params)
        calls = iter(range(10**12))
        return lambda: forward_backward(module, impl, d["inputs"][next(calls) % 3], d["grad"]), params

    def after(row):
        row["peak_bytes"] = peak_extra_bytes(run["module"], impl, run["params"], d["inputs"][0], d["grad"])

    measure("layer_fwd_bwd", case, impl, build, flops=3 * layer_flops(case.tokens, case.spec), after=after,
            **extra)
