"""Faults a run survives, with real parties as processes on this CPU (gloo over 127.0.0.1): a party killed,
hung (SIGSTOP) or never started, the launcher killed or stopped, configurations that differ between parties,
checkpoints that differ between parties, non-finite values at one party. Each surviving party prints one line
naming what happened, and a lost run resumes from the last checkpoint every party holds, to the same numbers.

Detection is asserted within train.peer_timeout_s plus a margin for a loaded machine (the CPU is shared).
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.faults import ROOT, SMALL, Run, alive
from pcmoe_engine import lockstep
from pcmoe_engine.cli import free_port
from pcmoe_engine.config import BUILTIN_CORPORA, corpus_path, load_config
from pcmoe_engine.data import load_tokenizer, read_text
from pcmoe_engine.faults import ExitCode, exit_now, resume_command
from pcmoe_engine.party import Party
from pcmoe_engine.protocol import Wire
from pcmoe_engine.train import train
from helpers import end_party

TIMEOUT_S = 5  # train.peer_timeout_s in these runs
MARGIN_S = 10  # for a loaded machine
UNTIMED = ("step_time_s", "tokens_per_s", "peak_memory_bytes")


@pytest.fixture(autouse=True)
def _engine(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "pcmoe-cache"
    monkeypatch.setenv("PCMOE_CACHE", str(cache))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    load_tokenizer(load_config(None, [f"data.cache_dir='{cache}'"]).data, 2048)  # trained once, not per party


def _metrics(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in UNTIMED}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])  # party 0 also hosts the rendezvous store
def test_killed_party_is_named_and_the_run_resumes_to_the_same_numbers(victim, tmp_path):
    # Rows in token order: the killed run is compared bitwise with another run, which would draw another secret
    # order (privacy.shuffle) and sum the experts' gradients in another order.
    settings = ["train.steps=24", "train.checkpoint_every=5", f"train.peer_timeout_s={TIMEOUT_S}",
                "privacy.shuffle=false"]
    run = Run(tmp_path, "train.name=killed", *settings)
    run.wait_for(r"party \d \| step +12/")
    pids = run.parties()
    killed = time.monotonic()
    os.kill(pids[victim], signal.SIGKILL)
    assert run.finish() == ExitCode.PEER_LOST
    survivor = 1 - victim
    (at, line), = [(t, line) for t, line in run.errors() if line.startswith(f"pcmoe: error (party {survivor})")]
    assert at - killed < TIMEOUT_S + MARGIN_S, run.output()
    assert re.search(fr"party {victim} (stopped answering|is unreachable).* at step \d+; last common checkpoint: "
                     r"step (10|15); resume every party with: ", line), line
    assert f"pcmoe: party {victim} was killed by SIGKILL" in run.output()
    assert not any(alive(pid) for pid in pids.values())
    if victim == 0:
        return

    # The printed command, as printed, resumes the run; it ends where an uninterrupted run ends.
    command = shlex.split(line.split("resume every party with: ")[1])
    assert command[:2] == ["pcmoe", "train"] and command[-2:] == ["--set", "train.resume=true"]
    resumed = Run(tmp_path, command=[sys.executable, "-m", "pcmoe_engine.cli", *command[1:]])
    assert resumed.finish() == 0, resumed.output()
    straight = Run(tmp_path, "train.name=straight", *settings)
    assert straight.finish() == 0, straight.output()
    assert _metrics(tmp_path / "killed") == _metrics(tmp_path / "straight")


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_hung_party_is_named_within_the_peer_timeout(victim, tmp_path):
    run = Run(tmp_path, "train.steps=400", "train.checkpoint_every=5", f"train.peer_timeout_s={TIMEOUT_S}")
    run.wait_for(r"party \d \| step +12/")
    pids = run.parties()
    stopped = time.monotonic()
    os.kill(pids[victim], signal.SIGSTOP)
    survivor = 1 - victim
    run.wait_for(fr"pcmoe: error \(party {survivor}\): party {victim} ", timeout=TIMEOUT_S + MARGIN_S)
    detected = run.errors()[0][0] - stopped
    assert TIMEOUT_S - 1 < detected < TIMEOUT_S + MARGIN_S  # silent for peer_timeout_s: not sooner, not much later
    # Once the hung party is the only one left, the launcher kills it: no orphan.
    assert run.finish() == ExitCode.PEER_LOST
    assert time.monotonic() - stopped < TIMEOUT_S + MARGIN_S
    assert not any(alive(pid) for pid in pids.values())
    assert f"pcmoe: party {victim} was stopped (SIGSTOP) and alone: killed" in run.output()


@pytest.mark.slow
def test_killed_launcher_takes_its_parties_with_it(tmp_path):
    run = Run(tmp_path, "train.steps=400")
    run.wait_for(r"party \d \| step +5/")
    pids = run.parties()
    killed = time.monotonic()
    os.kill(run.process.pid, signal.SIGKILL)
    run.finish()
    while any(alive(pid) for pid in pids.values()) and time.monotonic() - killed < MARGIN_S:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids.values())  # PR_SET_PDEATHSIG: SIGTERM when the launcher dies
    stops = [line for _, line in run.errors()]
    assert len(stops) == 2 and all("stopped by SIGTERM at step" in line for line in stops), run.output()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_launcher_forwards_stop_signals(signum, tmp_path):
    run = Run(tmp_path, "train.steps=400", "train.checkpoint_every=3")
    run.wait_for(r"party \d \| step +5/")
    pids = run.parties()
    os.kill(run.process.pid, signum)
    assert run.finish() == 128 + signum
    assert not any(alive(pid) for pid in pids.values())
    stops = sorted(line for _, line in run.errors())
    assert len(stops) == 2, run.output()
    for party, line in enumerate(stops):  # a party may hear of the other's signal before its own arrives
        found = re.match(fr"pcmoe: error \(party {party}\): (party {1 - party} was )?stopped by "
                         fr"{signal.Signals(signum).name} at step (\d+); last common checkpoint: step (\d+)", line)
        assert found, line
        # The latest multiple of 3 reached, or the one before when its commit vote (the next step's) never came.
        stopped_at, common = int(found[2]), int(found[3])
        assert common > 0 and common in (stopped_at - stopped_at % 3, stopped_at - stopped_at % 3 - 3), line


def _party_process(rank, port, out_dir, *overrides, timeout=TIMEOUT_S):
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
           "TORCH_CPP_LOG_LEVEL": "ERROR"}
    sets = [a for o in [f"train.out_dir={out_dir}", *SMALL, f"train.peer_timeout_s={timeout}", *overrides]
            for a in ("--set", o)]
    return subprocess.Popen([sys.executable, "-m", "pcmoe_engine.train", *sets], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_parties_with_different_configurations_all_stop_naming_the_option(tmp_path):
    """As under torchrun, or parties started by hand on several hosts: each its own configuration. Their data paths
    may differ (party 1 names the built-in corpus by its file); their learning rates may not."""
    port = free_port()
    parties = [_party_process(0, port, tmp_path, "train.lr=3e-3", "data.corpus=tinyshakespeare"),
               _party_process(1, port, tmp_path, "train.lr=1e-3", f"data.corpus={BUILTIN_CORPORA['tinyshakespeare']}")]
    for rank, p in enumerate(parties):
        out, err = p.communicate(timeout=120)
        assert p.returncode == ExitCode.BAD_INPUT, err
        assert err == (f"pcmoe: error (party {rank}): party 1's train.lr differs from party 0's: every party must "
                       "run the same configuration (only paths, devices, logging and timeouts may differ)\n")
    assert not any(p.is_file() for p in (tmp_path / "tiny-2p").rglob("*"))  # nothing written


@pytest.mark.slow
def test_a_party_refusing_its_data_stops_the_others(tmp_path):
    """Party 1's own data is binary: it says so; party 0 names party 1 as stopped by an error, at once."""
    good, bad = tmp_path / "good.txt", tmp_path / "bad.bin"
    good.write_text("\n\n".join(f"Speaker {i}:\nA line of a small play, number {i}." for i in range(2000)))
    bad.write_bytes(bytes(range(256)) * 64)
    paths = f"data.party_paths=['{good}', '{bad}']"
    port = free_port()
    parties = [_party_process(rank, port, tmp_path, paths) for rank in range(2)]
    started = time.monotonic()
    (_, err0), (_, err1) = (p.communicate(timeout=120) for p in parties)
    assert time.monotonic() - started < 60  # not the rendezvous or collective timeouts
    assert parties[1].returncode == ExitCode.BAD_INPUT and err1 == (
        f"pcmoe: error (party 1): '{bad}' is a binary file (it holds NUL bytes), not text: remove it from the data\n")
    assert parties[0].returncode == ExitCode.PEER_LOST and err0.count("\n") == 1
    assert err0.startswith("pcmoe: error (party 0): party 1 stopped with an error (its own line says why) at step 0; "
                           "no common checkpoint yet; resume every party with: ")


