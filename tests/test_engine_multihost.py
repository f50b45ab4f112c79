"""One party per host: `pcmoe party` processes on 127.0.0.1 as if on separate hosts (each its own rank and its own
out_dir, no shared launcher), over gloo and over the TLS transport; and `pcmoe party`'s and [transport]'s bad
input, one line each."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.tls import make_pki
from pcmoe_engine.cli import free_port
from pcmoe_engine.cli import main as pcmoe
from pcmoe_engine.config import load_config
from pcmoe_engine.faults import ExitCode

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=32", "model.num_layers=2", "model.expert_intermediate_size=32",
         "model.shared_intermediate_size=16", "data.seq_len=16", "train.batch_size=2", "train.steps=3",
         "train.warmup_steps=1", "train.eval_batches=1", "train.log_every=1", "train.name=multihost",
         "train.device=cpu"]  # parties on one machine: on its GPU each would take cuda:0, as on a host of its own
TIMINGS = ("step_time_s", "tokens_per_s", "peak_memory_bytes")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PCMOE_CACHE", str(tmp_path_factory.getbasetemp() / "pcmoe-cache"))


def _start(tmp_path, parties, args_of, *overrides):
    """`pcmoe party` once per rank, as separate hosts would run it (its own out_dir each)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GLOO_SOCKET_IFNAME")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    tmp_path.mkdir(parents=True)
    return [subprocess.Popen([sys.executable, "-m", "pcmoe_engine.cli", "party", "--rank", str(rank), "--parties",
                              str(parties), *args_of(rank), "--set", f"train.out_dir={tmp_path / f'host{rank}'}",
                              *[a for o in [*SMALL, *overrides] for a in ("--set", o)]],
                             env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank in range(parties)]


def _hosts(tmp_path, parties, args_of, *overrides):
    """Run every party to the end; returns each one's output."""
    procs = _start(tmp_path, parties, args_of, *overrides)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"party {rank} failed:\n{out}"
    return outputs


def _tls_args(pki, peers):
    return lambda rank: ["--peers", peers, "--set", f"transport.tls_cert={pki}/party{rank}.crt", "--set",
                         f"transport.tls_key={pki}/party{rank}.key", "--set", f"transport.tls_ca={pki}/ca.crt"]


def _records(run_dir, rank):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
            for line in (run_dir / f"party{rank}" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_parties_on_separate_hosts_train_alike_over_gloo_and_tls(tmp_path):
    parties = 3
    rendezvous = f"127.0.0.1:{free_port()}"
    # Each run's row order is a secret drawn afresh (privacy.shuffle): two runs sum in different orders, so the
    # bitwise comparison of the two pipes runs them in token order.
    in_order = "privacy.shuffle=false"
    gloo = _hosts(tmp_path / "gloo", parties, lambda rank: ["--rendezvous", rendezvous], in_order)
    pki = make_pki(tmp_path / "pki", parties, "multihost")  # run_id: the run's name
    peers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(parties))
    tls = _hosts(tmp_path / "tls", parties, _tls_args(pki, peers), in_order)

    for rank in range(parties):
        # Each said how it reaches the others: gloo found the loopback interface itself (none was set).
        assert f"pcmoe party {rank} of 3 | torch.distributed (gloo) rendezvous at {rendezvous}, gloo on lo (127.0.0.1, " \
               "which reaches 127.0.0.1; GLOO_SOCKET_IFNAME overrides)" in gloo[rank]
        assert f"pcmoe party {rank} of 3 | TLS 1.3 mesh as pcmoe-party-{rank}.multihost (CA {pki}/ca.crt), " \
               f"listening on port {peers.split(',')[rank].split(':')[1]}; peers {peers.replace(',', ', ')}" in tls[rank]
        runs = [tmp_path / kind / f"host{rank}" / "multihost" for kind in ("gloo", "tls")]
        for run in runs:  # a host holds its own party's folder only
            assert sorted(p.name for p in run.glob("party*")) == [f"party{rank}"]
        # Same math, different pipe: losses, gradient norms, traffic and weights bitwise equal.
        assert _records(runs[0], rank) == _records(runs[1], rank)
        assert len(_records(runs[0], rank)) == 4  # 3 steps and the final evaluation
        a, b = (torch.load(run / f"party{rank}" / "checkpoints" / "step_0000003.pt", weights_only=False)
                for run in runs)
        for part in ("backbone", "experts"):
            assert a[part].keys() == b[part].keys()
            assert all(torch.equal(a[part][name], b[part][name]) for name in a[part])
    # Party 0's merge holds what its host can read: its own files; the others are listed as missing.
    for kind, out in (("gloo", gloo[0]), ("tls", tls[0])):
        summary = json.loads((tmp_path / kind / "host0" / "multihost" / "summary.json").read_text())
        assert summary["parties_missing"] == [1, 2] and summary["final_loss"][1:] == [None, None]
        assert "parties 1, 2: no files here (on other hosts" in out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_killed_party_is_named_over_tls(tmp_path):
    """Party 2 is killed mid-run: the others stop at once, each with one line naming it and the command that resumes
    the run, and the lost-peer exit code."""
    pki = make_pki(tmp_path / "pki", 3, "multihost")
    peers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(3))
    procs = _start(tmp_path / "run", 3, _tls_args(pki, peers), "train.steps=100000", "train.checkpoints=false")
    for line in procs[0].stdout:  # party 0 has trained a step: every party is well into the run
        if "| step" in line:
            break
    procs[2].kill()
    for rank in (0, 1):
        out = procs[rank].communicate(timeout=120)[0]
        assert procs[rank].returncode == ExitCode.PEER_LOST
        # the other survivor may notice first and say so (transport.PeerFailure)
        assert re.fullmatch(fr"pcmoe: error \(party {rank}\): party 2 closed its connection: it exited or was killed "
                            fr"(\(reported by party {1 - rank}\) )?at step \d+; no common checkpoint yet; resume every "
                            r"party with: pcmoe party .*",
                            out.strip().splitlines()[-1])
        assert "Traceback" not in out
    procs[2].communicate()


