"""Privacy: the wire audit of a real 2-party training run and of pooling the experts at export, the defences on
the wire, and the attack harness."""

import json
import math
import os
import re
import shutil
import socket
import ssl
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import csrc_triton as ct
from bench import privacy
from bench.tls import make_pki
from pcmoe_engine import lockstep
from pcmoe_engine.cli import free_port
from pcmoe_engine.config import SHARED_START_NOISE, ModelConfig, PrivacyConfig, load_config
from pcmoe_engine.data import encode, load_tokenizer, party_texts
from pcmoe_engine.export import pool_experts
from pcmoe_engine.lockstep import PER_PARTY, PROTOCOL_VERSION
from pcmoe_engine.metrics import start_line
from pcmoe_engine.party import Party, initial_backbone
from pcmoe_engine.protocol import (CONTROL_KINDS, TRAINING_KINDS, WIRE_KINDS, ExpertShard, Wire, WireLog,
                                   clip_and_noise, kinds_sent, unpack_fp8)
from pcmoe_engine.tls import ACCEPTED, FRAME, HELLO, TLSMesh
from pcmoe_engine.train import train
from pcmoe_engine.transport import TorchTransport
from helpers import end_party

# Every torch.distributed call that could move data (or synchronise) between parties.
COLLECTIVES = ("all_to_all_single", "all_to_all", "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter", "reduce_scatter_tensor", "reduce", "gather", "scatter", "send", "recv", "isend",
               "irecv", "batch_isend_irecv", "barrier", "monitored_barrier", "all_gather_object",
               "broadcast_object_list", "gather_object", "scatter_object_list", "send_object_list",
               "recv_object_list")
AUDIT = ["parties=2", "model.hidden_size=32", "model.num_layers=2", "model.expert_intermediate_size=32",
         "model.shared_intermediate_size=16", "data.seq_len=16", "train.batch_size=2", "train.steps=2",
         "train.warmup_steps=1", "train.eval_batches=1", "train.log_every=100", "train.wire_log=true",
         "privacy.hidden_clip=1.0", "privacy.grad_clip=1e-4",
         "train.device=cpu"]  # the fp32 rows over gloo the audit counts; the GPUs' path: test_engine_protocol (NCCL)
PATHS = ("data.corpus", "train.out_dir")  # set in the audit run, and no option that crosses has their values


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PCMOE_CACHE", str(tmp_path_factory.getbasetemp() / "pcmoe-cache"))


def _record_collectives():
    """Wrap every collective (in this process) to record each call, and the Wire.exchange kind it came from.
    Returns the calls recorded and the wrapper (for other transports' all_to_all_single)."""
    calls, inside = [], []
    exchange = Wire.exchange

    def logged_exchange(self, kind, *args, **kwargs):
        inside.append(kind)
        try:
            return exchange(self, kind, *args, **kwargs)
        finally:
            inside.pop()

    def wrap(via, name, collective, method=False):
        def audited(*args, **kwargs):
            call = {"via": via, "name": name, "kind": inside[-1] if inside else None}
            if name == "all_to_all_single":
                recv, send, recv_splits, send_splits = args[method:method + 4]
                call.update(send=send.detach().clone(), send_splits=list(send_splits))
            calls.append(call)
            return collective(*args, **kwargs)
        return audited

    Wire.exchange = logged_exchange
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap("dist", name, getattr(dist, name)))
    return calls, wrap


def _audited_party(rank, out_dir, ports, pki, wire_options):
    """Train as one party with every collective wrapped: record each call, and the exchange it came from. With
    ``pki``, over the TLS transport (no process group), every write to a socket is counted too."""
    torch.set_num_threads(1)
    calls, wrap = _record_collectives()
    written, plaintext = [], []

    def counted(into, write):
        def audited(self, data, *args, **kwargs):
            n = write(self, data, *args, **kwargs)
            into.append(n if isinstance(n, int) else memoryview(data).nbytes)  # sendall returns None
            return n
        return audited

    cfg = load_config(None, AUDIT + wire_options + [f"train.out_dir={out_dir}", "train.name=audit"])
    if pki is None:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=2)
        transport = TorchTransport()
    else:
        TLSMesh.all_to_all_single = wrap("tls", "all_to_all_single", TLSMesh.all_to_all_single, method=True)
        for name in ("send", "write"):  # SSLSocket.sendall writes through send
            setattr(ssl.SSLSocket, name, counted(written, getattr(ssl.SSLSocket, name)))
        for name in ("send", "sendall", "sendto", "sendmsg", "sendfile"):  # nothing leaves outside TLS
            setattr(socket.socket, name, counted(plaintext, getattr(socket.socket, name)))
        transport = TLSMesh(rank, [("127.0.0.1", port) for port in ports], f"{pki}/party{rank}.crt",
                            f"{pki}/party{rank}.key", f"{pki}/ca.crt", "audit", 60)
    try:
        train(cfg, rank, transport)
    finally:
        transport.close()
    torch.save({"calls": calls, "written": written, "plaintext": plaintext}, os.path.join(out_dir, f"calls{rank}.pt"))
    end_party()


def _frame_bytes(calls, party):
    """What a party's all_to_all_single calls hand the TLS connections: per call, a frame to the other party
    (header and its rows)."""
    return sum(FRAME.size + c["send_splits"][1 - party] * math.prod(c["send"].shape[1:]) * c["send"].element_size()
               for c in calls)


@pytest.mark.slow
@pytest.mark.parametrize("transport,wire_options", [
    ("torch", []), ("torch", ["wire.combine=host", "wire.hidden_dtype=fp8", "wire.grad_dtype=fp8"]), ("tls", [])],
    ids=["default", "host-combine-fp8", "tls"])
