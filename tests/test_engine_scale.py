"""Issue 13's pieces on their own: the fp8 wire codec, the dispatch order both sides compute, the tape that
replays a checkpointed block, the exchange timer, the optimizer options, CPU placement and their config checks."""

import json
import math
import re

import pytest
import torch

import csrc_triton as ct
from pcmoe_engine.config import load_config
from pcmoe_engine.dispatch import dispatch_rows, expand, mask_bytes, plan_pairs, rows_per_owner
from pcmoe_engine.optim import StepInBackward, build_optimizer
from pcmoe_engine.party import Party
from pcmoe_engine.placement import parse_cpulist, party_cpus
from pcmoe_engine.wire import ExchangeTimer, Tape, Wire, pack_fp8, unpack_fp8
from helpers import end_party


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PCMOE_CACHE", str(tmp_path_factory.getbasetemp() / "pcmoe-cache"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_round_trip_error_bound(dtype):
    gen = torch.Generator().manual_seed(0)
    rows = (torch.randn(64, 96, generator=gen) * torch.logspace(-3, 3, 64).unsqueeze(1)).to(dtype)
    rows[3] = 0  # a zero row stays zero
    packed = pack_fp8(rows)
    assert packed.dtype == torch.uint8 and packed.shape == (64, 96 + 4)
    back = unpack_fp8(packed, dtype)
    assert back.dtype == dtype and torch.equal(back[3], rows[3])
    scale = rows.float().abs().amax(1, keepdim=True) / 448
    # e4m3: 3 mantissa bits, so half an ulp is 2^-4 relative; below 2^-6 (subnormal) the step is 2^-9 of the
    # scale, half of it 2^-10; then the result is rounded to the rows' dtype.
    bound = rows.float().abs() * 2**-4 + scale * 2**-10
    rounding = back.float().abs() * (2**-8 if dtype == torch.bfloat16 else 0)
    assert ((back.float() - rows.float()).abs() <= bound + rounding).all()
    assert ((back.float() - rows.float()).abs() > 0).any()  # it does quantise


