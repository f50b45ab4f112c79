"""The whole MoE layer, forward and forward+backward: FusedMoE.from_hf(block) against transformers' own block
with experts_implementation "grouped_mm" and "eager", and with Liger-Kernel's and SonicMoE's fused experts
plugged into it (all on the same weights: from_hf shares them), and megablocks' dMoE (its own router and
weights, same sizes). Also: peak memory of one forward+backward beyond weights and inputs; our outputs and
gradients against the eager block's at the smallest token count, and every peer's on the block's weights
against ours (``check``)."""

import pytest
import torch

from .common import DEVICE, cached, sync
from .peers import (LAYER_IMPLS, Unavailable, agreement, layer_module, megablocks_dmoe, outputs_and_grads,
                    probe)
from .shapes import DTYPE, imbalance, layer_flops, make_hf_block, skewing_input
from csrc_triton import FusedMoE

CHECKED = ("hf_grouped_mm", "liger", "sonicmoe")  # peers on the block's weights, checked against ours every case


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
    """(module, its parameters, extra row fields); megablocks is built on first use and kept with the case, or
    why it cannot run: the reason, not the exception, whose traceback holds this frame and so the case (a cycle,
    which kept every case's gigabytes on the GPU until Python's collector ran: the suites ran out of memory)."""
    if impl != "megablocks":
        return layer_module(impl, d["block"], d["fused"]), list(d["block"].parameters()), {}
    if "megablocks" not in d:
        try:
            probe("megablocks dmoe")
            d["megablocks"] = megablocks_dmoe(case.spec, DTYPE)
        except Unavailable as e:
            d["megablocks"] = str(e)
    if isinstance(d["megablocks"], str):
        raise Unavailable(d["megablocks"])
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


def outputs(impl, d):
    """``impl``'s output and the gradients of its input and every parameter of the block, on input set 0."""
    x = d["inputs"][0].clone().requires_grad_()
    module = layer_module(impl, d["block"], d["fused"])
    return outputs_and_grads(lambda: module(x), [x, *d["block"].parameters()], d["grad"])


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
    smallest = case.tokens == min(map(int, request.config.getoption("--bench-tokens").split(",")))
    run = {}

    def build(row):
        if impl == "pcmoe" and smallest:
            row["check"] = agreement(outputs("pcmoe", d), outputs("hf_eager", d), "hf_eager")
        elif impl in CHECKED:
            if "ours" not in d:
                d["ours"] = outputs("pcmoe", d)
            row["check"] = agreement(outputs(impl, d), d["ours"], "pcmoe")
        module, params, more = module_for(impl, case, d)  # after the checks: they switch the block's experts
        row.update(more)
        run.update(module=module, params=params)
        calls = iter(range(10**12))
        return lambda: forward_backward(run["module"], impl, d["inputs"][next(calls) % 3], d["grad"]), params

    def after(row):
        row["peak_bytes"] = peak_extra_bytes(run["module"], impl, run["params"], d["inputs"][0], d["grad"])

    measure("layer_fwd_bwd", case, impl, build, flops=3 * layer_flops(case.tokens, case.spec), after=after,
            imbalance=d["imbalance"])