def test_wire_audit_of_a_two_party_training_run(transport, wire_options, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    if transport == "tls" and shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    pki = str(make_pki(tmp_path / "pki", 2, "audit")) if transport == "tls" else None
    mp.spawn(_audited_party, args=(str(tmp_path), [free_port(), free_port()], pki, wire_options), nprocs=2)
    cfg = load_config(None, AUDIT + wire_options + [f"train.out_dir={tmp_path}", "train.name=audit"])
    run_options = lockstep.options(cfg.to_dict())
    hidden = cfg.model.hidden_size
    tokens_per_pass = cfg.train.batch_size * cfg.data.seq_len
    pairs_per_pass = tokens_per_pass * cfg.model.top_k
    kinds = kinds_sent(cfg.wire)
    combine_at_host = cfg.wire.combine == "host"
    for party in range(2):
        record = torch.load(tmp_path / f"calls{party}.pt", weights_only=False)
        calls = record["calls"]
        # Nothing bypasses Wire.exchange: its all_to_all_single is the only collective a training run calls (on
        # the TLS transport: the mesh's, and no torch.distributed call at all).
        assert {(c["via"], c["name"]) for c in calls} == {("dist" if pki is None else "tls", "all_to_all_single")}
        if pki is not None:  # every byte written to a connection is a hello or a frame of those calls; none in clear
            assert sum(record["written"]) == HELLO.size + len(ACCEPTED) + _frame_bytes(calls, party)
            assert record["plaintext"] == []
        assert {c["kind"] for c in calls} == kinds <= set(TRAINING_KINDS)
        sizes = None  # the last splits this party sent: [rows, pairs] for each owner
        for c in calls:
            send, splits = c["send"], c["send_splits"]
            if c["kind"] in CONTROL_KINDS:  # numbers about the run, the same int64 row to every party: no data
                row = send[:splits[0]]
                assert send.dtype == torch.int64 and splits == [len(row)] * 2
                assert torch.equal(send, row.repeat(2))
                if c["kind"] == "health":  # step, non-finite flags, last step saved (-1: none yet)
                    assert len(row) == 3 and row[1] == 0 and row[2] in (-1, cfg.train.steps)
                elif len(row) == 4:  # handshake header: version, options digest, not resuming, no steps held
                    assert row[0] == PROTOCOL_VERSION and row[2:].tolist() == [0, 0]
                else:  # one digest per option all parties must share (and the precision); paths never cross
                    assert len(row) == len([n for n in run_options if n not in PER_PARTY]) + 1
                    assert not {lockstep._digest(run_options[n]) for n in PATHS} & set(row.tolist())
                continue
            if c["kind"] == "splits":  # rows and pairs per owner, one pair of counts each: no ids, no positions
                assert send.dtype == torch.int64 and send.shape == (4,) and splits == [2, 2]
                assert send[1::2].sum() == pairs_per_pass and (send[0::2] <= tokens_per_pass).all()
                sizes = send.view(2, 2)
                continue
            assert splits[party] == 0  # a party's rows for its own experts never go through the wire
            assert send.shape[0] == sum(splits)
            if c["kind"] == "expert_mask":  # one byte per row (4 local experts): which of them the row picked
                assert send.dtype == torch.uint8 and send.shape[1:] == (1,)
                assert ((send > 0) & (send < 16)).all()
            elif c["kind"].startswith("routing_weights"):  # one fp32 weight per pair
                assert combine_at_host and send.dtype == torch.float32 and send.dim() == 1
            elif c["kind"].endswith("_fp8"):  # e4m3 bytes and a 4-byte scale per row
                assert send.dtype == torch.uint8 and send.shape[1:] == (hidden + 4,)
            else:
                assert send.dtype == torch.float32 and send.shape[1:] == (hidden,)
            if c["kind"] in ("hidden", "hidden_fp8", "expert_mask", "routing_weights"):  # as announced in the splits
                assert send.shape[0] == sizes[1 - party, 1 if c["kind"] == "routing_weights" else 0]
            rows = unpack_fp8(send, torch.float32) if c["kind"].endswith("_fp8") else send
            if c["kind"].startswith("hidden") and c["kind"] != "hidden_grad":  # the defence runs on the wire
                assert (rows.norm(dim=1) <= 1.0 * (1 + 2**-3)).all()
            if c["kind"].startswith("output_grad"):
                assert (rows.norm(dim=1) <= 1e-4 * (1 + 2**-3)).all()
        # The party's wire log holds the same traffic, entry by entry, in the allowed kinds only.
        lines = (tmp_path / "audit" / f"party{party}" / "wire.jsonl").read_text().splitlines()
        entries = [json.loads(line) for line in lines]
        assert len(entries) == 2 * len(calls)  # one entry per exchange and direction
        assert {e["kind"] for e in entries} == kinds
        widths = {"splits": [], "handshake": [], "health": [], "expert_mask": [1], "hidden_fp8": [hidden + 4],
                  "output_grad_fp8": [hidden + 4], "routing_weights": [], "routing_weights_grad": []}
        assert all(e["shape"][1:] == widths.get(e["kind"], [hidden]) for e in entries)
        dtypes = {"splits": "int64", "handshake": "int64", "health": "int64", "expert_mask": "uint8",
                  "hidden_fp8": "uint8", "output_grad_fp8": "uint8"}
        assert all(e["dtype"] == dtypes.get(e["kind"], "float32") for e in entries)


POOL_MODEL = ModelConfig(hidden_size=32, num_layers=3, num_experts=6, expert_intermediate_size=16, dense_layers=[1],
                         dense_intermediate_size=16)


def _pooling_party(rank, out_dir, port):
    """Pool the experts as `pcmoe export --pool` does, with every collective recorded."""
    torch.set_num_threads(1)
    calls, _ = _record_collectives()
    shard = ExpertShard(POOL_MODEL, rank, 2)
    shard.init_weights(seed=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        wire = Wire(rank, 2, dist.group.WORLD, WireLog())
        shards = pool_experts(POOL_MODEL, shard, wire, torch.float32)
    finally:
        dist.destroy_process_group()
    torch.save({"calls": calls, "shards": [s.state_dict() for s in shards], "log": wire.log.entries},
               os.path.join(out_dir, f"pool{rank}.pt"))
    end_party()


@pytest.mark.slow
def test_wire_audit_of_pooling_the_experts(tmp_path, monkeypatch):
    """What `pcmoe export --pool` sends: in every MoE layer one exchange of kind expert_weights, through
    Wire.exchange, carrying exactly the sender's own experts' weights to the other party (and nothing to
    itself); each party ends with every party's shard."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_pooling_party, args=(str(tmp_path), free_port()), nprocs=2)
    expected = [ExpertShard(POOL_MODEL, p, 2) for p in range(2)]
    for shard in expected:
        shard.init_weights(seed=0)
    for party in range(2):
        record = torch.load(tmp_path / f"pool{party}.pt", weights_only=False)
        calls, own = record["calls"], expected[party]
        assert [(c["name"], c["kind"]) for c in calls] == [("all_to_all_single", "expert_weights")] * 2  # MoE layers
        for layer, call in enumerate(calls):
            rows = torch.cat([own.w_gate_up[layer].flatten(1), own.w_down[layer].flatten(1)], dim=1)
            assert torch.equal(call["send"], rows) and call["send_splits"] == ([0, 3] if party == 0 else [3, 0])
        assert {e.kind for e in record["log"]} == {"expert_weights"}
        for got, want in zip(record["shards"], expected, strict=True):
            assert all(torch.equal(t, want.state_dict()[k]) for k, t in got.items())


def test_disallowed_kinds_never_cross():
    wire = Wire()
    for kind in ("tokens", "labels", "positions", "attention_mask", "embed.weight", "backbone_grad"):
        with pytest.raises(ValueError, match=re.escape(f"{kind!r} may not cross between parties")):
            wire.exchange(kind, 0, torch.zeros(3, 4), [3], [3])


@pytest.fixture
def one_thread():
    """The harness's matrices are small: more threads only contend (and the CI machine has two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def loopback(monkeypatch):
    """all_to_all_single between two parties that send each other the same rows: recv = send."""
    def all_to_all_single(recv, send, recv_splits, send_splits, group=None, async_op=False):
        assert recv_splits == send_splits
        recv.copy_(send)

    monkeypatch.setattr(dist, "all_to_all_single", all_to_all_single)


def _rows(n=400, width=64, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("kind", [k for k in WIRE_KINDS[1:] if not k.endswith("_fp8")])
def test_default_wire_is_bitwise_unchanged(loopback, kind):
    rows = _rows()
    received = Wire(0, 2).exchange(kind, 0, rows, [100, 300], [100, 300]).wait()
    assert torch.equal(received, rows)


def test_clip_bounds_the_rows_bound_for_other_parties_only(loopback):
    rows = _rows()
    wire = Wire(1, 3, privacy=PrivacyConfig(hidden_clip=2.0, grad_clip=0.5))
    splits = [100, 120, 180]  # party 1 keeps rows 100..219
    hidden = wire.exchange("hidden", 0, rows, splits, splits).wait()
    assert torch.equal(hidden[100:220], rows[100:220])
    away, sent = torch.cat([hidden[:100], hidden[220:]]), torch.cat([rows[:100], rows[220:]])
    torch.testing.assert_close(away, sent * 2.0 / sent.norm(dim=1, keepdim=True))  # rows of norm 2, same direction
    assert (wire.exchange("output_grad", 0, rows, splits, splits).wait()[:100].norm(dim=1) <= 0.5 * (1 + 1e-6)).all()
    for kind in ("output", "hidden_grad"):  # what the hosts send back is not the sender's to defend
        assert torch.equal(wire.exchange(kind, 0, rows, splits, splits).wait(), rows)


def test_noise_has_the_configured_std_and_comes_from_the_partys_secret(loopback):
    rows = _rows(4000, 64)
    privacy = PrivacyConfig(hidden_clip=1.0, hidden_noise=0.5)
    got = Wire(0, 2, privacy=privacy, secret=3).exchange("hidden", 0, rows, [0, 4000], [0, 4000]).wait()
    noise = got - clip_and_noise(rows, 1.0, 0.0, None)
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 0.5) < 0.01
    again = Wire(0, 2, privacy=privacy, secret=3).exchange("hidden", 0, rows, [0, 4000], [0, 4000]).wait()
    assert torch.equal(got, again)
    # Without a secret given, each wire draws its own from the OS: nothing in the shared config reproduces it.
    first, second = (Wire(0, 2, privacy=privacy).exchange("hidden", 0, rows, [0, 4000], [0, 4000]).wait()
                     for _ in range(2))
    assert not torch.equal(first, second)


def test_observer_sees_what_arrived_and_nothing_is_observed_by_default(loopback):
    rows, seen = _rows(), []
    wire = Wire(0, 2, observer=lambda *args: seen.append(args))
    transfer = wire.exchange("hidden", 3, rows, [100, 300], [100, 300], async_op=True)
    assert seen == []  # not before it has arrived
    received = transfer.wait()
    ((kind, layer, observed, recv_splits),) = seen
    assert (kind, layer, recv_splits) == ("hidden", 3, [100, 300]) and observed is received
    assert Wire(0, 2).observer is None


def test_clip_and_noise_keeps_zero_rows_and_dtype():
    rows = torch.zeros(3, 8, dtype=torch.bfloat16)
    assert torch.equal(clip_and_noise(rows, 1.0, 0.0, None), rows)
    assert clip_and_noise(rows, 1.0, 1.0, torch.Generator().manual_seed(0)).dtype == torch.bfloat16


@pytest.mark.parametrize("overrides,message", [
    (["privacy.hidden_noise=-1.0"], "privacy.hidden_clip and privacy.hidden_noise must not be negative"),
    (["privacy.grad_clip=-1"], "privacy.grad_clip and privacy.grad_noise must not be negative"),
    (["privacy.sigma=1"], "unknown option privacy.sigma"),
])
def test_privacy_config_errors(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, overrides)



# ---------------------------------------------------------------------------------------------------------
def test_noise_is_on_by_default_from_a_public_checkpoint_and_its_absence_is_said():
    """With model.init_from every host knows the starting weights: unset noises become SHARED_START_NOISE (on
    both kinds, clipped at each exchange's median); set to 0 there, the run says in one line that the rows are
    not private. From private seeds the defaults stay off."""
    assert PrivacyConfig().resolved(False) == PrivacyConfig(hidden_noise=0.0, grad_noise=0.0)
    shared = PrivacyConfig().resolved(True)
    assert shared.hidden_noise == shared.grad_noise == SHARED_START_NOISE > 0
    assert Wire(0, 2, privacy=shared).defences == {"hidden": (0.0, SHARED_START_NOISE),
                                                   "output_grad": (0.0, SHARED_START_NOISE)}
    assert PrivacyConfig(hidden_noise=0.0, grad_noise=0.2).resolved(True).hidden_noise == 0.0
    cfg = load_config(None, [])
    assert "noise" not in start_line(cfg) and "warning" not in start_line(cfg)
    cfg.model.init_from = "/models/public"  # the start line reads the option only (validation needs the folder)
    assert start_line(cfg).endswith(f" | noise {SHARED_START_NOISE:g} on hidden states, {SHARED_START_NOISE:g} on "
                                    "output gradients")
    cfg.privacy = PrivacyConfig(hidden_noise=0.0, grad_noise=0.0)
    first, warning = start_line(cfg).split("\n")
    assert warning.startswith("pcmoe: warning: privacy.hidden_noise and grad_noise are 0 with model.init_from")


# The attack harness (bench/privacy)


SMOKE = replace(privacy.PRESETS["tiny"], model=dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                                                    expert_intermediate_size=32), seq_len=16, batch_size=4, steps=10,
                spread_seeds=[])


def test_scores_on_known_inputs():
    true = [[1, 2, 3, 4, 5]]
    assert privacy.token_accuracy([[1, 2, 3, 4, 5]], true) == 1.0
    assert privacy.token_accuracy([[1, -1, 3, 9, 9]], true) == 0.4
    assert privacy.bleu([[1, 2, 3, 4, 5]], true) == (1.0, [1.0, 1.0, 1.0, 1.0])
    score, precisions = privacy.bleu([[1, 2, 3, 9, 5]], true)
    assert precisions == [0.8, 0.5, 1 / 3, 0.0] and score == 0.0
    score, precisions = privacy.bleu([[5, 1, 2, 3, 4]], true)  # shifted by one: all but the first n-grams match
    assert precisions == [1.0, 0.75, 2 / 3, 0.5] and math.isclose(score, (0.75 * 2 / 3 * 0.5) ** 0.25)
    assert privacy.bleu([[-1] * 5], true)[1] == [0.0] * 4  # unseen positions match nothing


def test_harness_all_experts_equal_the_engine(monkeypatch):
    """The attacks' all-local experts (both parties' shards put together, the engine's one-party path) equal
    csrc_triton's all-local expert_mlp over one whole shard."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = privacy.config(SMOKE).model
    shards = [ExpertShard(cfg, p, 2) for p in range(2)]
    whole = ExpertShard(cfg)
    for s in (*shards, whole):
        s.init_weights(5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, cfg.hidden_size, generator=gen)
    ids = torch.rand(10, cfg.num_experts, generator=gen).argsort(1)[:, :cfg.top_k]  # distinct, as top-k routes
    weights = torch.rand(10, cfg.top_k, generator=gen)
    out, _ = privacy.all_experts(shards, cfg)(1, x, weights, ids)
    torch.testing.assert_close(out, ct.expert_mlp(x, weights, ids, whole.w_gate_up[1], whole.w_down[1]))


def _observing_party(rank, port, out_dir, defence):
    """A party of SMOKE observed as the harness observes it; the victim also records, through module hooks,
    each MoE layer's input, routing and output gradient: the truth to check the host's record against."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        party = Party(replace(privacy.config(SMOKE), privacy=defence), rank)
        truth = []

        def record(module, args, output):
            layer = {"x": args[0].detach().reshape(-1, args[0].shape[-1]).clone(),
                     "ids": output[1].expert_ids.clone(), "weights": output[1].weights.detach().clone()}
            output[0].register_hook(lambda grad: layer.update(dout=grad.reshape(-1, grad.shape[-1]).clone()))
            truth.append(layer)

        if rank == privacy.VICTIM:
            for block in party.backbone.blocks:
                block.moe.register_forward_hook(record)
        observed = privacy.windows(party.eval_tokens, SMOKE.seq_len, 4)
        seen = {shuffle: privacy.observe(party, observed, shuffle) for shuffle in (False, True)}
        torch.save({"seen": seen, "truth": truth}, os.path.join(out_dir, f"party{rank}.pt"))
    finally:
        dist.destroy_process_group()
    end_party()


@pytest.mark.slow
def test_harness_host_records_exactly_the_rows_routed_to_it(tmp_path, monkeypatch):
    """Through the real wire: the host (party 1) recorded exactly the victim's pairs routed to its (odd)
    experts, each row the victim's hidden state of that token and the gradient of that pair's output, and each
    row's mask the host's experts that token picked; in token order, or shuffled (the default); with the
    defences on, what it recorded is clipped."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    for name, defence in (("plain", PrivacyConfig()), ("clipped", PrivacyConfig(hidden_clip=0.5, grad_clip=1e-3))):
        out_dir = tmp_path / name
        out_dir.mkdir()
        mp.spawn(_observing_party, args=(free_port(), str(out_dir), defence), nprocs=2)
        victim, attacker = (torch.load(out_dir / f"party{p}.pt", weights_only=False) for p in range(2))
        watches = {shuffle: privacy.join(victim["seen"][shuffle]["sent"], attacker["seen"][shuffle]["received"],
                                         privacy.config(SMOKE).model.top_k) for shuffle in (False, True)}
        truths = victim["truth"][:2] + victim["truth"][2:]  # the in-order pass's layers, then the shuffled pass's
        watch = watches[False] + watches[True]
        assert [w["layer"] for w in watch] == [0, 1, 0, 1]
        for i, (w, truth) in enumerate(zip(watch, truths, strict=True)):
            ids, weights = truth["ids"], truth["weights"]
            assert sorted(w["pair"].tolist()) == (ids.reshape(-1) % 2 == 1).nonzero()[:, 0].tolist()
            in_order = torch.equal(w["row_token"], w["row_token"].sort().values)
            assert in_order == (i < 2)  # shuffled, the rows are in no token order
            local = torch.where(ids % 2 == 1, 1 << (ids // 2), 0).sum(1)  # the host's experts each token picked
            assert torch.equal(w["mask"], local[w["row_token"]])
            if name == "plain":
                assert torch.equal(w["hidden"], truth["x"][w["token"]])
                expected = weights.reshape(-1)[w["pair"], None] * truth["dout"][w["token"]]
                torch.testing.assert_close(w["grad"], expected, rtol=1e-5, atol=1e-9)
            else:
                assert (w["hidden"].norm(dim=1) <= 0.5 * (1 + 1e-5)).all()
                assert (w["grad"].norm(dim=1) <= 1e-3 * (1 + 1e-5)).all()


@pytest.mark.slow
def test_known_layer_attack_beats_chance_and_noise_stops_it(monkeypatch, one_thread):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    cfg = privacy.config(SMOKE)
    tokenizer = load_tokenizer(cfg.data, cfg.model.vocab_size)
    held_out = privacy.windows(encode(tokenizer, party_texts(cfg, 0)[1]), cfg.data.seq_len, 4)
    aux = privacy.windows(encode(tokenizer, party_texts(cfg, 1)[0]), cfg.data.seq_len, 64)
    inputs = held_out[:, :-1]
    chance = (inputs == torch.bincount(aux.reshape(-1)).argmax()).float().mean().item()
    public = privacy.pretrain(cfg, party_texts(cfg, 1)[0])  # shared initialisation: a model both start from
    accuracy = {}
    for noise in (0.0, 3.0):
        defence = PrivacyConfig(hidden_clip=4.0, hidden_noise=noise) if noise else PrivacyConfig()
        run = privacy.collaborate(cfg, public, defence, held_out)
        assert run.losses[-1] < run.losses[0]
        recovered = privacy.nearest_neighbour_attack(run.watch, [run.start, run.backbones[1]], run.shards, aux,
                                                     tuple(inputs.shape))
        accuracy[noise] = (recovered == inputs).float().mean().item()
    assert accuracy[0.0] > max(0.3, 3 * chance)
    assert accuracy[3.0] < chance + 0.05


def test_privacy_command_rejects_bad_input(capsys):
    with pytest.raises(SystemExit):
        privacy.main(["--preset", "huge"])
    assert "unknown preset 'huge': choose one of tiny, base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        privacy.main(["--preset", "tiny", "--phase", "noise=7"])
    assert "unknown phase(s) noise=7: the tiny preset has shared, private, noise=0.1" in capsys.readouterr().err


def _known_model(monkeypatch):
    """SMOKE's victim backbone and both parties' experts, and what its host (party 1) would receive of 2 sequences:
    per MoE layer, one row per token routed to it (its hidden state, its mask), in token order."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    cfg = privacy.config(SMOKE)
    backbone = initial_backbone(cfg, 0)
    shards = [ExpertShard(cfg.model, p, 2) for p in range(2)]
    for s in shards:
        s.init_weights(3)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, SMOKE.seq_len))
    states, ids = privacy.trace(backbone, shards, tokens)
    watch = []
    for layer, (x, picked) in enumerate(zip(states, ids, strict=True)):
        mask = privacy.host_masks(picked, 1, 2)
        rows = mask.nonzero()[:, 0]
        watch.append({"layer": layer, "token": rows, "hidden": x[rows], "row_token": rows, "mask": mask[rows]})
    return cfg, backbone, shards, tokens, watch


