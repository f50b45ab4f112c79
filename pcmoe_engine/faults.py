"""When something goes wrong in a run: exit codes, one-line errors, the watchdog that notices a party killed,
hung or cut off, and stop signals.

Exit codes (README, ``pcmoe train --help``): ``ExitCode``; a party stopped by signal N exits 128 + N.

Failure detection. Once the process group is up, every party runs a ``Watchdog``: one thread writes this
party's heartbeat to the rendezvous store every ``interval`` seconds (key: the party's rank; value: a beat
count, its step and its state: setup, run, fail, signal:<name>, lost:<party> or done; no data) and reads
the others'; a second thread, which does no I/O, judges. A party whose heartbeat says it stopped, or has not
changed for train.peer_timeout_s, or the store not answering that long (party 0 hosts it), is gone: the judge
prints one line naming it, the last common checkpoint and the command that resumes the run, and ends the
process with PEER_LOST, even while the main thread is blocked in a collective. When a collective fails (gloo:
"Connection closed by peer") the main thread asks the judge at once (``blame``), which then waits only
``grace`` seconds for the culprit's heartbeat. A party still setting up (reading and tokenising its data,
building or loading its model) gets SETUP_FACTOR x peer_timeout_s: tokenising a large corpus holds the GIL, and
the heartbeat thread with it; so does the process group's own timeout, the backstop for a party that answers
but makes no progress. Once this party has exchanged the handshake with every other, none is setting up any more:
a heartbeat that still says setup is stale, and its party is judged like a running one. Nothing here depends on
how the rows travel (gloo, NCCL) or on where a party runs: the store is the rendezvous every party reaches anyway.
"""

import ctypes
import os
import shlex
import signal
import sys
import threading
import time
from enum import IntEnum
from typing import NoReturn

import torch
import torch.distributed as dist

__all__ = ["ExitCode", "Diverged", "Interrupted", "STOP_SIGNALS", "SETUP_FACTOR", "Progress", "Watchdog",
           "resume_command", "out_of_memory", "die_with_parent", "say", "error_line", "exit_now"]


class ExitCode(IntEnum):
    OK = 0
    BAD_INPUT = 1  # a party refused its configuration, data, checkpoint or run folder (its line says what to change)
    REFUSED = 2  # `pcmoe train` refused the command line or configuration before starting any party
    PEER_LOST = 3  # another party was killed, hung, cut off or failed: resume with the command printed
    DIVERGED = 4  # non-finite losses or gradients (train.nonfinite)
    OUT_OF_MEMORY = 5


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# A party has SETUP_FACTOR x train.peer_timeout_s to join the others and set up (read and tokenise its data, build
# or load its model: long calls that may hold the GIL, and its heartbeat with it); after that, peer_timeout_s.
SETUP_FACTOR = 10


class Diverged(Exception):
    """Non-finite losses or gradients: every party sees the same votes and stops at the same step."""


class Interrupted(BaseException):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) arrived; a BaseException, so no ``except Exception`` eats it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def say(line: str) -> None:
    """One line to stdout in a single write, so the parties' lines never interleave mid-line."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def error_line(rank: int, message: str) -> None:
    """The one line a party prints when it stops, to stderr in a single write."""
    sys.stderr.write(f"pcmoe: error (party {rank}): {message}\n")
    sys.stderr.flush()


def exit_now(code: int) -> NoReturn:
    """End this process at once, its output flushed, without the interpreter's finalization: there a process group
    with a lost peer can hang, and a C++ thread of torch's still running can abort even a finished party (SIGABRT,
    "terminate called without an active exception": seen in the tests' party processes)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resume_command(argv: list[str]) -> str:
    """The command that resumes this run: the launcher's (``PCMOE_COMMAND``), torchrun's or this process's,
    with --set train.resume=true instead of any train.resume or train.overwrite setting."""
    if command := os.environ.get("PCMOE_COMMAND"):
        words = shlex.split(command)
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        words = ["torchrun", f"--nproc-per-node={os.environ.get('LOCAL_WORLD_SIZE', 1)}", "-m", "pcmoe_engine.train",
                 *argv]
    else:
        words = ["python", "-m", "pcmoe_engine.train", *argv]
    kept, i = [], 0
    while i < len(words):
        setting = words[i + 1] if words[i] == "--set" and i + 1 < len(words) else words[i].removeprefix("--set=")
        if setting.startswith(("train.resume=", "train.overwrite=")) and words[i].startswith("--set"):
            i += 2 if words[i] == "--set" else 1
            continue
        kept.append(words[i])
        i += 1
    return shlex.join([*kept, "--set", "train.resume=true"])


