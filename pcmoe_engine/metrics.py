"""What a run writes and says about itself: each party's metrics (party<i>/metrics.jsonl, one JSON record per step
and per evaluation; with train.tensorboard, the same as TensorBoard event files in party<i>/), its summary
(party<i>/summary.json), party 0's merge of every party's files into the run's own metrics.jsonl and summary.json,
and the lines a run prints: the start line, the progress lines (with an ETA) and the final summary. `pcmoe train`
and `python -m pcmoe_engine.train` print the same ones (progress.py draws them live in a terminal).
"""

import json
from collections import deque
from pathlib import Path

import torch

from .config import Config, TrainConfig
from .faults import say
from .party import Party, party_device, peak_memory, process_group_backend

__all__ = ["MetricsLog", "PartyProgress", "start_line", "duration", "summary_text", "write_summary",
           "merge_run"]

MiB = 2**20


def start_line(cfg: Config) -> str:
    """What a run is about to do: parties, model, backend and devices, tokens per step, steps, run folder."""
    t, m = cfg.train, cfg.model
    backend = process_group_backend(cfg)
    if party_device(cfg).type == "cpu":
        where = "CPU"
    elif backend == "nccl":
        where = "one GPU per party"
    else:
        gpus = torch.cuda.device_count()
        where = f"{gpus} GPU{'s' if gpus > 1 else ''} shared by the parties"
    backend = f" over {backend}" if cfg.parties > 1 else ""
    per_step = t.batch_size * t.grad_accum * cfg.data.seq_len
    sequences = f"{t.batch_size} x {t.grad_accum}" if t.grad_accum > 1 else f"{t.batch_size}"
    line = (f"pcmoe: {cfg.parties} part{'y' if cfg.parties == 1 else 'ies'} train {m.preset} ({m.num_experts} "
            f"experts) on {where}{backend} | {per_step:,} tokens per party and step ({sequences} x {cfg.data.seq_len}),"
            f" {t.steps:,} steps | run folder {cfg.run_dir}")
    privacy = cfg.privacy.resolved(bool(m.init_from))
    if cfg.parties > 1 and (privacy.hidden_noise or privacy.grad_noise):
        line += f" | noise {privacy.hidden_noise:g} on hidden states, {privacy.grad_noise:g} on output gradients"
    elif cfg.parties > 1 and m.init_from:
        line += ("\npcmoe: warning: privacy.hidden_noise and grad_noise are 0 with model.init_from: the hosts know the "
                 "starting weights, so the hidden states and gradients they receive are not private (docs/privacy.md)")
    return line


def duration(seconds: float) -> str:
    """1m05s, or 2h03m."""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


class PartyProgress:
    """One party's progress, from its metrics records: the last step's record, the last held-out loss, and the
    time left (the mean time of the last 20 steps, the first step's warm-up left out, times the steps left;
    evaluations and checkpoints not counted)."""

    def __init__(self, party: int, train: TrainConfig, memory_kind: str):
        self.party, self.train, self.steps, self.memory_kind = party, train, train.steps, memory_kind
        self.last: dict | None = None
        self.eval_loss: float | None = None
        self.step_times = deque(maxlen=20)

    def add(self, record: dict) -> str | None:
        """Take a step's or an evaluation's record; returns its line to print: every evaluation's, and the
        progress line of the first, every train.log_every-th and the last step."""
        step = record["step"]
        if "eval_loss" in record:
            self.eval_loss = record["eval_loss"]
            return f"party {self.party} | eval loss {self.eval_loss:.4f}"
        self.last = record
        if step > 1:
            self.step_times.append(record["step_time_s"])
        return self.line() if step == 1 or step % self.train.log_every == 0 or step == self.steps else None

    @property
    def eta_s(self) -> float | None:
        if not self.step_times or self.last is None or self.last["step"] == self.steps:
            return None
        return (self.steps - self.last["step"]) * sum(self.step_times) / len(self.step_times)

    def line(self) -> str:
        """The last step's progress line: loss, learning rate, speed, memory, traffic and the time left."""
        r = self.last
        eta = "" if self.eta_s is None else f" | ETA {duration(self.eta_s)}"
        return (f"party {self.party} | step {r['step']:>{len(str(self.steps))}}/{self.steps} | loss {r['loss']:.4f} | "
                f"lr {r['lr']:.2e} | {r['tokens_per_s']:,.0f} tok/s | peak mem {r['peak_memory_bytes'] / MiB:,.0f} "
                f"MiB ({self.memory_kind}) | sent {r['bytes_sent'] / MiB:,.1f} MiB{eta}")