def test_host_masks_are_the_hosts_local_expert_bits():
    ids = torch.tensor([[1, 3], [0, 2], [5, 0], [7, 1]])  # 8 experts over 2 parties: host 1 has 1, 3, 5, 7
    assert privacy.host_masks(ids, 1, 2).tolist() == [0b11, 0, 0b100, 0b1001]
    assert privacy.host_masks(ids, 0, 2).tolist() == [0, 0b11, 0b1, 0]


def test_row_attack_guesses_each_row_from_its_mask_alone(monkeypatch):
    """The shuffled-row attack's guess for a row depends on its (layer, mask) only: permuting the rows permutes
    the guesses; and where the victim's text is the attacker's own, every row gets the token the attacker's
    table names for its mask."""
    cfg, backbone, shards, tokens, watch = _known_model(monkeypatch)
    aux = torch.cat([tokens, tokens[:, :1]], 1)  # windows of seq_len + 1: the victim's text is the attacker's
    shape = tuple(tokens.shape)
    recovered, guesses = privacy.row_attack(watch, [backbone], shards, aux, shape, 1, 2)
    order = torch.randperm(watch[0]["row_token"].numel())
    shuffled = [{**w, "row_token": w["row_token"][order], "mask": w["mask"][order]} if w["layer"] == 0 else w
                for w in watch]
    _, shuffled_guesses = privacy.row_attack(shuffled, [backbone], shards, aux, shape, 1, 2)
    assert torch.equal(shuffled_guesses[0][1], guesses[0][1][order])
    flat = tokens.flatten()
    for layer, (positions, guess) in guesses.items():
        mask = watch[layer]["mask"]
        for m in mask.unique():  # every row of one mask gets the same guess, a token seen behind that mask
            assert guess[mask == m].unique().numel() == 1
            assert guess[mask == m][0] in flat[positions[mask == m]]
    assert ((recovered >= 0) == (torch.zeros(flat.numel(), dtype=torch.bool).index_fill_(
        0, torch.cat([w["row_token"] for w in watch]), True)).view(shape)).all()


