"""What `pcmoe train` shows while its parties train, drawn by the launcher alone from each party's metrics.jsonl as
the party appends to it: the parties print nothing (they run with --quiet), so no party's output garbles
another's, and the display adds no traffic between them.

In a terminal: one live line per party (rich): its bar, step, loss, held-out loss, speed, elapsed time and ETA.
Otherwise (CI, a file): the progress lines `python -m pcmoe_engine.train` prints, every train.log_every steps.
"""

import json
import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .checkpoint import checkpoint_steps
from .config import Config
from .faults import say
from .metrics import PartyProgress, duration
from .party import party_device

__all__ = ["RunProgress"]


class RunProgress:
    """``with RunProgress(cfg) as progress: ... progress.poll() ...`` around the parties' run; ``live``: draw live
    lines (default: when stdout is a terminal)."""

    def __init__(self, cfg: Config, live: bool | None = None):
        self.cfg = cfg
        party_dirs = [cfg.run_dir / f"party{i}" for i in range(cfg.parties)]
        self.paths = [d / "metrics.jsonl" for d in party_dirs]
        self.offsets = [0] * cfg.parties
        # With train.resume, the parties continue from the latest step all of them hold (lockstep.handshake), and each
        # first rewrites its records up to it: shown as one "resumed" line.
        held = [set(checkpoint_steps(d / "checkpoints")) for d in party_dirs] if cfg.train.resume else [set()]
        self.resumed = [max(set.intersection(*held), default=0)] * cfg.parties
        kind = "rss" if party_device(cfg).type == "cpu" else "gpu"
        self.parties = [PartyProgress(i, cfg.train, kind) for i in range(cfg.parties)]
        self.started = time.time()
        self.live = None
        if sys.stdout.isatty() if live is None else live:
            self.live = Progress(TextColumn("party {task.fields[party]}"), BarColumn(bar_width=24),
                                 MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn())
            self.tasks = [self.live.add_task("", total=cfg.train.steps, party=i, status="starting")
                          for i in range(cfg.parties)]

    def __enter__(self) -> "RunProgress":
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        self.poll()
        if self.live is not None:
            self.live.stop()

    def _new_records(self, i: int) -> list[dict]:
        """The complete records party ``i`` appended since the last poll."""
        path = self.paths[i]
        try:
            stat = path.stat()
        except FileNotFoundError:
            return []
        if stat.st_mtime < self.started:  # an earlier run's file, not yet rewritten by this run's party
            return []
        if stat.st_size < self.offsets[i]:  # rewritten since
            self.offsets[i] = 0
        with open(path, "rb") as f:
            f.seek(self.offsets[i])
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offsets[i] += len(complete)
        return [json.loads(line) for line in complete.splitlines()]

    def poll(self) -> None:
        """Read what the parties have logged since the last poll and show it."""
        for i, party in enumerate(self.parties):
            records = self._new_records(i)
            for record in records:
                line = party.add(record)
                if self.live is not None:
                    continue
                if record["step"] > self.resumed[i]:
                    if line:
                        say(line)
                elif record["step"] == self.resumed[i] and "loss" in record:
                    say(f"party {i} | resumed at step {record['step']}")
            if self.live is not None and records and party.last is not None:
                self.live.update(self.tasks[i], completed=party.last["step"], status=self._status(party))

    @staticmethod
    def _status(party: PartyProgress) -> str:
        r = party.last
        held_out = "" if party.eval_loss is None else f" | eval {party.eval_loss:.3f}"
        eta = "" if party.eta_s is None else f" | ETA {duration(party.eta_s)}"
        return f"loss {r['loss']:.3f}{held_out} | {r['tokens_per_s']:,.0f} tok/s{eta}"
