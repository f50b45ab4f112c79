import pytest
import torch

from csrc_triton.router import load_balancing_loss, route, route_reference, router_z_loss
from helpers import leaf, rel_err

CASES = [  # tokens, experts, top_k, scoring, n_group, topk_group, renormalise, scaling
    (37, 8, 2, "softmax", 1, 1, True, 1.0),
    (20, 60, 4, "softmax", 1, 1, False, 1.0),
    (9, 64, 8, "softmax", 1, 1, True, 1.0),
    (19, 16, 1, "softmax", 1, 1, False, 1.0),
    (19, 16, 4, "sigmoid", 4, 2, True, 2.5),
    (5, 256, 8, "sigmoid", 8, 4, True, 2.5),
    (1, 12, 3, "sigmoid", 1, 1, False, 1.0),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_matches_reference(case, dtype, device, poison):
    tokens, experts, k, scoring, n_group, topk_group, renorm, scaling = case
    # Distinct values per row, exact in bf16 too, so no ties make the top-k order ambiguous.
    logits = torch.stack([torch.randperm(experts) for _ in range(tokens)]).double() * (4.0 / experts) - 2.0
    bias = torch.randn(experts) * 0.1 if scoring == "sigmoid" else None
    kwargs = dict(scoring=scoring, n_group=n_group, topk_group=topk_group, norm_topk_prob=renorm, scaling=scaling)
    ours_in = leaf(logits, device, dtype)
    ref_in = leaf(ours_in.detach().double(), "cpu")
    out = route(ours_in, k, score_bias=None if bias is None else bias.to(device), **kwargs)
    ref = route_reference(ref_in, k, score_bias=bias, **kwargs)
    assert torch.equal(out.expert_ids.cpu(), ref.expert_ids)
    assert torch.equal(out.tokens_per_expert.cpu(), ref.tokens_per_expert)
    assert rel_err(out.weights, ref.weights) < 1e-5
    assert rel_err(out.score_sums, ref.score_sums) < 1e-5
    assert rel_err(out.logsumexp, ref.logsumexp) < 1e-5

    grads = torch.randn(tokens, k), torch.randn(experts), torch.randn(tokens)
    loss = lambda o, g: (o.weights.double() * g[0]).sum() + (o.score_sums * g[1]).sum() + (o.logsumexp * g[2]).sum()
    loss(out, [g.to(device).double() for g in grads]).backward()
    loss(ref, [g.double() for g in grads]).backward()
    assert rel_err(ours_in.grad, ref_in.grad) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_one_expert_takes_every_token(device):
    logits = torch.randn(33, 16)
    logits[:, 5] += 100.0
    out = route(logits.to(device), 1)
    assert (out.expert_ids == 5).all()
    assert out.tokens_per_expert[5].item() == 33 and out.tokens_per_expert.sum().item() == 33
    assert torch.allclose(out.weights.cpu(), torch.ones(33, 1))


def test_empty_batch(device):
    out = route(torch.randn(0, 8, device=device), 2)
    assert out.weights.shape == (0, 2) and out.tokens_per_expert.sum().item() == 0


def test_aux_losses_uniform_routing_and_gradient(device):
    # Equal logits: every expert gets the same mean score; the balancing loss is then E * sum f_e / E = 1.
    logits = torch.zeros(64, 8, device=device, requires_grad=True)
    out = route(logits, 2)
    assert load_balancing_loss(out).item() == pytest.approx(1.0, rel=1e-5)
    assert router_z_loss(out).item() == pytest.approx(torch.log(torch.tensor(8.0)).item() ** 2, rel=1e-5)
    (load_balancing_loss(out) + router_z_loss(out)).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_non_contiguous_logits(device):
    base = torch.randn(24, 32, device=device)
    logits = base[:, ::2]  # stride 2 along experts
    out, ref = route(logits, 3), route_reference(logits.contiguous().cpu(), 3)
    assert torch.equal(out.expert_ids.cpu(), ref.expert_ids)


@pytest.mark.parametrize("bad, message", [
    (dict(top_k=9), "top_k=9"),
    (dict(scoring="relu"), "scoring"),
    (dict(n_group=3), "n_group=3"),
])
def test_bad_arguments_say_what_is_wrong(bad, message):
    kwargs = dict(top_k=2) | bad
    with pytest.raises(ValueError, match=message):
        route(torch.randn(4, 8), **kwargs)


def _nan_logits(tokens, experts, generator):
    """Distinct logits with NaN in a random subset of each row's experts (none in some rows, all in others),
    and -inf in a few (those experts score 0)."""
    logits = torch.stack([torch.randperm(experts, generator=generator) for _ in range(tokens)]).float() / experts
    nan = torch.rand(tokens, experts, generator=generator) < torch.rand(tokens, 1, generator=generator)
    nan[0], nan[1] = False, True
    logits[nan] = float("nan")
    logits[2, :3] = float("-inf")
    nan[2, :3] = False  # -inf where NaN was drawn
    return logits, nan


def check_nan_routing(tokens, experts, k, dtype, device):
    logits, nan = _nan_logits(tokens, experts, torch.Generator().manual_seed(experts))
    logits = logits.to(dtype)
    bias = torch.linspace(-0.1, 0.1, experts)
    for kwargs in (dict(scoring="softmax"), dict(scoring="sigmoid", score_bias=bias),
                   dict(scoring="sigmoid", score_bias=bias, n_group=4, topk_group=2)):
        out = route(logits.to(device), k, **{n: v.to(device) if torch.is_tensor(v) else v for n, v in kwargs.items()})
        ref = route_reference(logits, k, **kwargs)
        ids, ref_ids = out.expert_ids.cpu().long(), ref.expert_ids.long()
        # Always k distinct ids in range, and the counts say the same.
        assert ((ids >= 0) & (ids < experts)).all()
        assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()
        assert torch.equal(out.tokens_per_expert.cpu(), torch.bincount(ids.flatten(), minlength=experts))
        # Where the reference's choice is unambiguous, the same experts: NaN outranks every score (torch.topk),
        # and fewer NaN than k leaves the rest to the scores (sigmoid: a NaN logit spoils only its own score).
        row_nan = nan.sum(1)
        plain = (row_nan == 0) if kwargs["scoring"] == "softmax" or "n_group" in kwargs else (row_nan < k)
        assert torch.equal(ids[plain].sort(dim=1).values, ref_ids[plain].sort(dim=1).values)
        assert torch.equal(ids[row_nan == 0], ref_ids[row_nan == 0])
        if kwargs["scoring"] == "sigmoid" and "n_group" not in kwargs:  # k or more NaN: the lowest NaN experts
            many = row_nan >= k
            assert torch.equal(ids[many], torch.stack([r.nonzero()[:k, 0] for r in nan[many]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_logits_route_to_experts_in_range(dtype, device):
    check_nan_routing(40, 16, 4, dtype, device)


@pytest.mark.gpu
def test_nan_logits_compiled_match_the_reference_large(device):
    check_nan_routing(4096, 64, 8, torch.bfloat16, device)