@pytest.mark.slow
def test_bisr_refinement_through_known_layers_recovers_the_tokens(monkeypatch):
    """Through the layers that made them (an untrained model here), the observed hidden states (d) and output
    gradients (e) pull a half-wrong guess towards the true tokens."""
    cfg, backbone, shards, tokens, watch = _known_model(monkeypatch)
    shape = tuple(tokens.shape)
    wrong = torch.randint(0, cfg.model.vocab_size, shape, generator=torch.Generator().manual_seed(1))
    guess = torch.where(torch.arange(shape[1]) % 2 == 0, tokens, wrong)
    seen = torch.zeros(tokens.numel(), dtype=torch.bool).index_fill_(0, torch.cat([w["token"] for w in watch]), True)
    accuracy = lambda got: (got == tokens).flatten()[seen].float().mean().item()  # noqa: E731
    assert accuracy(guess) < 0.6
    assert accuracy(privacy.refine_hidden(watch, backbone, shards, guess, shape, steps=100)) > 0.8

    # e: the returned rows are the loss's gradient w.r.t. each routed output (up to the routing weight)
    outputs = []

    def capture(layer, x, weights, ids, concurrent=None):
        out, side = full(layer, x, weights, ids, concurrent)
        out.retain_grad()
        outputs.append(out)
        return out, side

    full = privacy.all_experts(shards, cfg.model)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits, _ = backbone(inputs, capture)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    grad_watch = []
    for w in watch:  # the rows' positions in the [2, seq_len - 1] grid of inputs (and next tokens)
        token = w["token"][w["token"] % shape[1] < shape[1] - 1]
        token = token // shape[1] * (shape[1] - 1) + token % shape[1]
        grad_watch.append({"layer": w["layer"], "token": token, "grad": outputs[w["layer"]].grad[token]})
    next_shape = tuple(targets.shape)
    next_guess = torch.where(torch.arange(next_shape[1]) % 2 == 0, targets, wrong[:, 1:])
    got = privacy.refine_gradients(grad_watch, backbone, shards, next_guess, next_shape, steps=100)
    seen_next = torch.zeros(targets.numel(), dtype=torch.bool).index_fill_(
        0, torch.cat([w["token"] for w in grad_watch]), True)
    before, after = ((x == targets).flatten()[seen_next].float().mean().item() for x in (next_guess, got))
    assert before < 0.6 and after > before + 0.15  # measured: about 0.5 -> 0.7 (a weaker signal than d's)


