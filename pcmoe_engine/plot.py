"""`pcmoe plot RUN_DIR [RUN_DIR ...] [--out PNG]`: each party's training loss (a line, every step) and held-out
loss (points, every evaluation) against the tokens that party has trained on, every run on one figure; by default
written to loss.png in the first run folder. It reads the parties' own metrics files (party<i>/metrics.jsonl), so a
run still going, or stopped, plots too. matplotlib is an optional extra: pip install 'pcmoe[plot]'.
"""

import json
from pathlib import Path

__all__ = ["party_metrics", "loss_figure", "plot_runs"]


def party_metrics(run_dir: Path) -> dict[int, list[dict]]:
    """{party: its records} of a run folder."""
    files = sorted(run_dir.glob("party*/metrics.jsonl"), key=lambda p: int(p.parent.name.removeprefix("party")))
    if not files:
        raise ValueError(f"{str(run_dir)!r} holds no party*/metrics.jsonl: give run folders, e.g. runs/tiny-2p")
    return {int(f.parent.name.removeprefix("party")): [json.loads(line) for line in f.read_text().splitlines()]
            for f in files}


def loss_figure(run_dirs: list[Path]):
    """The matplotlib Figure of the runs' losses: per run and party, a training line and held-out points."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # a Figure of its own: no pyplot state, no display needed
    except ImportError:
        raise ValueError("pcmoe plot needs matplotlib: pip install 'pcmoe[plot]'") from None

    runs = {run_dir: party_metrics(run_dir) for run_dir in run_dirs}
    fig = Figure(figsize=(9, 5.5))
    ax = fig.subplots()
    colours = iter(matplotlib.colormaps["tab10"].colors * 10)
    for run_dir, parties in runs.items():
        for party, records in parties.items():
            steps = [r for r in records if "loss" in r]
            # Records written before they carried "tokens": tokens per step = tokens/s x step time.
            tokens = {r["step"]: r.get("tokens") or r["step"] * round(r["tokens_per_s"] * r["step_time_s"])
                      for r in steps}
            evals = [r for r in records if "eval_loss" in r and r["step"] in tokens]
            label = f"{run_dir.name} party {party}" if len(runs) > 1 else f"party {party}"
            colour = next(colours)
            ax.plot([tokens[r["step"]] for r in steps], [r["loss"] for r in steps], color=colour, linewidth=1,
                    alpha=0.8, label=f"{label}: training")
            if evals:
                ax.plot([tokens[r["step"]] for r in evals], [r["eval_loss"] for r in evals], "o--", color=colour,
                        label=f"{label}: held out")
    ax.set_xlabel("tokens trained on, per party")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(", ".join(run_dir.name for run_dir in runs))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_runs(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Draw the runs' losses into ``out`` (default: the first run's loss.png); returns the file written."""
    fig = loss_figure(run_dirs)
    out = out or run_dirs[0] / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
