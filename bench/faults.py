"""How fast a run notices a lost party, measured on this machine: ``python -m bench.faults [--peer-timeout S]
[--repeat N]`` prints the README's "Faults survived" table.

Each scenario launches ``pcmoe train`` (2 CPU parties over gloo, a small model, a checkpoint every 5 steps),
waits for step 12, then kills a party (SIGKILL), stops one (SIGSTOP), or kills or stops the launcher, and times
what follows: until the other party prints its line, or until no party is left. ``Run`` is also what
tests/test_engine_faults.py drives.
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["Run", "alive", "SMALL"]

ROOT = Path(__file__).parent.parent
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.expert_intermediate_size=64",
         "model.shared_intermediate_size=32", "data.seq_len=32", "train.batch_size=4", "train.log_every=1",
         "train.eval_batches=2", "train.warmup_steps=2"]


class Run:
    """`pcmoe train` in a process of its own, with ``SMALL`` and ``overrides`` (or ``command``); its output lines
    (stdout and stderr) collected as they come, each with the time it arrived."""

    def __init__(self, out_dir, *overrides, parties: int = 2, command: list[str] | None = None):
        sets = [a for o in [f"train.out_dir={out_dir}", *SMALL, *overrides] for a in ("--set", o)]
        self.command = command or [sys.executable, "-m", "pcmoe_engine.cli", "train", "--parties", str(parties), *sets]
        self.process = subprocess.Popen(self.command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, pattern: str, timeout: float = 120) -> float:
        """Until a line matches ``pattern``; returns when it arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, line in self.lines:
                if re.search(pattern, line):
                    return at
            if self.process.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"no line matching {pattern!r}; the run ended:\n{self.output()}")
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.output()}")

    def parties(self) -> dict[int, int]:
        """party -> pid, read from the launcher's children."""
        pid = self.process.pid
        ranks = {}
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            ranks[int(next(e for e in environ if e.startswith(b"RANK="))[5:])] = int(child)
        return ranks

    def finish(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code

    def errors(self) -> list[tuple[float, str]]:
        """The parties' own lines when they stop (not the start line, not the launcher's)."""
        return [(at, line) for at, line in self.lines if line.startswith("pcmoe: error")]

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _gone(pids, since: float, timeout: float = 120) -> float:
    while any(alive(pid) for pid in pids) and time.monotonic() - since < timeout:
        time.sleep(0.01)
    return time.monotonic() - since


def measure(scenario: str, out_dir: Path, peer_timeout_s: float) -> dict:
    """One scenario: seconds until the surviving party's line (``detected``), until no party is left
    (``all_gone``), the step reached and the last common checkpoint the line names."""
    run = Run(out_dir, "train.steps=100000", "train.checkpoint_every=5", f"train.peer_timeout_s={peer_timeout_s}")
    run.wait_for(r"party \d \| step +12/")
    pids = run.parties()
    victim, how = {"kill party 1": (pids[1], signal.SIGKILL), "kill party 0": (pids[0], signal.SIGKILL),
                   "stop party 1": (pids[1], signal.SIGSTOP), "stop party 0": (pids[0], signal.SIGSTOP),
                   "kill launcher": (run.process.pid, signal.SIGKILL),
                   "SIGTERM to launcher": (run.process.pid, signal.SIGTERM)}[scenario]
    start = time.monotonic()
    os.kill(victim, how)
    all_gone = _gone(pids.values(), start, timeout=2 * peer_timeout_s + 60)
    run.finish()
    (at, line), *_ = run.errors()
    found = re.search(r"at step (\d+); (?:last common checkpoint: step (\d+)|no common)", line)
    return {"detected": at - start, "all_gone": all_gone, "step": int(found[1]), "checkpoint": int(found[2] or 0),
            "line": line}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-timeout", type=float, default=60.0, help="train.peer_timeout_s (default 60)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scenarios", nargs="*", default=["kill party 1", "kill party 0", "stop party 1",
                                                           "stop party 0", "kill launcher", "SIGTERM to launcher"])
    args = parser.parse_args(argv)
    print(f"| what happens (train.peer_timeout_s={args.peer_timeout:g}) | the other party's line after | no party "
          "left after | steps redone on resume |")
    print("|---|---|---|---|")
    for scenario in args.scenarios:
        runs = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as out_dir:
                runs.append(measure(scenario, Path(out_dir), args.peer_timeout))
        span = lambda key: f"{min(r[key] for r in runs):.1f}-{max(r[key] for r in runs):.1f} s (median " \
                           f"{statistics.median(r[key] for r in runs):.1f})"
        redo = sorted({r["step"] - r["checkpoint"] for r in runs})
        print(f"| {scenario} | {span('detected')} | {span('all_gone')} | {', '.join(map(str, redo))} |", flush=True)
    print(f"\nexample line: {runs[-1]['line']}")


if __name__ == "__main__":
    main()