@pytest.mark.slow
def test_privacy_command_keeps_each_phase_and_resumes(tmp_path, monkeypatch, capsys):
    """A phase's results are saved as it ends and a later run skips it; the report is written from the phases
    there are and names the ones missing."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setitem(privacy.PRESETS, "smoke", replace(
        SMOKE, finetune_steps=5, eval_sequences=4, aux_sequences=32, noise=[0.0, 0.3], dlg_sequences=1, dlg_steps=5,
        refine_sequences=2, refine_steps=5, routing_steps=10))
    args = ["--preset", "smoke", "--out", str(tmp_path), "--phase", "shared"]
    privacy.main(args)
    saved = tmp_path / "phases" / "shared.json"
    first = saved.read_text()
    shared = json.loads(first)
    assert {r["key"] for r in shared["rows"]} == {"a", "b", "c", "d", "e", "r_linked", "r_row", "fedsgd"}
    assert shared["sweep"]["noise"] == 0.0 and shared["command"] == "python -m bench.privacy " + " ".join(args)
    report = (tmp_path / "report.md").read_text()
    assert f"Not run yet: private, noise=0.3, hidden={SHARED_START_NOISE}, grad={SHARED_START_NOISE}, clip." in report
    assert "## The routing-pattern attack" in report
    capsys.readouterr()
    privacy.main(args)
    assert "shared: done already" in capsys.readouterr().out and saved.read_text() == first


def test_routing_spread_over_seeds():
    """The routing attack's spread: seed 0 from the shared and noise=<default> phases, seed k from seed=<k>[...]
    phases; mean, min and max per noise, only where more than one run measured it."""
    noise = f"noise={SHARED_START_NOISE}"
    phases = {"shared": {"rows": [{"key": "r_row", "token_accuracy": 0.15}, {"key": "r_linked", "token_accuracy": 0.2},
                                  {"key": "a", "token_accuracy": 0.9}]},
              noise: {"rows": [], "sweep": {"noise": SHARED_START_NOISE, "r_row": 0.03}},
              "seed=1": {"seed": 1, "noise": 0.0, "chance": {"token_accuracy": 0.08},
                         "rows": [{"key": "r_row", "token_accuracy": 0.09},
                                  {"key": "r_linked", "token_accuracy": 0.1}]},
              "seed=2": {"seed": 2, "noise": 0.0, "chance": {"token_accuracy": 0.12},
                         "rows": [{"key": "r_row", "token_accuracy": 0.12},
                                  {"key": "r_linked", "token_accuracy": 0.3}]}}
    spread = privacy.routing_spread({"phases": phases, "chance": {"token_accuracy": 0.1}})
    assert len(spread) == 1  # the default noise has one run only
    point = spread[0]
    assert point["noise"] == 0.0 and point["seeds"] == [0, 1, 2]
    assert math.isclose(point["r_row"]["mean"], 0.12)
    assert point["r_row"]["min"] == 0.09 and point["r_row"]["max"] == 0.15
    assert math.isclose(point["r_linked"]["mean"], 0.2) and point["r_linked"]["max"] == 0.3
    assert math.isclose(point["chance"]["mean"], 0.1) and point["chance"]["min"] == 0.08
    phases["seed=1:" + noise] = {"seed": 1, "noise": SHARED_START_NOISE, "chance": {"token_accuracy": 0.08},
                                 "rows": [{"key": "r_row", "token_accuracy": 0.05}]}
    default = privacy.routing_spread({"phases": phases, "chance": {"token_accuracy": 0.1}})[1]
    assert default["seeds"] == [0, 1] and math.isclose(default["r_row"]["mean"], 0.04) and "r_linked" not in default
    assert "cost" not in default  # no held-out losses recorded
    # The default's cost, each run against the undefended run of its own seed (seed 2 has no defended run)
    phases["shared"]["sweep"] = {"noise": 0.0, "r_row": 0.15, "eval_loss": 5.0}
    phases[noise]["sweep"]["eval_loss"] = 5.1
    phases["seed=1"]["eval_loss"], phases["seed=2"]["eval_loss"] = 4.0, 9.0
    phases["seed=1:" + noise]["eval_loss"] = 4.12
    cost = privacy.routing_spread({"phases": phases, "chance": {"token_accuracy": 0.1}})[1]["cost"]
    assert cost["runs"] == 2 and math.isclose(cost["min"], 0.02) and math.isclose(cost["max"], 0.03)
    assert math.isclose(cost["mean"], 0.025)
    # Every attack at the default in both runs: the shared target is judged run by run (seed 0: <= 10% at +1%
    # holds; seed 1: +3% does not)
    phases[noise]["sweep"].update(a=0.02, c=0.08, d=0.01, e=0.04, eval_loss=5.05)
    phases["seed=1:" + noise]["rows"] += [{"key": key, "token_accuracy": 0.01} for key in "acde"]
    results = {"phases": phases, "chance": {"token_accuracy": 0.1}}
    results["routing_spread"] = privacy.routing_spread(results)
    line = privacy.report._cost_over_seeds(results)
    assert "costs +2.0% on the mean (+1.0% to +3.0%)" in line
    assert "the strongest of every attack per run 6.5% (5.0% to 8.0%); both bounds hold in 1 of these 2 runs" in line


def test_routing_target_says_whether_the_runs_split():
    """The routing target's line calls its verdict inside the run-to-run spread only where runs fall on both sides of
    chance + 5 points."""
    def line(accuracies):
        runs = [{"seed": seed, "r_row": accuracy, "chance": 0.1} for seed, accuracy in enumerate(accuracies)]
        spread = [{"noise": 0.0, "seeds": list(range(len(runs))), "runs": runs,
                   "r_row": privacy.report._stat(accuracies), "chance": privacy.report._stat([0.1] * len(runs))}]
        lines = privacy.report._targets({"phases": {}, "chance": {"token_accuracy": 0.1}, "routing_spread": spread})
        return next(text for text in lines if text.startswith("- Routing pattern"))

    every_run = line([0.2, 0.3])
    assert "NOT met" in every_run and "2 of the 2 runs are above their own chance + 5 points." in every_run
    assert "met undefended" in line([0.11, 0.12]) and "0 of the 2 runs" in line([0.11, 0.12])
    assert "inside" not in every_run + line([0.11, 0.12])
    assert ("1 of the 2 runs are above their own chance + 5 points, so the verdict is inside the run-to-run spread"
            in line([0.11, 0.3]))


def test_private_target_over_seeds():
    """The private target's line gives each run's strongest attack (seed 0: the private phase, seed k: seed=<k>:private)
    over the runs, how many hold 5% and how many stay at their own chance; with one run, that run alone."""
    def row(key, accuracy):
        return {"key": key, "attack": key, "setting": "private init", "token_accuracy": accuracy}

    phases = {"private": {"rows": [row("a", 0.0), row("b", 0.06)]}}
    results = {"phases": phases, "chance": {"token_accuracy": 0.1}}
    alone = privacy.report._targets(results)[0]
    assert "NOT met" in alone and "recovers 6.0%" in alone and "Over" not in alone
    phases["seed=1:private"] = {"seed": 1, "private": True, "chance": {"token_accuracy": 0.03},
                                "rows": [row("a", 0.01), row("b", 0.04)]}
    phases["seed=1"] = {"seed": 1, "noise": 0.0, "chance": {"token_accuracy": 0.03}, "rows": [row("r_row", 0.5)]}
    line = privacy.report._targets(results)[0]
    assert ("Over 2 runs (train.seed 0, 1) the strongest attack of each recovers 5.0% (4.0% to 6.0%); <= 5% in 1 of "
            "the 2, at or below the run's own chance in 1.") in line


def test_privacy_seed_deals_other_text():
    """A spread_seeds run is independent of seed 0's: train.seed deals other text blocks to the victim's held-out
    text and to the attacker."""
    first, other = (privacy.evaluate.Setting(SMOKE, 1, None, seed) for seed in (0, 1))
    assert other.cfg.train.seed == 1 and privacy.evaluate.phase_seed("seed=1:noise=0.5") == 1
    assert not torch.equal(first.held_out, other.held_out) and not torch.equal(first.aux, other.aux)


@pytest.mark.slow
def test_privacy_command_runs_the_seed_phases(tmp_path, monkeypatch):
    """seed=<k> phases run the routing attack on a public model and split of seed k, and the report gives their
    spread and judges the routing target on the mean; seed=<k>:private runs the private attacks at seed k."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setitem(privacy.PRESETS, "smoke", replace(
        SMOKE, finetune_steps=5, eval_sequences=4, aux_sequences=32, noise=[0.0], routing_steps=10,
        spread_seeds=[1, 2]))
    privacy.main(["--preset", "smoke", "--out", str(tmp_path), "--phase", "seed=1,seed=2,seed=1:private"])
    runs = [json.loads((tmp_path / "phases" / f"seed={k}.json").read_text()) for k in (1, 2)]
    assert [run["seed"] for run in runs] == [1, 2] and runs[0]["chance"] != runs[1]["chance"]
    assert all({r["key"] for r in run["rows"]} == {"r_linked", "r_row"} for run in runs)
    assert torch.load(tmp_path / "phases" / "public-seed=2.pt")["seed"] == 2
    private = json.loads((tmp_path / "phases" / "seed=1:private.json").read_text())
    assert private["private"] and private["seed"] == 1 and private["chance"] == runs[0]["chance"]
    assert [r["key"] for r in private["rows"]] == list(privacy.evaluate.PRIVATE_ATTACKS)
    assert {r["setting"] for r in private["rows"]} == {"private init"}
    spread = json.loads((tmp_path / "results.json").read_text())["routing_spread"]
    shuffled = [next(r["token_accuracy"] for r in run["rows"] if r["key"] == "r_row") for run in runs]
    # the private run is no shared-initialisation run of the routing attack's spread
    assert spread[0]["seeds"] == [1, 2] and math.isclose(spread[0]["r_row"]["mean"], sum(shuffled) / 2)
    report = (tmp_path / "report.md").read_text()
    assert "| 0 | 2 runs |" in report and "on the mean of 2 runs (shared init, train.seed 1, 2), by " in report


