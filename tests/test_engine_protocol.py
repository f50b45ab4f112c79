"""The n-party forward and backward equal a single-process model built from the same weights, in every wire mode.

Each party (a process, gloo over 127.0.0.1) runs its own backbone on its own batch through the protocol,
then the same backbone with ALL experts in-process (csrc_triton.expert_mlp, no protocol) on the same batch.
Per party: logits and every backbone gradient match. Per owner: each local expert's gradient matches the
MEAN over parties of that expert's single-process gradients (each party's loss is the mean over its own tokens, and
the owner scales the sum by 1 / n: the mean over every party's tokens, protocol.py). n = 3 with 8 experts is the
uneven split. Every mode (dispatch once per (token, host) or per pair, combine at the origin or the host) and activation
checkpointing, with the rows in a secret order (privacy.shuffle, the default) and once without; the bytes of
each kind are exactly what the routing implies, and a checkpointed run's recompute sends nothing. With enough GPUs
the same runs over NCCL, one GPU per party, the kernels compiled (``gpu``).
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import csrc_triton as ct
from pcmoe_engine.cli import free_port
from pcmoe_engine.config import ModelConfig, PrivacyConfig, WireConfig
from pcmoe_engine.dispatch import mask_bytes
from pcmoe_engine.model import Backbone, compute_loss
from pcmoe_engine.protocol import (CONTROL_KINDS, TRAINING_KINDS, DistributedExperts, ExpertShard, Wire, WireLog,
                                   kinds_sent, owned_experts)
from helpers import end_party

CFG = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=8,
                  top_k=2, expert_intermediate_size=48, shared_intermediate_size=40, shared_expert_gate=True)
SEED = 7


class LocalExperts:
    """The oracle: every expert in this process, through csrc_triton's all-local weighted path."""

    def __init__(self, shard):
        self.shard = shard

    def __call__(self, layer, x, weights, expert_ids, concurrent=None):
        out = ct.expert_mlp(x, weights, expert_ids, self.shard.w_gate_up[layer], self.shard.w_down[layer])
        return out, concurrent() if concurrent is not None else None

    def recomputable(self, block):
        return block


def _grads(module):
    return {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for name, p in module.named_parameters()}


def _cpu(tree):
    """Tensors back on the CPU, for the test process to load."""
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_cpu(v) for v in tree]
    return tree.cpu() if torch.is_tensor(tree) else tree


def _party(rank, parties, port, out_dir, checkpointing, options, shuffle, backend):
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if parties > 1:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=parties)
    backbone = Backbone(CFG)
    backbone.init_weights(torch.Generator().manual_seed(100 + rank))  # every party its own backbone
    shard = ExpertShard(CFG, rank, parties)
    shard.init_weights(SEED)
    tokens = torch.randint(0, CFG.vocab_size, (3, 17), generator=torch.Generator().manual_seed(200 + rank))
    log = WireLog()
    wire = Wire(rank, parties, dist.group.WORLD if parties > 1 else None, log, PrivacyConfig(shuffle=shuffle))
    orders = []  # the order each layer's rows were sent in, by token
    if shuffle and parties > 1:
        permutation = wire.permutation
        wire.permutation = lambda owner: orders.append(permutation(owner)) or orders[-1]
    oracle_backbone, oracle_shard = copy.deepcopy(backbone), ExpertShard(CFG)
    oracle_shard.init_weights(SEED)
    for module in (backbone, shard, oracle_backbone, oracle_shard):
        module.to(device)
    tokens = tokens.to(device)

    result = {}
    for tag, net, experts in (("dist", backbone, DistributedExperts(shard, wire, options)),
                              ("oracle", oracle_backbone, LocalExperts(oracle_shard))):
        logits, routings = net(tokens[:, :-1], experts, activation_checkpointing=checkpointing)
        forward_bytes = dict(wire.bytes_sent)
        compute_loss(logits, tokens[:, 1:], routings, 0.1, 0.01).total.backward()
        result[tag] = {"logits": logits.detach(), "backbone": _grads(net), "forward_bytes": forward_bytes,
                       "bytes": dict(wire.bytes_sent), "expert_ids": [r.expert_ids for r in routings]}
    result["dist"]["experts"] = _grads(shard)
    result["oracle"]["experts"] = _grads(oracle_shard)

    # Skewed routing straight into the protocol: every pair goes to party 0, so the others receive nothing
    # and must still take part in every exchange, forward and backward. Each token picks two distinct experts of
    # party 0 (a top-k routing never picks an expert twice), in random order.
    gen = torch.Generator().manual_seed(300 + rank)
    x = torch.randn(5, CFG.hidden_size, generator=gen).to(device)
    ids = torch.tensor(owned_experts(0, parties, CFG.num_experts))[torch.rand(5, 2, generator=gen).argsort(1)]
    ids, weights = ids.to(device), torch.rand(5, 2, generator=gen).to(device)
    for tag, experts, expert_shard in (("dist", DistributedExperts(shard, wire, options), shard),
                                       ("oracle", LocalExperts(oracle_shard), oracle_shard)):
        expert_shard.zero_grad()
        xs = x.clone().requires_grad_()
        out, _ = experts(1, xs, weights, ids.int())
        (out * torch.arange(out.numel(), device=out.device).view_as(out).sin()).sum().backward()
        result[tag]["skewed"] = {"out": out.detach(), "x_grad": xs.grad, "experts": _grads(expert_shard)}

    result["orders"] = orders
    result = _cpu(result)
    result["wire"] = {"entries": log.entries, "sent": wire.total_sent, "received": wire.total_received}
    torch.save(result, os.path.join(out_dir, f"party{rank}.pt"))
    end_party()


