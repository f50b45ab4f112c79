"""The defences on what crosses (PrivacyConfig): noise drawn once per (token, host) and layer, never again for a
checkpointed recompute, from a secret of the party's own that its checkpoints carry; the secret order of the rows
in each dispatch (privacy.shuffle), undone on the way back."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pcmoe_engine.cli import free_port
from pcmoe_engine.config import ModelConfig, PrivacyConfig, WireConfig
from pcmoe_engine.dispatch import dispatch_rows, expand, plan_pairs, rows_per_owner, shuffle
from pcmoe_engine.model import Backbone, compute_loss
from pcmoe_engine.protocol import DistributedExperts, ExpertShard, Wire, clip_and_noise
from helpers import end_party

CFG = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=8,
                  top_k=2, expert_intermediate_size=48)
NOISE = PrivacyConfig(hidden_noise=0.5, grad_noise=0.5)  # clipped at each exchange's median norm


@pytest.fixture
def loopback(monkeypatch):
    """all_to_all_single between two parties that send each other the same rows: recv = send."""
    def all_to_all_single(recv, send, recv_splits, send_splits, group=None, async_op=False):
        recv.copy_(send)

    monkeypatch.setattr(dist, "all_to_all_single", all_to_all_single)


def test_noise_clipped_at_the_median_when_no_clip_is_given(loopback):
    rows = torch.randn(4001, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 2, 4001)[:, None]
    median = rows.norm(dim=1).median()
    got = Wire(0, 2, privacy=PrivacyConfig(hidden_noise=0.5), secret=1).exchange(
        "hidden", 0, rows, [0, 4001], [0, 4001]).wait()
    clipped = rows * (median / rows.norm(dim=1, keepdim=True)).clamp(max=1)
    assert abs((got - clipped).std().item() - 0.5 * median.item()) < 0.01 * median.item()


def test_copies_of_one_token_cross_as_shares_of_one_defended_row():
    """A token's rows to one host that are multiples of one vector (w_j * g) are defended once: what crosses
    is exactly collinear (no independent noise to average), each row its share of the largest, norm <= clip."""
    g = torch.randn(1, 16, generator=torch.Generator().manual_seed(0)) * 10
    other = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    rows = torch.cat([0.3 * g, 0.7 * g, other, 0.2 * g])
    copies = torch.tensor([0, 0, 2, 3])  # the last is the same token's row to another host: a group of its own
    out = clip_and_noise(rows, 1.0, 2.0, torch.Generator().manual_seed(5), copies)
    torch.testing.assert_close(out[0] / 0.3, out[1] / 0.7)
    assert not torch.allclose(out[3] / 0.2, out[1] / 0.7)  # the other host's noise is its own
    clipped = clip_and_noise(rows, 1.0, 0.0, None, copies)
    torch.testing.assert_close(clipped[1], g[0] / g.norm())  # the largest clipped to 1, the others its shares
    torch.testing.assert_close(clipped[0], 0.3 / 0.7 * g[0] / g.norm())
    identical = clip_and_noise(torch.cat([g, g]), 1.0, 2.0, torch.Generator().manual_seed(5), torch.tensor([0, 0]))
    assert torch.equal(identical[0], identical[1])  # a pair dispatch's copies arrive as one row, twice


def test_wire_state_continues_both_streams(loopback):
    """A wire restored from another's state_dict draws what the other draws next: the same noise and order."""
    rows, owner = torch.randn(50, 8), torch.tensor([0] * 20 + [1] * 30)
    wire = Wire(0, 2, privacy=NOISE)
    wire.exchange("hidden", 0, rows, [0, 50], [0, 50])
    wire.permutation(owner)
    resumed = Wire(0, 2, privacy=NOISE)
    resumed.load_state_dict(wire.state_dict())
    for w in (wire, resumed):
        w.drawn = (w.exchange("hidden", 0, rows, [0, 50], [0, 50]).wait(), w.permutation(owner))
    assert all(torch.equal(a, b) for a, b in zip(wire.drawn, resumed.drawn, strict=True))
    fresh = Wire(0, 2, privacy=NOISE, secret=wire.secret).exchange("hidden", 0, rows, [0, 50], [0, 50]).wait()
    assert not torch.equal(fresh, wire.drawn[0])  # the state moved on: the stream's start is never drawn again
    order = wire.drawn[1]
    assert sorted(order[:20].tolist()) == list(range(20)) and sorted(order[20:].tolist()) == list(range(20, 50))