def test_default_defence_parts_are_its_pieces_alone(tmp_path):
    """The PARTS phases run the default's noise on one site at a time, or its clipping without noise at the norms
    the shared phase measured (and say so when that phase has not run)."""
    setting = privacy.evaluate.Setting(SMOKE, 1, tmp_path / "public.pt")
    hidden, grad, other = (privacy.evaluate.part_defence(name, setting)
                           for name in (f"hidden={SHARED_START_NOISE}", f"grad={SHARED_START_NOISE}", "grad=0.25"))
    assert (hidden.hidden_noise, hidden.grad_noise) == (SHARED_START_NOISE, 0.0) and hidden.hidden_clip == 0
    assert (grad.hidden_noise, grad.grad_noise) == (0.0, SHARED_START_NOISE) and other.grad_noise == 0.25
    with pytest.raises(ValueError, match="run the shared phase first"):
        privacy.evaluate.part_defence("clip", setting)
    (tmp_path / "shared.json").write_text(json.dumps({"row_norms": {"hidden": 3.5, "grad": 0.02}}))
    only_clip = privacy.evaluate.part_defence("clip", setting)
    assert (only_clip.hidden_clip, only_clip.grad_clip, only_clip.hidden_noise, only_clip.grad_noise) == (
        3.5, 0.02, 0.0, 0.0)
    assert set(privacy.evaluate.PARTS) <= set(privacy.phases(SMOKE))


