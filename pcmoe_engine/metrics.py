"""What a run writes about itself: each party's metrics (party<i>/metrics.jsonl, one JSON record per step and
per evaluation) and progress lines, its summary (party<i>/summary.json), and party 0's merge of every party's
files into the run's own metrics.jsonl and summary.json.
"""

import json
import sys
from pathlib import Path

from .config import Config

__all__ = ["MetricsLog", "say", "write_summary", "merge_run"]

MiB = 2**20


def say(line: str) -> None:
    """One line to stdout in a single write, so the parties' lines never interleave mid-line."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class MetricsLog:
    """This party's metrics (JSON lines) and progress line. Resuming at ``resume_step`` drops what was logged
    after that step's checkpoint, so the file reads as if the run had never stopped."""

    def __init__(self, path: Path, party: int, resume_step: int = 0):
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a", buffering=1)
        self.party = party

    def write(self, record: dict) -> None:
        self.file.write(json.dumps({"party": self.party, **record}) + "\n")

    def print_step(self, r: dict, steps: int, memory_kind: str) -> None:
        kind = "rss" if memory_kind == "cpu_max_rss" else "gpu"
        say(f"party {self.party} | step {r['step']:>{len(str(steps))}}/{steps} | loss {r['loss']:.4f} | "
            f"lr {r['lr']:.2e} | {r['tokens_per_s']:,.0f} tok/s | peak mem {r['peak_memory_bytes'] / MiB:,.0f} "
            f"MiB ({kind}) | sent {r['bytes_sent'] / MiB:,.1f} MiB")

    def close(self) -> None:
        self.file.close()


def write_summary(path: Path, summary: dict) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")


def merge_run(cfg: Config) -> dict:
    """Gather the parties' summaries and metrics (as far as this machine can read them) into the run's own."""
    run_dir = cfg.run_dir
    parts = [json.loads(p.read_text()) if (p := run_dir / f"party{i}" / "summary.json").is_file() else None
             for i in range(cfg.parties)]
    present = [s for s in parts if s is not None]
    per_party = {key: [s and s[key] for s in parts] for key in (
        "initial_loss", "final_loss", "eval_loss", "tokens_per_s", "peak_memory_bytes", "bytes_sent",
        "bytes_received")}
    summary = {
        "parties": cfg.parties, "preset": cfg.model.preset, "steps": cfg.train.steps,
        "device": [s and s["device"] for s in parts], **per_party,
        "tokens_per_s_total": sum(s["tokens_per_s"] or 0 for s in present),
        "peak_memory_kind": present[0]["peak_memory_kind"] if present else None,
        "parameters": {"backbone": [s and s["parameters"]["backbone"] for s in parts],
                       "local_experts": [s and s["parameters"]["local_experts"] for s in parts]},
        "memory": [s and s["memory"] for s in parts],
        "parties_missing": [i for i, s in enumerate(parts) if s is None],
        "config": cfg.to_dict(),
    }
    write_summary(run_dir / "summary.json", summary)
    lines = []
    for i in range(cfg.parties):
        if (path := run_dir / f"party{i}" / "metrics.jsonl").is_file():
            lines += [json.loads(line) for line in path.read_text().splitlines()]
    lines.sort(key=lambda r: (r["step"], "eval_loss" in r, r["party"]))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return summary