def _expected_sent(expert_ids, party, parties, options):
    """What one party sends as an origin in one forward and backward, by kind, from its routing alone."""
    hidden, width = CFG.hidden_size * 4, mask_bytes(CFG.num_experts, parties)  # fp32 rows
    sent = dict.fromkeys(("splits", "hidden", "expert_mask", "output_grad", "routing_weights"), 0)
    for ids in expert_ids:
        owner = ids.long() % parties
        pairs = sum(int((owner == p).sum()) for p in range(parties) if p != party)
        rows = sum(int((owner == p).any(1).sum()) for p in range(parties) if p != party)
        rows = rows if options.dispatch == "token" else pairs
        sent["splits"] += 2 * 8 * (parties - 1)
        sent["hidden"] += rows * hidden
        sent["expert_mask"] += rows * width
        sent["output_grad"] += (rows if options.combine == "host" else pairs) * hidden
        sent["routing_weights"] += pairs * 4 if options.combine == "host" else 0
    return sent


MODES = {"token": WireConfig(), "pair": WireConfig(dispatch="pair"), "token+host": WireConfig(combine="host"),
         "pair+host": WireConfig(dispatch="pair", combine="host"), "token, unshuffled": WireConfig()}


@pytest.mark.slow
@pytest.mark.parametrize("parties,checkpointing,mode", [
    (1, False, "token"), (2, False, "token"), (3, False, "token"), (4, False, "token"), (2, True, "token"),
    (1, False, "pair+host"), (2, False, "pair"), (3, False, "token+host"), (4, False, "pair+host"),
    (3, True, "token+host"), (2, True, "pair"), (3, False, "token, unshuffled")])