@pytest.mark.slow
def test_privacy_command_measures_the_default_defence_part_by_part(tmp_path, monkeypatch):
    """The clip phase clips at the shared phase's norms without noise; the report sets each part's cost in
    held-out loss beside the undefended run."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setitem(privacy.PRESETS, "smoke", replace(
        SMOKE, finetune_steps=5, eval_sequences=4, aux_sequences=32, noise=[0.0], dlg_sequences=1, dlg_steps=5,
        refine_sequences=2, refine_steps=5, routing_steps=10))
    privacy.main(["--preset", "smoke", "--out", str(tmp_path), "--phase", f"shared,clip,grad={SHARED_START_NOISE}"])
    shared = json.loads((tmp_path / "phases" / "shared.json").read_text())
    parts = {name: json.loads((tmp_path / "phases" / f"{name}.json").read_text())["part"]
             for name in ("clip", f"grad={SHARED_START_NOISE}")}
    assert all({"eval_loss", "final_loss", "a", "c", "d", "e", "r_row"} <= set(p) for p in parts.values())
    assert parts["clip"]["eval_loss"] != shared["sweep"]["eval_loss"]  # the clipping changed the run
    report = (tmp_path / "report.md").read_text()
    section = report.split("## The default defence, part by part")[1].split("##")[0]
    cost = parts["clip"]["eval_loss"] / shared["sweep"]["eval_loss"] - 1
    assert "| clipping only (at the shared phase's median row norms), no noise | " in section
    assert f"{cost:+.1%}" in section and "noise on the output gradients only" in section
