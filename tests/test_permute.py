import importlib

import pytest
import torch

from csrc_triton.permute import (permute, permute_reference, plan_routing, plan_routing_reference, unpermute,
                                 unpermute_reference)
from helpers import leaf, rel_err


def random_ids(tokens, experts, k, empty=(), skew=False):
    """[T, k] distinct experts per token; experts in `empty` are never chosen."""
    allowed = torch.tensor([e for e in range(experts) if e not in empty])
    probs = torch.ones(len(allowed)) if not skew else 1.0 / torch.arange(1, len(allowed) + 1).float() ** 1.5
    picks = [torch.multinomial(probs, k) for _ in range(tokens)]
    return allowed[torch.stack(picks)].int() if picks else torch.zeros(0, k, dtype=torch.int32)


CASES = [(1, 4, 1), (37, 8, 2), (130, 16, 4, (3, 7)), (300, 64, 8, (), True), (50, 256, 8), (0, 8, 2)]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_plan_is_a_stable_sort(case, device, poison):
    ids = random_ids(*case).to(device)
    plan, ref = plan_routing(ids, case[1]), plan_routing_reference(ids.cpu(), case[1])
    for got, want in zip(plan, ref):
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("case", [(300, 64, 8, (), True), (50, 256, 8), (130, 16, 4, (3, 7))], ids=str)
def test_plan_with_several_chunks_per_block(case, device, poison, monkeypatch):
    """Large inputs give each block several chunks in sequence (the few-programs path at 65536 tokens)."""
    # the module, not the `permute` function that csrc_triton's namespace exports under the same name
    monkeypatch.setattr(importlib.import_module("csrc_triton.permute"), "_PLAN_PROGRAMS", 2)
    ids = random_ids(*case).to(device)
    plan, ref = plan_routing(ids, case[1]), plan_routing_reference(ids.cpu(), case[1])
    for got, want in zip(plan, ref):
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("case", CASES[:5], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_unpermute_forward_backward(case, dtype, device, poison):
    tokens, experts, k = case[:3]
    ids = random_ids(*case).to(device)
    plan = plan_routing(ids, experts)
    hidden = 72  # not a power of two
    # Inputs exactly representable in dtype, so ours and the fp64 reference start from the same numbers.
    x, res = (torch.randn(tokens, hidden).to(dtype).float() for _ in range(2))
    w = torch.rand(tokens, k)
    ours = [leaf(x, device, dtype), leaf(w, device), leaf(res, device, dtype)]
    refs = [leaf(t, "cpu", torch.float64) for t in (x, w, res)]
    ref_plan = plan_routing_reference(ids.cpu(), experts)

    xs = permute(ours[0], plan)
    assert torch.equal(xs.cpu().double(), permute_reference(ours[0].detach().cpu().double(), ref_plan))
    y = xs * 2  # something differentiable between the two (and exact: no rounding the reference lacks)
    out = unpermute(y, plan, ours[1], ours[2])
    ref = unpermute_reference(permute_reference(refs[0], ref_plan) * 2, ref_plan, refs[1], refs[2])
    # fp32: a weight's gradient is a 72-term dot product, whose cancellation can cost a few ulp of the result
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) < tol
    g = torch.randn(tokens, hidden).to(dtype).float()
    out.backward(g.to(device, dtype))
    ref.backward(g.double())
    for a, b in zip(ours, refs):
        assert rel_err(a.grad, b.grad) < tol


def test_non_contiguous_rows(device):
    ids = random_ids(20, 8, 2).to(device)
    plan = plan_routing(ids, 8)
    x = torch.randn(20, 64, device=device)[:, ::2]
    assert torch.equal(permute(x, plan).cpu(), permute_reference(x.contiguous().cpu(), plan_routing_reference(ids.cpu(), 8)))


@pytest.mark.parametrize("bad", [4, 16, -1, 2**31 - 1])  # a padded column, past the padding, negative, huge
def test_unchecked_out_of_range_ids_still_get_one_slot_each(bad, device):
    """Unchecked (validate=False, or a check that finishes after the kernels: start_id_check), an out-of-range
    id counts as expert 0: every pair gets one slot in [0, P), so the kernels that follow read in bounds."""
    plan = plan_routing(torch.tensor([[0, bad], [3, 1], [bad, 2]], device=device), 4, validate=False)
    assert sorted(plan.sorted_pair.tolist()) == list(range(6))
    assert sorted(plan.slot_of_pair.flatten().tolist()) == list(range(6))
    assert plan.tokens_per_expert.tolist() == [3, 1, 1, 1] and plan.offsets.tolist() == [0, 3, 4, 5, 6]


def test_out_of_range_ids_are_rejected():
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\), got values in \[0, 4\]"):
        plan_routing(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match=r"got values in \[-1, 3\]"):
        plan_routing(torch.tensor([[3, 1], [-1, 2]], dtype=torch.int32), 4)