@pytest.mark.parametrize("args,message", [
    (["--rank", "0", "--parties", "2"], "pcmoe party needs --rendezvous HOST:PORT (party 0's host and a free port "
                                        "there), or --peers HOST:PORT,... for the TLS transport"),
    (["--rank", "2", "--parties", "2", "--rendezvous", "127.0.0.1:29500"], "--rank 2 must be between 0 and 1"),
    (["--rank", "0", "--parties", "2", "--rendezvous", "127.0.0.1"], "--rendezvous '127.0.0.1' is not host:port"),
    (["--rank", "0", "--parties", "2", "--rendezvous", "127.0.0.1:99999"], "--rendezvous '127.0.0.1:99999' is not"),
    (["--rank", "0", "--parties", "2", "--peers", "a:1"], "transport.peers lists 1 addresses for 2 parties"),
    (["--rank", "0", "--parties", "2", "--peers", "a:1,b"], "transport.peers[1]: 'b' is not host:port"),
    (["--rank", "0", "--parties", "2", "--peers", "a:1,b:2"], "transport.kind = \"tls\" needs transport.tls_cert"),
    (["--rank", "0", "--parties", "2", "--peers", "a:1,b:2", "--set", "transport.tls_cert=nowhere.pem"],
     "transport.tls_cert='nowhere.pem' does not exist"),
])
def test_party_command_rejects_bad_input(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        pcmoe(["party", *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("pcmoe: error: ") and message in err and err.count("\n") == 1


def test_party_command_tls_takes_no_rendezvous(tmp_path, capsys):
    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("")
    tls = [f"transport.tls_{what}={tmp_path / name}" for what, name in (("cert", "c.pem"), ("key", "k.pem"),
                                                                         ("ca", "ca.pem"))]
    with pytest.raises(SystemExit):
        pcmoe(["party", "--rank", "0", "--parties", "2", "--peers", "a:1,b:2", "--rendezvous", "a:1",
               *[a for o in tls for a in ("--set", o)]])
    assert "--rendezvous is for transport.kind=torch: over TLS the parties meet at transport.peers" in \
        capsys.readouterr().err


@pytest.mark.parametrize("overrides,message", [
    (["transport.kind=udp"], "transport.kind='udp': choose torch or tls"),
    (["transport.tls_ca=ca.pem"], "transport.tls_ca only apply to transport.kind = \"tls\": set it, or leave them out"),
    (["transport.peers=[\"a:1\", \"b:2\"]", "transport.run_id=x"], "transport.peers, transport.run_id only apply to"),
])
def test_transport_config_errors(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, overrides)


def test_local_launcher_leaves_tls_to_pcmoe_party(tmp_path, capsys):
    (tmp_path / "f.pem").write_text("")
    tls = ["transport.kind=tls", 'transport.peers=["a:1", "b:2"]'] + [
        f"transport.tls_{what}={tmp_path / 'f.pem'}" for what in ("cert", "key", "ca")]
    with pytest.raises(SystemExit) as info:
        pcmoe(["train", *[a for o in tls for a in ("--set", o)]])
    assert info.value.code == 2
    assert "transport.kind=tls connects parties on separate hosts: start each with `pcmoe party`" in \
        capsys.readouterr().err
