"""Router: ours (csrc_triton.route, one fused kernel) against the block's routing in PyTorch ops."""

import pytest
import torch

from .common import DEVICE, cached, rotating, set_count
from .peers import eager_route, ours_route
from .shapes import router_bytes, router_logits

IMPLS = {"pcmoe": ours_route, "eager": eager_route}


def logit_sets(case):
    s, gen = case.spec, torch.Generator().manual_seed(0)
    count = set_count(case.tokens * s.experts * 2)
    return [router_logits(case.tokens, s.experts, case.routing, gen).to(DEVICE, torch.bfloat16)
            for _ in range(count)]


@pytest.mark.impls(*IMPLS)
def bench_router(case, impl, measure):
    s = case.spec
    sets = cached(("router", case), lambda: logit_sets(case))
    measure("router", case, impl, lambda row: rotating(lambda logits: IMPLS[impl](logits, s), [(l,) for l in sets]),
            nbytes=router_bytes(case.tokens, s))