def out_of_memory(e: BaseException) -> str | None:
    """"GPU" or "CPU" when ``e`` is an allocation failure, else None."""
    if isinstance(e, torch.OutOfMemoryError):
        return "GPU"
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)):
        return "CPU"
    return None


def die_with_parent() -> None:
    """In a launched party, before it starts (Popen's preexec_fn): SIGTERM when the launcher dies, even by
    SIGKILL (Linux's PR_SET_PDEATHSIG), so no party outlives it. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher died before the call
        os.kill(os.getpid(), signal.SIGTERM)


_WHY = {"run": "stopped answering (killed, hung or cut off)", "fail": "stopped with an error (its own line says why)",
        "signal": "was stopped by {}", "lost": "stopped: it lost this party"}  # what a party's last heartbeat says


def _state(heartbeat: str) -> str:
    return heartbeat.split()[2] if heartbeat else "run"


class Progress:
    """Where a run stands, for the line a stopping party prints: ``party`` (the Party, once built: its step and
    last committed checkpoint) and ``resume`` (the command that resumes the run); ``joined``: the party has
    exchanged its handshake with every other, so none of them is still setting up."""

    def __init__(self, resume: str):
        self.party, self.resume, self.joined = None, resume, False

    @property
    def step(self) -> int:
        return self.party.step_count if self.party is not None else 0

    def status(self) -> str:
        committed = self.party.committed if self.party is not None else None
        where = "no common checkpoint yet" if committed is None else f"last common checkpoint: step {committed}"
        return f"at step {self.step}; {where}; resume every party with: {self.resume}"


class Watchdog:
    """Heartbeats through ``store`` (a TCPStore client of its own) between party ``rank`` and the others, and the
    judge of their silence: see the module docstring."""

    def __init__(self, store: dist.Store, rank: int, parties: int, timeout_s: float, progress: Progress):
        self.store = dist.PrefixStore("pcmoe/heartbeat", store)
        self.rank, self.others, self.progress = rank, [p for p in range(parties) if p != rank], progress
        self.interval = min(0.5, timeout_s / 8)
        self.grace = min(timeout_s, 3.0)
        self.timeout_s = self.limit = timeout_s
        self.setup_s = SETUP_FACTOR * timeout_s
        self.blaming = False  # a collective failed: silence counts from grace, for every party
        self.state = self.published = "run"
        now = time.monotonic()
        self._seen = {p: ("", now) for p in self.others}  # the last heartbeat read, and when it last changed
        self._store_ok = now
        self._claim = threading.Lock()
        self._stopped = False
        self._threads = [threading.Thread(target=self._beat, name="pcmoe-heartbeat", daemon=True),
                         threading.Thread(target=self._judge, name="pcmoe-watchdog", daemon=True)]
        for thread in self._threads:
            thread.start()

    def _beat(self) -> None:
        beats = 0
        while not self._stopped:
            try:
                beats += 1
                state = self.state if self.state != "run" or self.progress.party is not None else "setup"
                self.store.set(str(self.rank), f"{beats} {self.progress.step} {state}")
                self.published = state
                for p in self.others:
                    if self.store.check([str(p)]) and (value := self.store.get(str(p)).decode()) != self._seen[p][0]:
                        self._seen[p] = (value, time.monotonic())
                self._store_ok = time.monotonic()
            except Exception:  # noqa: BLE001 -- the store's host is gone: the judge notices the silence
                pass
            time.sleep(self.interval)

    def _gone(self, limit: float) -> dict[int, str]:
        """The parties that stopped (their last heartbeat says so: failed, signalled, lost another party) or have
        been silent for more than ``limit`` seconds (one still setting up: ``setup_s``, unless a collective has
        failed), each with what happened to it; those past setup first."""
        now, gone, noticed, setting_up = time.monotonic(), {}, {}, {}
        if self.rank != 0 and now - self._store_ok > limit:
            gone[0] = "is unreachable (it hosts the rendezvous store)"
        for p, (heartbeat, changed) in self._seen.items():
            state, _, detail = _state(heartbeat).partition(":")
            if state == "setup" and self.progress.joined:
                # Stale: that party has joined the handshake, so it is past setup; it ran its first steps before
                # its heartbeat thread next beat (the main thread had the GIL), then stopped. Silent like a runner.
                state = "run"
            if state == "setup":
                if now - changed > (limit if self.blaming else self.setup_s):
                    setting_up[p] = f"stopped answering while setting up (killed, hung or cut off; or reading more " \
                                    f"than {self.setup_s:g} s)"
            elif state == "lost" and int(detail) != self.rank:  # it stopped for another party's sake: the culprit
                noticed.setdefault(int(detail), f"stopped answering (party {p} noticed first)")
            elif state != "done" and (state != "run" or now - changed > limit):
                gone.setdefault(p, _WHY[state].format(detail))
        return (noticed | gone) or setting_up

    def _judge(self) -> None:
        tick = time.monotonic()
        while not self._stopped:
            time.sleep(self.interval / 2)
            now = time.monotonic()
            last, tick = tick, now
            if now - last > max(2.0, 4 * self.interval):  # this process stood still (a long call holding the
                self._seen = {p: (heartbeat, now) for p, (heartbeat, _) in self._seen.items()}  # GIL): nobody's
                self._store_ok = now  # silence counts from before
            elif self.state == "run" and (gone := self._gone(self.limit)):
                culprit = min(gone)
                if self.claim(f"lost:{culprit}"):
                    error_line(self.rank, f"party {culprit} {gone[culprit]} {self.progress.status()}")
                    self.leave()
                    exit_now(ExitCode.PEER_LOST)

    def blame(self) -> None:
        """After a collective failed: give the judge ``grace`` seconds to find the party that stopped (it then
        ends the process); returns if every party still answers."""
        self.limit, self.blaming = self.grace, True
        time.sleep(self.grace + 4 * self.interval)
        self.limit, self.blaming = self.timeout_s, False

    def claim(self, state: str) -> bool:
        """Take the process's way out (``state``: fail, signal:<name>, lost:<party> or done); False if the judge or
        the main thread already has."""
        with self._claim:
            if self.state != "run":
                return False
            self.state = state
            return True

    def leave(self) -> None:
        """Let this party's last state reach the store, then stop both threads. Party 0, which hosts the store,
        first waits for the others to read it (done: for their files, which they write before they say done),
        until each has stopped running or gone silent."""
        deadline = time.monotonic() + 2 * self.interval + 0.25
        while (self.published != self.state and time.monotonic() < deadline
               and time.monotonic() - self._store_ok < 2 * self.interval):  # not when the store is gone
            time.sleep(self.interval / 4)
        if self.rank == 0:
            deadline = time.monotonic() + (self.timeout_s if self.state == "done" else self.grace + 2 * self.interval)
            while (time.monotonic() < deadline and not self._gone(self.grace)
                   and any(_state(heartbeat) in ("run", "setup") for heartbeat, _ in self._seen.values())):
                time.sleep(self.interval / 2)
        self._stopped = True
        # A daemon thread still inside a store call when the interpreter exits is ended mid-C++ frame, which aborts
        # the process ("terminate called without an active exception"): a finished run would die by SIGABRT.
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2 * self.interval + 1.0)