def test_parties_equal_single_process(parties, checkpointing, mode, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # spawned parties run csrc_triton's CPU references
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    check_parties(parties, checkpointing, mode, "gloo", tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("parties,checkpointing,mode", [(2, False, "token"), (3, False, "pair+host"),
                                                        (2, True, "token")])
def test_parties_equal_single_process_over_nccl(parties, checkpointing, mode, tmp_path):
    """One GPU per party, the kernels compiled, fp32: the distributed and all-local paths run different kernels
    (grouped GEMM and combine, or the fused expert_mlp), so they agree to fp32 rounding, not bitwise."""
    if torch.cuda.device_count() < parties:
        pytest.skip(f"needs {parties} GPUs")
    check_parties(parties, checkpointing, mode, "nccl", tmp_path, rtol=1e-4, atol=1e-5)


def check_parties(parties, checkpointing, mode, backend, tmp_path, rtol=1e-5, atol=1e-6):
    def _close(a, b, what):
        assert a.shape == b.shape, what
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")

    options, shuffle = MODES[mode], "unshuffled" not in mode
    mp.spawn(_party, args=(parties, free_port(), str(tmp_path), checkpointing, options, shuffle, backend),
             nprocs=parties)
    results = [torch.load(tmp_path / f"party{p}.pt", weights_only=False) for p in range(parties)]
    # Shuffled, each layer's call drew one fresh order (a checkpointed recompute none), and it moved rows.
    for r in results:  # the full model's MoE layers, then the skewed call
        assert len(r["orders"]) == (CFG.num_layers + 1 if shuffle and parties > 1 else 0)
        assert not shuffle or parties == 1 or any(not torch.equal(o, o.sort().values) for o in r["orders"])

    for p, r in enumerate(results):
        _close(r["dist"]["logits"], r["oracle"]["logits"], f"party {p} logits")
        for name, grad in r["dist"]["backbone"].items():
            _close(grad, r["oracle"]["backbone"][name], f"party {p} backbone grad {name}")
        _close(r["dist"]["skewed"]["out"], r["oracle"]["skewed"]["out"], f"party {p} skewed out")
        _close(r["dist"]["skewed"]["x_grad"], r["oracle"]["skewed"]["x_grad"], f"party {p} skewed x grad")

    # An owner's expert gradients gather the contributions of every party's tokens: their mean (before the expert
    # gradient scale was defined, issue 14, the sum; the owner now scales it by 1 / n, protocol.py).
    for phase in ("full", "skewed"):
        for owner, r in enumerate(results):
            local = r["dist"]["experts"] if phase == "full" else r["dist"]["skewed"]["experts"]
            for j, expert in enumerate(owned_experts(owner, parties, CFG.num_experts)):
                for name in ("w_gate_up", "w_down"):
                    for layer in range(CFG.num_layers):
                        key = f"{name}.{layer}"
                        mean = sum((q["oracle"]["experts"] if phase == "full" else
                                    q["oracle"]["skewed"]["experts"])[key][expert] for q in results) / parties
                        _close(local[key][j], mean, f"{phase}: owner {owner} expert {expert} {key}")

    # Only the allowed kinds of this mode crossed, and every byte sent was received.
    sent = sum(r["wire"]["sent"] for r in results)
    assert sent == sum(r["wire"]["received"] for r in results)
    assert (sent > 0) == (parties > 1)
    kinds = kinds_sent(options) - set(CONTROL_KINDS)  # the protocol alone: no steps, so no votes
    dtypes = {"splits": "int64", "expert_mask": "uint8"}
    for p, r in enumerate(results):
        entries = r["wire"]["entries"]
        assert {e.kind for e in entries} == (kinds if parties > 1 else set()) and kinds <= set(TRAINING_KINDS)
        assert all(e.src != e.dst and p in (e.src, e.dst) for e in entries)
        assert all(e.dtype == dtypes.get(e.kind, "float32") for e in entries)
        assert sum(e.bytes for e in entries if e.src == p) == r["wire"]["sent"]

    # The bytes of the full model's forward and backward are exactly what each party's routing implies; with
    # checkpointing the recompute sent nothing: the forward's bytes are all the forward kinds ever sent.
    if parties > 1:
        for p, r in enumerate(results):
            dist_run = r["dist"]
            expected = _expected_sent(dist_run["expert_ids"], p, parties, options)
            assert {k: dist_run["bytes"][k] for k in expected} == expected
            for kind in ("splits", "hidden", "expert_mask", "output", "routing_weights"):
                assert dist_run["bytes"][kind] == dist_run["forward_bytes"][kind], kind
        for back, forth in (("hidden_grad", "hidden"), ("output", "output_grad"),
                            ("routing_weights_grad", "routing_weights")):
            assert sum(r["dist"]["bytes"][back] for r in results) == sum(r["dist"]["bytes"][forth] for r in results)


def test_nan_hidden_states_stay_in_range_through_the_protocol():
    """A NaN hidden state (a party diverging) makes a NaN router row: the router's ids stay in range (under the
    Triton interpreter: the kernel's), so the protocol's indexing (wire positions, plan, grouped GEMM) stays in
    bounds and only that token's output is NaN."""
    shard = ExpertShard(CFG)
    shard.init_weights(SEED)
    x = torch.randn(6, CFG.hidden_size, generator=torch.Generator().manual_seed(0))
    x[2] = float("nan")
    router = torch.nn.Linear(CFG.hidden_size, CFG.num_experts, bias=False)
    routing = ct.route(router(x), CFG.top_k)
    assert ((routing.expert_ids >= 0) & (routing.expert_ids < CFG.num_experts)).all()
    out, _ = DistributedExperts(shard, Wire())(0, x, routing.weights, routing.expert_ids)
    assert out[2].isnan().all() and out[[0, 1, 3, 4, 5]].isfinite().all()