@pytest.mark.slow
def test_a_party_setting_up_longer_than_the_peer_timeout_is_waited_for(tmp_path):
    """Tokenising a large corpus holds the GIL, and the heartbeat with it, for longer than peer_timeout_s (here
    4.4 MB, several seconds, against 2 s): a party still setting up has 10 x peer_timeout_s."""
    text = read_text(corpus_path("tinyshakespeare"))
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text(text[:200_000])
    large.write_text("\n\n".join([text] * 4))
    run = Run(tmp_path, f"data.party_paths=['{small}', '{large}']", "train.steps=3", "train.peer_timeout_s=2")
    assert run.finish() == 0, run.output()


@pytest.mark.slow
def test_a_party_that_never_joins_is_reported(tmp_path):
    alone = _party_process(0, free_port(), tmp_path, timeout=0.5)  # the rendezvous waits 10 x peer_timeout_s
    out, err = alone.communicate(timeout=60)
    assert alone.returncode == ExitCode.PEER_LOST
    assert err.startswith("pcmoe: error (party 0): not every party joined within 5 s") and err.count("\n") == 1


@pytest.mark.slow
def test_parties_resume_from_the_latest_step_all_hold(tmp_path):
    """The issue's case: one party holds step 20, the other only step 10 (killed between the two parties' saves,
    or its step 20 damaged): both resume from 10, and end where the uninterrupted run ended."""
    settings = ["train.steps=20", "train.checkpoint_every=10", "train.name=run"]
    assert Run(tmp_path, *settings).finish() == 0
    straight = _metrics(tmp_path / "run")
    checkpoints = [tmp_path / "run" / f"party{p}" / "checkpoints" for p in range(2)]
    (checkpoints[1] / "step_0000020.pt").unlink()
    resumed = Run(tmp_path, *settings, "train.resume=true")
    assert resumed.finish() == 0, resumed.output()
    assert f"party 0 | dropping {checkpoints[0] / 'step_0000020.pt'}: not every party holds step 20 intact, the run " \
           "continues from step 10" in resumed.output()
    assert resumed.output().count("at step 10") == 2
    assert _metrics(tmp_path / "run") == straight
    assert [sorted(p.name for p in c.iterdir()) for c in checkpoints] == [["step_0000010.pt", "step_0000020.pt"]] * 2