def _routing(tokens=40, k=3, experts=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(tokens, experts, generator=gen).argsort(1)[:, :k]


@pytest.mark.parametrize("parties", [1, 2, 3, 4])
@pytest.mark.parametrize("once", [True, False])
def test_host_expansion_is_the_origin_wire_order(parties, once):
    """What a host rebuilds from the rows and masks alone is, pair for pair, the origin's wire order."""
    experts = 10
    ids = _routing(experts=experts)
    plan = plan_pairs(ids, parties, experts)
    owner, local = ids % parties, ids // parties
    # The wire order: owner, then token, then local expert.
    keys = [(int(owner.flatten()[p]), int(p) // ids.shape[1], int(local.flatten()[p])) for p in plan.sorted_pair]
    assert keys == sorted(keys)
    counts = rows_per_owner(ids, parties, once)
    rows = dispatch_rows(ids, plan, parties, experts, once, int(counts.sum()))
    assert rows.mask.shape == (int(counts.sum()), mask_bytes(experts, parties))
    starts = [0, *counts.cumsum(0).tolist()]
    for p in range(parties):
        segment = slice(starts[p], starts[p + 1])
        pairs = plan.sorted_pair[plan.offsets[p]:plan.offsets[p + 1]].long()
        pair_row, pair_local = expand(rows.mask[segment], math.ceil(experts / parties), pairs.numel())
        assert torch.equal(rows.token[segment][pair_row], pairs // ids.shape[1])
        assert torch.equal(pair_local, local.flatten()[pairs])
        if once:  # one row per (token, host), tokens in order
            tokens = (owner == p).any(1).nonzero().squeeze(1)
            assert torch.equal(rows.token[segment], tokens)
        else:
            assert pair_row.tolist() == list(range(pairs.numel()))


def test_dispatch_once_saves_exactly_the_repeated_rows():
    ids = _routing(tokens=200, k=4, experts=16)
    for parties in (2, 4):
        once, per_pair = rows_per_owner(ids, parties, True), rows_per_owner(ids, parties, False)
        assert per_pair.sum() == ids.numel()
        distinct = [len({int(t) for t, row in enumerate(ids % parties) if p in row.tolist()}) for p in range(parties)]
        assert once.tolist() == distinct and (once < per_pair).all()


def test_tape_replays_in_order_and_refuses_extra_exchanges(monkeypatch):
    sends = []
    monkeypatch.setattr(torch.distributed, "all_to_all_single",
                        lambda recv, send, *a, **k: (sends.append(send.clone()), recv.copy_(send * 2))[0])
    wire, tape = Wire(0, 2), Tape()
    wire.tape = tape
    rows = torch.arange(6.0).view(3, 2)
    first = wire.exchange("hidden", 0, rows, [1, 2], [1, 2]).wait()
    route = wire.kept(lambda: [wire.exchange("splits", 0, torch.ones(4, dtype=torch.int64), [2, 2], [2, 2]).wait(),
                               "sizes"])
    assert len(sends) == 2 and len(tape.items) == 2  # the splits inside the kept route are part of that item
    sent_bytes = wire.total_sent
    tape.replaying = True
    replayed = wire.exchange("hidden", 0, rows + 1, [1, 2], [1, 2]).wait()  # not sent: what arrived then
    assert torch.equal(replayed, first) and replayed.data_ptr() == first.data_ptr() and replayed is not first
    assert wire.kept(lambda: pytest.fail("a replay runs nothing")) is route
    assert len(sends) == 2 and wire.total_sent == sent_bytes and tape.items == []  # freed once replayed
    with pytest.raises(RuntimeError, match="recompute exchanged more than its forward"):
        wire.exchange("hidden", 0, rows, [1, 2], [1, 2])


def test_exchange_timer_windows_and_exposed_time_on_cpu():
    timer = ExchangeTimer(torch.device("cpu"))

    class Work:
        def wait(self):
            torch.randn(300, 300) @ torch.randn(300, 300)

    record = timer.launched("hidden", 3, 100, 50)
    torch.randn(200, 200) @ torch.randn(200, 200)
    timer.wait(record, Work())
    (got,) = timer.collect()
    assert (got["kind"], got["layer"], got["bytes_sent"], got["bytes_received"]) == ("hidden", 3, 100, 50)
    assert got["window_s"] > 0 and got["exposed_s"] > 0 and timer.collect() == []
    assert timer.host_blocked_s == 0.0
    assert timer.host_sync(lambda: (torch.randn(300, 300) @ torch.randn(300, 300)).sum().item()) is not None
    assert timer.host_blocked_s > 0


TINY = ["model.hidden_size=32", "model.num_layers=2", "model.expert_intermediate_size=32", "data.seq_len=16",
        "train.batch_size=2", "train.warmup_steps=1", "train.checkpoints=false", "parties=1"]


def test_step_in_backward_equals_adamw_without_clipping(tmp_path, monkeypatch):
    """Stepping each parameter in backward gives the same parameters as AdamW after the whole backward."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    base = [*TINY, f"train.out_dir={tmp_path}", "train.grad_clip=0"]
    plain, released = (Party(load_config(None, base + extra), 0)
                       for extra in ([], ["train.optimizer_in_backward=true"]))
    assert isinstance(released.optimizer, StepInBackward)
    for _ in range(3):
        records = [plain.step(), released.step()]
    assert math.isclose(records[0]["grad_norm"], records[1]["grad_norm"], rel_tol=1e-5)
    for a, b in zip(plain.backbone.parameters(), released.backbone.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for p in released.backbone.parameters())  # no gradient outlives its step
    assert len(released.optimizer.state) == len(plain.optimizer.state)
    released.optimizer.load_state_dict(released.optimizer.state_dict())


def test_step_in_backward_clips_each_share_so_the_global_norm_is_bounded():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 12, 1)]
    seen = {}

    def make(groups):  # plain SGD with lr 1: the step is the clipped gradient itself
        opt = torch.optim.SGD(groups, lr=1.0)
        seen[groups[0]["params"][0]] = opt
        return opt

    opt = StepInBackward([{"params": params}], make, [(params, 0.5)])
    loss = sum((p * torch.full_like(p, 10.0)).sum() for p in params)
    loss.backward()
    assert all(p.grad is None for p in params)
    steps = [-p.detach() for p in params]
    assert torch.cat(steps).norm() <= 0.5 + 1e-6
    for p, step in zip(params, steps, strict=True):
        assert math.isclose(step.norm().item(), 0.5 * math.sqrt(p.numel() / 16), rel_tol=1e-5)
    assert math.isclose(opt.grad_norms()[0].item(), 10 * 4.0, rel_tol=1e-6)


def test_fused_optimizer_only_on_cuda():
    cfg = load_config(None, TINY)
    opt = build_optimizer(cfg, [torch.nn.Linear(4, 4)], "cpu")
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults["fused"]


@pytest.mark.slow
def test_fp8_wire_trains(tmp_path, monkeypatch):
    """Both fp8 options on, 2 parties in two processes: the loss falls as far as test_engine_train's run."""
    from pcmoe_engine.cli import main as pcmoe

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    overrides = ["model.hidden_size=64", "model.num_layers=2", "model.expert_intermediate_size=64",
                 "model.shared_intermediate_size=32", "data.seq_len=32", "train.batch_size=4", "train.log_every=100",
                 "train.eval_batches=2", "train.steps=40", "train.warmup_steps=5", "train.checkpoints=false",
                 f"train.out_dir={tmp_path}", "train.name=fp8", "wire.hidden_dtype=fp8", "wire.grad_dtype=fp8"]
    pcmoe(["train", "--parties", "2"] + [a for o in overrides for a in ("--set", o)])
    summary = json.loads((tmp_path / "fp8" / "summary.json").read_text())
    for p in range(2):
        assert summary["final_loss"][p] < summary["initial_loss"][p] - 1.0
        assert summary["eval_loss"][p] < summary["initial_loss"][p] - 1.0
        kinds = json.loads((tmp_path / "fp8" / f"party{p}" / "summary.json").read_text())["bytes_sent_by_kind"]
        assert kinds["hidden_fp8"] > 0 and kinds["output_grad_fp8"] > 0 and kinds["hidden"] == kinds["output_grad"] == 0


def test_parse_cpulist_and_party_cpus(tmp_path, monkeypatch):
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11] and parse_cpulist("") == []
    nodes = tmp_path / "devices" / "system" / "node"
    for node, cpulist in ((0, "0-7"), (1, "8-15")):
        (nodes / f"node{node}").mkdir(parents=True)
        (nodes / f"node{node}" / "cpulist").write_text(cpulist)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    gpu_nodes = [0, 0, 1, None]  # two GPUs share node 0, one on node 1, one unknown
    assert party_cpus(0, gpu_nodes, tmp_path) == [0, 1, 2, 3]
    assert party_cpus(1, gpu_nodes, tmp_path) == [4, 5, 6, 7]
    assert party_cpus(2, gpu_nodes, tmp_path) == list(range(8, 16))
    assert party_cpus(3, gpu_nodes, tmp_path) is None
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 9})  # a cpuset leaves fewer cores
    assert party_cpus(0, gpu_nodes, tmp_path) == [0] and party_cpus(1, gpu_nodes, tmp_path) == [1]


@pytest.mark.parametrize("overrides,message", [
    (["wire.dispatch=tokens"], "wire.dispatch='tokens': choose token or pair"),
    (["wire.combine=both"], "wire.combine='both': choose origin or host"),
    (["wire.hidden_dtype=fp4"], "wire.hidden_dtype='fp4': choose auto or fp8"),
    (["train.optimizer_in_backward=true", "train.grad_accum=2"], "train.optimizer_in_backward steps each parameter"),
    (["wire.chunks=2"], "unknown option wire.chunks"),
])
def test_scale_config_errors(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, overrides)


def test_eight_bit_optimizer_needs_bitsandbytes(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    needs = "train.optimizer_8bit needs bitsandbytes: pip install 'pcmoe[memory]'"
    with pytest.raises(ValueError, match=re.escape(needs)):
        load_config(None, ["train.optimizer_8bit=true"])


def test_plan_pairs_unpermutes_like_the_expert_order_plan():
    """The wire-order plan combines outputs exactly as csrc_triton's own plan does."""
    ids = _routing(tokens=30, k=3, experts=8)
    weights = torch.rand(30, 3)
    per_pair = torch.randn(90, 5)  # an output per pair t*k + j
    results = []
    for plan in (plan_pairs(ids, 3, 8), ct.plan_routing(ids, 8)):
        y_sorted = per_pair[plan.sorted_pair.long()]
        results.append(ct.unpermute(y_sorted, plan, weights))
    torch.testing.assert_close(*results)


def test_eight_bit_optimizer_trains_with_a_quarter_of_the_state(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    base = [*TINY, f"train.out_dir={tmp_path}", "model.hidden_size=64", "model.expert_intermediate_size=64"]
    plain, small = (Party(load_config(None, base + extra), 0) for extra in ([], ["train.optimizer_8bit=true"]))
    for party in (plain, small):
        losses = [party.step()["loss"] for _ in range(8)]
        assert losses[-1] < losses[0]
    state = {name: party.summary()["memory"]["optimizer_state_bytes"] for name, party in (("fp32", plain),
                                                                                         ("8bit", small))}
    assert state["8bit"] < 0.4 * state["fp32"]  # 2 of 8 bytes per element, plus scales and the small tensors


def _checkpointed_fp8_party(rank, port, out_dir):
    import os

    import torch.distributed as dist

    from pcmoe_engine.config import ModelConfig, WireConfig
    from pcmoe_engine.model import Backbone, compute_loss
    from pcmoe_engine.protocol import DistributedExperts, ExpertShard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, num_experts=8,
                      top_k=3, expert_intermediate_size=24)
    backbone, shard = Backbone(cfg), ExpertShard(cfg, rank, 2)
    backbone.init_weights(torch.Generator().manual_seed(rank))
    shard.init_weights(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(10 + rank))
    wire = Wire(rank, 2, dist.group.WORLD)
    options = WireConfig(combine="host", hidden_dtype="fp8", grad_dtype="fp8")
    result = {}
    secret = wire.state_dict()
    for checkpointing in (False, True):
        wire.load_state_dict(secret)  # both passes send their rows in the same secret order (privacy.shuffle)
        backbone.zero_grad()
        shard.zero_grad()
        before = dict(wire.bytes_sent)
        logits, routings = backbone(tokens[:, :-1], DistributedExperts(shard, wire, options), checkpointing)
        compute_loss(logits, tokens[:, 1:], routings, 0.01, 0.001).total.backward()
        result[checkpointing] = {"logits": logits.detach(),
                                 "grads": [p.grad.clone() for p in [*backbone.parameters(), *shard.parameters()]],
                                 "bytes": {k: wire.bytes_sent[k] - before[k] for k in before}}
    torch.save(result, os.path.join(out_dir, f"party{rank}.pt"))
    end_party()


@pytest.mark.slow
def test_checkpointed_fp8_run_replays_bitwise_and_sends_nothing_again(tmp_path, monkeypatch):
    """With fp8 rows, combine at the host and activation checkpointing, the recompute replays what crossed:
    the same logits and gradients as without checkpointing, and not one byte more of any kind."""
    import torch.multiprocessing as mp

    from pcmoe_engine.cli import free_port

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_checkpointed_fp8_party, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"party{rank}.pt", weights_only=False)
        plain, checkpointed = result[False], result[True]
        assert plain["bytes"] == checkpointed["bytes"] and plain["bytes"]["hidden_fp8"] > 0
        torch.testing.assert_close(checkpointed["logits"], plain["logits"], rtol=0, atol=0)
        for a, b in zip(checkpointed["grads"], plain["grads"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("dispatch,combine", [("token", "origin"), ("pair", "origin"), ("token", "host")])
def test_dispatch_and_experts_on_the_gpu(dispatch, combine):
    """The wire order, rows and expansion on CUDA equal the CPU's, and one party's experts through the protocol's
    path (no wire) equal csrc_triton's expert_mlp in bf16."""
    from pcmoe_engine.config import ModelConfig, WireConfig
    from pcmoe_engine.protocol import DistributedExperts, ExpertShard

    ids = _routing(tokens=300, k=8, experts=64, seed=3)
    for parties in (1, 4):
        once = dispatch == "token"
        cpu_plan, gpu_plan = plan_pairs(ids, parties, 64), plan_pairs(ids.cuda(), parties, 64)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu_plan, gpu_plan, strict=True))
        total = int(rows_per_owner(ids, parties, once).sum())
        cpu_rows = dispatch_rows(ids, cpu_plan, parties, 64, once, total)
        gpu_rows = dispatch_rows(ids.cuda(), gpu_plan, parties, 64, once, total)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu_rows, gpu_rows, strict=True))
        pairs = expand(gpu_rows.mask, math.ceil(64 / parties), ids.numel())
        assert all(torch.equal(a.cpu(), b) for a, b in zip(pairs, expand(cpu_rows.mask, math.ceil(64 / parties),
                                                                          ids.numel()), strict=True))
    cfg = ModelConfig(hidden_size=256, num_experts=64, top_k=8, expert_intermediate_size=128, num_layers=1)
    shard = ExpertShard(cfg)
    shard.init_weights(0)
    shard.cuda()
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weights = torch.rand(300, 8, device="cuda")
    experts = DistributedExperts(shard, Wire(), WireConfig(dispatch=dispatch, combine=combine))
    out, _ = experts(0, x, weights, ids.cuda().int())
    ref = ct.expert_mlp(x, weights, ids.cuda().int(), shard.w_gate_up[0].to(torch.bfloat16),
                        shard.w_down[0].to(torch.bfloat16))
    assert (out.float() - ref.float()).norm() / ref.float().norm() < 2e-2
    out.float().square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(shard.w_down[0].grad).all()
    rows = torch.randn(64, 2048, device="cuda")
    back = unpack_fp8(pack_fp8(rows), torch.float32)
    scale = rows.abs().amax(1, keepdim=True) / 448
    assert ((back - rows).abs() <= rows.abs() * 2**-4 + scale * 2**-10).all()
