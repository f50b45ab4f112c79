"""Permutation (routing plan + gather into expert order) and un-permutation (weighted top-k combine): ours
against PyTorch eager (argsort / index_select, as transformers' grouped_mm experts do) and megablocks' ops."""

import pytest
import torch

from .common import DEVICE, cached, rotating, set_count
from .peers import (eager_permute, eager_unpermute, megablocks_ops, megablocks_plan, ours_permute,
                    ours_unpermute)
from .shapes import permute_bytes, router_logits, topk_routing, unpermute_bytes


def routed_sets(case):
    """(x, ids, weights) sets: N(0, 1) rows, the case's routing."""
    s, gen = case.spec, torch.Generator().manual_seed(1)
    count = set_count(case.tokens * s.hidden * 2 * (1 + s.top_k))
    sets = []
    for _ in range(count):
        weights, ids = topk_routing(router_logits(case.tokens, s.experts, case.routing, gen), s.top_k,
                                    s.norm_topk_prob)
        x = torch.randn(case.tokens, s.hidden, generator=gen)
        sets.append((x.to(DEVICE, torch.bfloat16), ids.to(DEVICE, torch.int32), weights.to(DEVICE, torch.bfloat16)))
    return sets


def permute_impl(impl, case):
    experts, k = case.spec.experts, case.spec.top_k
    if impl == "pcmoe":
        return lambda x, ids: ours_permute(x, ids, experts)
    if impl == "eager":
        return lambda x, ids: eager_permute(x, ids, experts)
    ops = megablocks_ops()
    return lambda x, ids: ops.gather(x, *megablocks_plan(ops, ids, experts), k)


@pytest.mark.impls("pcmoe", "eager", "megablocks")
def bench_permute(case, impl, measure):
    sets = cached(("routed", case), lambda: routed_sets(case))
    measure("permute", case, impl, lambda row: rotating(permute_impl(impl, case), [s[:2] for s in sets]),
            nbytes=permute_bytes(case.tokens, case.spec))


def unpermute_sets(impl, case, sets):
    """(expert outputs in the implementation's slot order, its plan, weights) per routed set."""
    s, out = case.spec, []
    for x, ids, weights in sets:
        y_sorted = torch.randn(ids.numel(), s.hidden, device=DEVICE, dtype=torch.bfloat16)
        if impl == "megablocks":
            ops = megablocks_ops()
            plan = megablocks_plan(ops, ids, s.experts)
            out.append((y_sorted, plan, weights.flatten()))
        else:
            out.append((y_sorted, ours_permute(x, ids, s.experts)[1], weights))
    return out


@pytest.mark.impls("pcmoe", "eager", "megablocks")
def bench_unpermute(case, impl, measure):
    sets = cached(("routed", case), lambda: routed_sets(case))
    k = case.spec.top_k

    def build(row):
        if impl == "megablocks":
            ops = megablocks_ops()
            fn = lambda y, plan, w: ops.scatter(y, plan[0], plan[1], w, plan[2], k)
        else:
            fn = ours_unpermute if impl == "pcmoe" else eager_unpermute
        return rotating(fn, unpermute_sets(impl, case, sets))

    measure("unpermute", case, impl, build, nbytes=unpermute_bytes(case.tokens, case.spec))