@pytest.mark.parametrize("dispatch", ["token", "pair"])
def test_shuffle_moves_rows_with_their_masks_and_the_plan_with_them(dispatch):
    """The host's expansion of the shuffled rows yields the shuffled plan's slots: each pair slot's token is the
    token of the row the host expands it from, and its expert is the one the host runs."""
    gen = torch.Generator().manual_seed(2)
    tokens, parties, experts, k = 40, 3, 8, 3
    ids = torch.rand(tokens, experts, generator=gen).argsort(1)[:, :k]
    once = dispatch == "token"
    plan = plan_pairs(ids, parties, experts)
    counts = rows_per_owner(ids, parties, once)
    rows = dispatch_rows(ids, plan, parties, experts, once, int(counts.sum()))
    owner = torch.repeat_interleave(torch.arange(parties), counts)
    order = (owner.double() + torch.rand(owner.shape, dtype=torch.float64, generator=gen)).argsort()
    moved, moved_rows = shuffle(plan, rows, order)
    assert not torch.equal(moved_rows.token, rows.token)
    pair_start = 0
    row_start = 0
    for p in range(parties):
        n_rows, n_pairs = int(counts[p]), int(plan.tokens_per_expert[p])
        pair_row, local = expand(moved_rows.mask[row_start:row_start + n_rows], 3, n_pairs)
        slots = slice(pair_start, pair_start + n_pairs)
        assert torch.equal(moved.sorted_token[slots].long(), moved_rows.token[row_start + pair_row])
        expert = ids.reshape(-1)[moved.sorted_pair[slots].long()]
        assert torch.equal(expert // parties, local) and (expert % parties == p).all()
        pair_start, row_start = pair_start + n_pairs, row_start + n_rows
    flat = torch.arange(tokens * k)
    assert torch.equal(moved.sorted_pair[moved.slot_of_pair.reshape(-1).long()].long(), flat)  # inverse of each other


def _defended_party(rank, port, out_dir, options):
    """Forward and backward of one model through a defended wire, without and with activation checkpointing (each
    from the same secret): what the host received, the bytes sent, the gradients, the generators' states."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    backbone = Backbone(CFG)
    backbone.init_weights(torch.Generator().manual_seed(100 + rank))
    shard = ExpertShard(CFG, rank, 2)
    shard.init_weights(7)
    tokens = torch.randint(0, CFG.vocab_size, (3, 17), generator=torch.Generator().manual_seed(200 + rank))
    result = {}
    for checkpointing in (False, True):
        received, sent_tokens = [], []
        wire = Wire(rank, 2, dist.group.WORLD, privacy=NOISE, secret=1000 + rank,
                    observer=lambda kind, layer, rows, splits: received.append((kind, layer, rows.clone())))
        experts = DistributedExperts(shard, wire, options)
        experts.plan_observer = lambda layer, plan, rows: sent_tokens.append((plan, rows))
        backbone.zero_grad()
        shard.zero_grad()
        logits, routings = backbone(tokens[:, :-1], experts, checkpointing)
        compute_loss(logits, tokens[:, 1:], routings, 0.01, 0.001).total.backward()
        result[checkpointing] = {
            "received": received, "plans": sent_tokens[:CFG.num_layers], "bytes": dict(wire.bytes_sent),
            "logits": logits.detach(), "grads": [p.grad.clone() for p in [*backbone.parameters(), *shard.parameters()]],
            "generators": wire.state_dict()["generators"]}
    torch.save(result, os.path.join(out_dir, f"party{rank}.pt"))
    end_party()


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["token", "pair"])
def test_noise_is_drawn_once_per_token_and_host_and_never_for_a_recompute(dispatch, tmp_path, monkeypatch):
    """With noise on: a checkpointed run's recompute sends nothing and draws nothing, so the host receives exactly
    what it receives without checkpointing (bitwise), and the results are the same. Every copy of one token's
    hidden state at one host is the same noisy row, and its output-gradient rows there are multiples of one."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_defended_party, args=(free_port(), str(tmp_path), WireConfig(dispatch=dispatch)), nprocs=2)
    victim, host = (torch.load(tmp_path / f"party{p}.pt", weights_only=False) for p in range(2))
    for r in (victim, host):
        plain, checkpointed = r[False], r[True]
        assert plain["bytes"] == checkpointed["bytes"] and plain["bytes"]["hidden"] > 0
        assert plain["generators"].keys() == checkpointed["generators"].keys()
        assert all(torch.equal(plain["generators"][k], checkpointed["generators"][k]) for k in plain["generators"])
        assert [(k, layer) for k, layer, _ in plain["received"]] == [(k, layer) for k, layer, _ in
                                                                      checkpointed["received"]]
        assert all(torch.equal(a[2], b[2]) for a, b in zip(plain["received"], checkpointed["received"], strict=True))
        torch.testing.assert_close(checkpointed["logits"], plain["logits"], rtol=0, atol=0)
        for a, b in zip(checkpointed["grads"], plain["grads"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # What the host received from the victim (all of it: the host's own rows never cross), by the token each row
    # was, from the victim's wire order of that layer: its rows and pairs for party 1 come last.
    received = {(kind, layer): rows for kind, layer, rows in host[False]["received"]}
    for layer, (plan, rows) in enumerate(victim[False]["plans"]):
        hidden, grad = received["hidden", layer], received["output_grad", layer]
        row_token = rows.token[rows.token.numel() - hidden.shape[0]:]
        pair_token = plan.sorted_token[plan.sorted_token.numel() - grad.shape[0]:].long()
        assert row_token.numel() and pair_token.numel() > row_token.unique().numel()  # tokens with two pairs there
        for token in pair_token.unique():
            copies = hidden[row_token == token]
            assert copies.shape[0] == (1 if dispatch == "token" else int((pair_token == token).sum()))
            assert (copies == copies[0]).all()  # one noisy row, however many times it crosses
            grads = grad[pair_token == token]
            direction = grads[0] / grads[0].norm()
            torch.testing.assert_close(grads, (grads @ direction)[:, None] * direction, rtol=1e-5, atol=1e-7)


def _corrected_party(rank, port, out_dir):
    """One forward and backward through the wire undefended, then with noise on the hidden states and the public
    experts' correction, the host's experts still the public ones: the logits and the backbone's gradients."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    backbone = Backbone(CFG)
    backbone.init_weights(torch.Generator().manual_seed(100 + rank))
    shard, public = ExpertShard(CFG, rank, 2), ExpertShard(CFG)
    shard.init_weights(7)
    public.init_weights(7)  # the whole model's experts from the same seed: the shards' starting weights
    tokens = torch.randint(0, CFG.vocab_size, (3, 17), generator=torch.Generator().manual_seed(200 + rank))
    result = {}
    for name, privacy in (("plain", PrivacyConfig()),
                          ("corrected", PrivacyConfig(hidden_noise=0.5, grad_noise=0.0, public_correction=True))):
        received = []
        wire = Wire(rank, 2, dist.group.WORLD, privacy=privacy, secret=1000 + rank,
                    observer=lambda kind, layer, rows, splits: received.append((kind, rows.clone())))
        experts = DistributedExperts(shard, wire)
        if privacy.public_correction:
            experts.public_experts = tuple([w.detach() for w in ws] for ws in (public.w_gate_up, public.w_down))
        backbone.zero_grad()
        logits, routings = backbone(tokens[:, :-1], experts)
        compute_loss(logits, tokens[:, 1:], routings, 0.01, 0.001).total.backward()
        result[name] = {"logits": logits.detach(), "grads": [p.grad.clone() for p in backbone.parameters()],
                        "hidden": [rows for kind, rows in received if kind == "hidden"]}
    torch.save(result, os.path.join(out_dir, f"party{rank}.pt"))
    end_party()


@pytest.mark.slow
def test_public_correction_cancels_the_noise_while_the_experts_are_the_public_ones(tmp_path, monkeypatch):
    """privacy.public_correction: the origin adds f0(x) - f0(row sent) to what a host returns for it. While the
    host's experts are the public ones (f = f0, as at the first step of a fine-tuning), the outputs and the
    backbone's gradients are the undefended run's, though the rows that crossed carry noise as large as
    themselves."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_corrected_party, args=(free_port(), str(tmp_path)), nprocs=2)
    for p in range(2):
        r = torch.load(tmp_path / f"party{p}.pt", weights_only=False)
        plain, corrected = r["plain"], r["corrected"]
        for a, b in zip(plain["hidden"], corrected["hidden"], strict=True):  # the noise is there
            assert (b - a).norm() > 0.5 * a.norm()
        torch.testing.assert_close(corrected["logits"], plain["logits"], rtol=1e-4, atol=1e-4)
        for a, b in zip(corrected["grads"], plain["grads"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