def _nan_party(rank, port, out_dir, policy):
    """A party of a 2-party run in which party 1's hidden states turn NaN at step 3 (a bad batch): the NaN
    reaches party 0 through the experts it hosts for party 1."""
    torch.set_num_threads(1)
    forward_backward = Party.forward_backward

    def poisoned(self, inputs, targets):
        if self.rank == 1 and self.step_count == 3:
            hook = self.backbone.embed.register_forward_hook(lambda module, args, out: out * float("nan"))
            try:
                return forward_backward(self, inputs, targets)
            finally:
                hook.remove()
        return forward_backward(self, inputs, targets)

    Party.forward_backward = poisoned
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = load_config(None, [*SMALL, "parties=2", "train.steps=6", "train.checkpoint_every=3",
                             f"train.nonfinite={policy}", f"train.out_dir={out_dir}", "train.name=poisoned"])
    try:
        train(cfg, rank)
    except Exception as e:  # noqa: BLE001 -- what stopped this party, for the test to read
        Path(out_dir, f"outcome{rank}").write_text(f"{type(e).__name__}: {e}")
        exit_now(0)  # as `pcmoe train` leaves a stopped run (train.main), without destroying the process group
    Path(out_dir, f"outcome{rank}").write_text("finished")
    end_party()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_values_at_one_party_skip_or_stop_every_party_together(policy, tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_nan_party, args=(free_port(), str(tmp_path), policy), nprocs=2)
    outcomes = [(tmp_path / f"outcome{p}").read_text() for p in range(2)]
    run = tmp_path / "poisoned"
    if policy == "stop":
        for outcome in outcomes:
            assert outcome.startswith("Diverged: step 3: non-finite expert gradients at party 0; loss, backbone "
                                      "gradients, expert gradients at party 1 (train.nonfinite=stop)"), outcome
        return
    assert outcomes == ["finished", "finished"]
    for p in range(2):
        records = [json.loads(line) for line in (run / f"party{p}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r.get("skipped")] == [3]
        assert all(r["loss"] == r["loss"] for r in records if "loss" in r and r["step"] != 3)  # finite again
        state = torch.load(run / f"party{p}" / "checkpoints" / "step_0000006.pt", weights_only=False)
        assert all(v.isfinite().all() for part in ("backbone", "experts") for v in state[part].values())


@pytest.mark.slow
def test_diverged_run_stops_every_party_with_one_line(tmp_path):
    """train.lr=1000, the issue's case: every party stops at the same step, exit 4, no non-finite checkpoint."""
    run = Run(tmp_path, "train.steps=40", "train.lr=1000", "train.min_lr=0", "train.checkpoint_every=1",
              "train.keep_checkpoints=40", "train.name=lr")
    assert run.finish() == ExitCode.DIVERGED, run.output()
    lines = sorted(line for _, line in run.errors())
    assert len(lines) == 2 and all("the run diverged" in line for line in lines), run.output()
    assert lines[0].split("): ", 1)[1] == lines[1].split("): ", 1)[1]  # the same step, the same votes
    for party in range(2):
        for path in (tmp_path / "lr" / f"party{party}" / "checkpoints").glob("step_*.pt"):
            state = torch.load(path, weights_only=False)
            assert all(v.isfinite().all() for part in ("backbone", "experts") for v in state[part].values())


def test_resume_command_replaces_resume_and_overwrite_settings(monkeypatch):
    monkeypatch.setenv("PCMOE_COMMAND", "pcmoe train --parties 2 --set train.overwrite=true --set=train.resume=false "
                                        "--set 'train.name=my run'")
    assert resume_command([]) == "pcmoe train --parties 2 --set 'train.name=my run' --set train.resume=true"
    monkeypatch.delenv("PCMOE_COMMAND")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command(["--set", "train.steps=9"]) == ("torchrun --nproc-per-node=4 -m pcmoe_engine.train --set "
                                                          "train.steps=9 --set train.resume=true")


class _Recorder(Wire):
    """One party alone, keeping the handshake rows it sends."""

    def __init__(self):
        super().__init__()
        self.sent = []

    def share(self, kind, row, lengths=None):
        self.sent.append(row)
        return [row]


class _Parties(Wire):
    """Party 0's wire among parties that sent ``rows`` (each party's handshake rows, in order)."""

    def __init__(self, rows):
        super().__init__()
        self.rows, self.calls = rows, 0

    def share(self, kind, row, lengths=None):
        self.calls += 1
        return [sent[self.calls - 1] for sent in self.rows]


def _handshake(configs, held):
    rows = []
    for cfg, steps in zip(configs, held):
        recorder = _Recorder()
        lockstep.handshake(recorder, cfg, "fp32", steps, "cpu")
        rows.append(recorder.sent)
    return lockstep.handshake(_Parties(rows), configs[0], "fp32", held[0], "cpu")


def test_handshake_names_the_first_party_and_option_that_differ_and_agrees_on_the_step():
    base = load_config(None, ["parties=3"])
    other = load_config(None, ["parties=3", "model.top_k=3", "train.seed=5", "data.corpus=/"])  # paths may differ
    resumed = load_config(None, ["parties=3", "train.resume=true"])
    with pytest.raises(ValueError, match=re.escape("party 2's model.top_k differs from party 0's (and 1 more)")):
        _handshake([base, base, other], [None] * 3)
    with pytest.raises(ValueError, match=re.escape("party 1 has train.resume=True, party 0 False")):
        _handshake([base, resumed, base], [None, [], None])
    assert _handshake([resumed] * 3, [[5, 10, 20], [10, 20], [5, 10]]) == 10
    assert _handshake([resumed] * 3, [[5], [10], []]) is None
    assert _handshake([base] * 3, [None] * 3) is None


def test_two_parties_on_one_gpu_get_one_line():
    """`pcmoe party` processes on one machine all take its first GPU (each behaves as on a host of its own); NCCL
    refuses at the first collective with this message (seen on two H100s, NCCL 2.28.9): one line says what to do."""
    from pcmoe_engine.faults import Progress
    from pcmoe_engine.train import _stopped

    nccl = RuntimeError("NCCL error in: NCCLUtils.cpp:93, invalid usage (run with NCCL_DEBUG=WARN for details), NCCL "
                        "version 2.28.9\nncclInvalidUsage: This usually reflects invalid usage of NCCL library.\nLast "
                        "error:\nDuplicate GPU detected : rank 0 and rank 1 both on CUDA device 80")
    code, line, state = _stopped(nccl, Progress("pcmoe party --rank 0"), None)
    assert (code, state) == (ExitCode.BAD_INPUT, "fail")
    assert line.startswith("two parties are on one GPU") and "CUDA_VISIBLE_DEVICES" in line and "\n" not in line


def test_a_setup_heartbeat_is_stale_once_every_party_has_joined():
    """A party can finish setting up, join the handshake and run its first steps before its heartbeat thread beats
    again (its main thread had the GIL), then hang: its last heartbeat still says setup. Before the handshake that
    earns the long setup allowance; after it, the party is judged like any runner (seen: a SIGSTOP at step 12
    went unnoticed for 50 s instead of peer_timeout_s, about one run in 16 on a 2-core machine)."""
    from pcmoe_engine.faults import SETUP_FACTOR, Progress, Watchdog

    progress = Progress("pcmoe train --set train.resume=true")
    watchdog = Watchdog(dist.HashStore(), 0, 2, 100.0, progress)
    assert watchdog.claim("done")  # its own judge stands down: only _gone is asked here
    watchdog._stopped = True
    silent_s = 2 * 100.0
    watchdog._seen = {1: ("3 0 setup", time.monotonic() - silent_s)}
    assert silent_s < SETUP_FACTOR * 100.0 and watchdog._gone(100.0) == {}  # still setting up: waited for
    progress.joined = True
    assert watchdog._gone(100.0) == {1: "stopped answering (killed, hung or cut off)"}


def test_leave_ends_the_watchdogs_threads():
    """A daemon thread inside a store call when the interpreter exits aborts the process (a thread looping on a
    TCPStore's set and get does, at every exit; seen once on a finished 2-GPU run's party, killed by SIGABRT at its
    exit): leave() returns once both threads have ended."""
    from pcmoe_engine.faults import Progress, Watchdog

    watchdog = Watchdog(dist.HashStore(), 1, 2, 0.8, Progress("pcmoe train --set train.resume=true"))
    assert watchdog.claim("done")  # its own judge stands down (party 0 never beats here)
    threads = list(watchdog._threads)
    assert all(t.is_alive() for t in threads)
    watchdog.leave()
    assert not any(t.is_alive() for t in threads)