class MetricsLog:
    """A party's metrics (party<i>/metrics.jsonl, each step's record with the tokens the party has trained on;
    with train.tensorboard, TensorBoard scalars too) and, unless ``quiet``, its progress lines. Made after
    ``party.resume()``: what was logged after the checkpoint resumed from is dropped, so the file reads as if the
    run had never stopped."""

    def __init__(self, party: Party, quiet: bool = False):
        path, resume_step, cfg = party.dir / "metrics.jsonl", party.step_count, party.cfg
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a", buffering=1)
        self.party, self.tokens_per_step, self.quiet = party.rank, party.tokens_per_step, quiet
        memory_kind = "rss" if peak_memory(party.device)[1] == "cpu_max_rss" else "gpu"
        self.progress = PartyProgress(party.rank, cfg.train, memory_kind)
        self.tensorboard = None
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops what an interrupted run logged after the checkpoint resumed from.
            self.tensorboard = SummaryWriter(str(path.parent), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        """Append a step's or an evaluation's record, and print its line (PartyProgress.add) unless quiet."""
        if "loss" in record:
            record = {"step": record["step"], "tokens": record["step"] * self.tokens_per_step, **record}
        self.file.write(json.dumps({"party": self.party, **record}) + "\n")
        line = self.progress.add(record)
        if line and not self.quiet:
            say(line)
        if self.tensorboard is not None:
            names = ("eval_loss",) if "eval_loss" in record else (
                "loss", "load_balancing_loss", "z_loss", "lr", "grad_norm", "expert_grad_norm", "tokens_per_s",
                "bytes_sent")
            for name in names:
                self.tensorboard.add_scalar(name, record[name], record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def write_summary(path: Path, summary: dict) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")


def summary_text(summary: dict, run_dir: Path) -> str:
    """The run's final summary, as `pcmoe train` and party 0 under torchrun print it."""
    s = summary
    lines = [f"\n{run_dir}: {s['parties']} part{'y' if s['parties'] == 1 else 'ies'}, preset {s['preset']}, "
             f"{s['steps']} steps"]
    for i in range(s["parties"]):
        if i in s["parties_missing"]:
            continue
        lines.append(f"  party {i}: loss {s['initial_loss'][i]:.3f} -> {s['final_loss'][i]:.3f}, eval "
                     f"{s['eval_loss'][i]:.3f} | {s['tokens_per_s'][i] or 0:,.0f} tok/s | peak mem "
                     f"{s['peak_memory_bytes'][i] / MiB:,.0f} MiB ({s['peak_memory_kind']}) | sent "
                     f"{s['bytes_sent'][i] / MiB:,.1f} MiB, received {s['bytes_received'][i] / MiB:,.1f} MiB")
    if missing := s["parties_missing"]:
        lines.append(f"  part{'y' if len(missing) == 1 else 'ies'} {', '.join(map(str, missing))}: no files here (on "
                     "other hosts, each party's party<i>/ is in its own train.out_dir)")
    lines.append(f"  total {s['tokens_per_s_total']:,.0f} tok/s; summary.json and metrics.jsonl are in {run_dir} "
                 f"(pcmoe plot {run_dir}: a figure of the losses)")
    return "\n".join(lines)


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
