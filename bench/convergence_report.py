"""The convergence study's figure and README section, from its results file (bench/convergence.py writes both at
the end of every call; ``python -m bench.convergence_report RESULTS.json [--readme README.md]`` redraws them).

Final held-out loss = each run's last evaluation. PC-MoE party i is compared on its own domain with the centralized
run that pooled the same domains (``central`` for 4 parties, ``central-2`` for 2) and with ``local-<domain>``, both
of its own family (a run from the public checkpoint, ``-ft``, with ``central-2-ft`` and ``local-<domain>-ft`` from
the same checkpoint), at the last step all three evaluated (a run a budget stopped is compared where it stopped):
the gap is (PC-MoE / other - 1), in percent.
"""

import argparse
import json
from pathlib import Path

MiB = 2**20
TARGET = 2.0  # percent: PC-MoE within this of centralized on every domain (issue 14)


def _final(state: dict, party: int) -> dict | None:
    evals = state["evals"][party]
    return evals[-1] if evals else None


def own_losses(study: dict, name: str, step: int | None = None) -> dict[str, float]:
    """{domain: held-out loss on it} of a run at its last evaluation (or at ``step``: the domains it evaluated
    then): a PC-MoE party's on its own domain, a centralized run's on each domain it pooled, a local run's on its
    domain."""
    state = study["runs"].get(name)
    if state is None:
        return {}
    out = {}
    for party in range(state["parties"]):
        evals = state["evals"][party]
        found = _final(state, party) if step is None else next((e for e in evals if e["step"] == step), None)
        domains = state["domains"] if state["kind"] == "central" else state["domains"][party:party + 1]
        for d in domains if found else ():
            out[d] = found["domains"][d]
    return out


def _evaluated(study: dict, name: str, domain: str) -> set[int] | None:
    """The steps at which run ``name`` evaluated ``domain`` (for its own party); None if there is no such run."""
    state = study["runs"].get(name)
    if state is None or domain not in state["domains"]:
        return None
    party = state["domains"].index(domain) if state["kind"] == "pcmoe" else 0
    return {e["step"] for e in state["evals"][party]}


def _tokens_per_step(state: dict) -> int:
    """The tokens a run trains on per step and party; for a centralized run, per pooled domain."""
    return state["tokens_per_step"] // (len(state["domains"]) if state["kind"] == "central" else 1)


def _family(state: dict) -> str:
    """The suffix of a run's family: "-ft" for the runs from the public checkpoint, "" for those from scratch."""
    return "-ft" if state.get("public_init") else ""


def _start(study: dict, name: str) -> str | None:
    """The public checkpoint a run started from (bench/convergence.py's STAMP): None from scratch, or no such run."""
    return study["runs"].get(name, {}).get("public_checkpoint")


def _central_for(state: dict) -> str:
    return ("central" if len(state["domains"]) == 4 else "central-2") + _family(state)


def _gap(row: dict | None, state: dict) -> str:
    """A PC-MoE cell's gap to centralized and local-only, and the step of that comparison when it is not the last."""
    if row is None:
        return ""
    gaps = [f"{row[key]:+.1f}% {what}" for key, what in (("gap_central_pct", "vs central"),
                                                          ("gap_local_pct", "vs local")) if row[key] is not None]
    at = "" if row["step"] == state["steps_done"] else f", at step {row['step']}"
    return f" ({'; '.join(gaps)}{at})" if gaps else ""


def _steps(state: dict, study: dict) -> str:
    total = study["scale"]["steps"]
    return "" if state["complete"] else f" (step {state['steps_done']} of {total})"


def _memory(state: dict) -> str:
    peaks = [p for p in state["peak_memory_bytes"] if p is not None]
    kind = "GPU" if state["peak_memory_kind"].startswith("gpu") else "RSS"
    return ", ".join(f"{p / MiB:,.0f}" for p in peaks) + f" MiB {kind}" if peaks else "-"


def comparison(study: dict) -> list[dict]:
    """Per PC-MoE run and domain: its party's own-domain loss, the centralized and local-only ones and the gaps, at
    the last step that all three evaluated (the PC-MoE run's last, unless a reference stopped earlier: ``step``)."""
    rows = []
    for name, state in study["runs"].items():
        if state["kind"] != "pcmoe":
            continue
        for d in state["domains"]:
            refs = {"central": _central_for(state), "local": f"local-{d}{_family(state)}"}
            # -ft runs from another public checkpoint than this one's are not its references
            refs = {k: run if _start(study, run) == state.get("public_checkpoint") else None for k, run in refs.items()}
            steps = [_evaluated(study, run, d) for run in (name, *refs.values())]
            common = set.intersection(*(s for s in steps if s is not None))
            if not common:
                continue
            step = max(common)
            loss = own_losses(study, name, step)[d]
            central, local = (own_losses(study, run, step).get(d) if run else None for run in refs.values())
            rows.append({"run": name, "domain": d, "step": step, "loss": loss, "central": central, "local": local,
                         "gap_central_pct": None if central is None else 100 * (loss / central - 1),
                         "gap_local_pct": None if local is None else 100 * (loss / local - 1),
                         "below_local": None if local is None else loss < local})
    return rows


def diagnostics(state: dict) -> dict:
    """Per party of a run: the expert load's max / mean over the experts (each layer's, averaged over the layers and
    the last 10% of steps: this party's routing), and the share of steps whose backbone and expert-shard gradient
    norms exceeded their clipping bounds (optim.grad_bound)."""
    model, clip = state["config"]["model"], state["config"]["train"]["grad_clip"]
    experts = model["num_experts"]
    out = []
    for party in range(state["parties"]):
        loads = [max(layer) / (sum(layer) / experts) for step in state["expert_load"][party] for layer in step]
        local = len(range(party, experts, state["parties"]))
        bounds = (clip, clip * (local / experts) ** 0.5)
        norms = state["grad_norms"][party]
        clipped = [sum(n[i] > bounds[i] for n in norms) / max(1, len(norms)) for i in (0, 1)] if clip > 0 else [0, 0]
        out.append({"load_max_over_mean": sum(loads) / max(1, len(loads)), "backbone_clipped": clipped[0],
                    "experts_clipped": clipped[1]})
    return out


def readme_section(study: dict) -> str:
    """The README's table: final held-out loss per run and domain, union, tokens, wall time, peak memory."""
    s, env, domains = study["scale"], study["environment"], study["domains"]
    tokens = s["steps"] * s["batch"] * s["seq_len"]
    calls = [call for state in study["runs"].values() for call in state["calls"]]
    commits = sorted({call["commit"] for call in calls if "commit" in call})
    unrecorded = "; older calls recorded none" if any("commit" not in call for call in calls) else ""
    lines = [f"**{study['label']}** (`python -m bench.convergence --scale {study['scale_name']}`, "
             f"`bench/results/convergence/convergence_{study['scale_name']}.json`, {env['device'] or 'CPU'}, "
             f"{'commit' if len(commits) == 1 else 'commits'} {', '.join(commits)}{unrecorded}, "
             f"{env['date'][:10]}): model `{', '.join(s['model'])}`, {s['steps']} steps of "
             f"{s['batch']} x {s['seq_len']} tokens per party (per domain, for a centralized run), lr {s['lr']:g}; "
             f"held-out loss on each domain's first {s['eval_windows']} held-out windows (bench/convergence.py "
             "says exactly what), at the last step. A PC-MoE party is on its own domain; in brackets, its gap to the "
             "centralized run of the same domains and to the local-only run of its domain, both of its family (a -ft "
             "run, from the public checkpoint, to central-2-ft and local-<domain>-ft), at the last step all three "
             "evaluated.", "",
             "| run | parties | " + " | ".join(domains) + " | union (per party) | tokens per party | wall | peak memory "
             "per party |", "|---|---|" + "---|" * len(domains) + "---|---|---|---|"]
    rows = comparison(study)
    for name, state in study["runs"].items():
        mine = own_losses(study, name)
        gaps = {r["domain"]: r for r in rows if r["run"] == name}
        cells = [f"{mine[d]:.3f}{_gap(gaps.get(d), state)}" if d in mine else "" for d in domains]
        unions = [f"{f['union']:.3f}" for p in range(state["parties"]) if (f := _final(state, p))]
        lines.append(f"| {name}{_steps(state, study)} | {state['parties']} | " + " | ".join(cells) +
                     f" | {' / '.join(unions)} | {state['steps_done'] * _tokens_per_step(state):,} | "
                     f"{state['wall_s']:,.0f} s | {_memory(state)} |")
    lines += ["", "Per party: the expert load's max / mean (this party's routing, last 10% of steps), and the share of steps "
              "whose gradient norm exceeded its clipping bound (backbone; expert shard):", "",
              "| run | expert load, max / mean | backbone clipped | expert shard clipped |", "|---|---|---|---|"]
    for name, state in study["runs"].items():
        d = diagnostics(state)
        lines.append(f"| {name} | " + " | ".join(" / ".join(fmt.format(p[key]) for p in d) for key, fmt in (
            ("load_max_over_mean", "{:.2f}"), ("backbone_clipped", "{:.0%}"), ("experts_clipped", "{:.0%}"))) + " |")
    method = [r for r in rows if not study["runs"][r["run"]]["diagnostic"]]  # the method's runs, from scratch
    shipped = [r for r in rows if r["run"] == "pcmoe-2p-ft"]  # the method as shipped, from the public checkpoint
    if method or shipped:
        lines += ["", f"Target (issue 14): PC-MoE within {TARGET:g}% of centralized on every domain, and below "
                      f"local-only on every party's domain, at {tokens:,} tokens per party. "
                  + " ".join(f"{what}, {_verdict(found)}" for what, found in (
                      ("From scratch", method), ("From the public checkpoint (pcmoe-2p-ft)", shipped)) if found)]
    return "\n".join(lines) + "\n"


def _verdict(rows: list[dict]) -> str:
    within = [r for r in rows if r["gap_central_pct"] is not None]
    worst = max(within, key=lambda r: r["gap_central_pct"]) if within else None
    below = [r for r in rows if r["below_local"] is not None]
    verdict = "within" if worst and worst["gap_central_pct"] <= TARGET else "not within"
    return ((f"the largest gap to centralized is {worst['gap_central_pct']:+.1f}% ({worst['run']}, "
             f"{worst['domain']}), {verdict} the target; " if worst else "")
            + (f"PC-MoE is below local-only on {sum(r['below_local'] for r in below)} of {len(below)} party domains."
               if below else ""))


def write_figure(study: dict, path: Path) -> Path | None:
    """Held-out loss against tokens per party: one panel per domain (every run that trained on it), the union, and
    PC-MoE's gap to centralized per domain."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    s, domains, runs = study["scale"], study["domains"], study["runs"]
    fig = Figure(figsize=(15, 8.5))
    axes = fig.subplots(2, 3).flatten()
    styles = {"central": ("black", "-"), "central-2": ("grey", "-"), "pcmoe-4p": ("tab:blue", "-"),
              "pcmoe-2p": ("tab:orange", "-"), "pcmoe-4p-shared-init": ("tab:purple", ":"),
              "pcmoe-2p-shared-init": ("tab:brown", ":"), "central-party-batch": ("black", ":"),
              "central-2-party-batch": ("grey", ":"), "local": ("tab:red", "--"),
              "public-pretrain": ("tab:green", "-."), "central-2-ft": ("grey", "-."), "pcmoe-2p-ft": ("tab:orange", "-."),
              "pcmoe-2p-ft-no-noise": ("tab:olive", "-."), "pcmoe-2p-ft-noise-0.1": ("goldenrod", "-."),
              "pcmoe-2p-ft-noise-0.3": ("darkkhaki", "-."), "local-ft": ("tab:red", "-.")}
    spare = iter(("tab:cyan", "tab:pink", "tab:gray"))

    def style(name: str, state: dict) -> tuple[str, str]:
        """A run's colour and line: its own, or (a run this figure does not know) a spare colour, dotted."""
        key = f"local{_family(state)}" if state["kind"] == "local" else name
        return styles.setdefault(key, (next(spare, "black"), ":"))

    def curve(state, party, key):
        points = [(e["step"] * _tokens_per_step(state), key(e)) for e in state["evals"][party]]
        return [x for x, _ in points], [y for _, y in points]

    for ax, d in zip(axes, domains):
        for name, state in runs.items():
            if d not in state["domains"]:
                continue
            party = 0 if state["kind"] != "pcmoe" else state["domains"].index(d)
            colour, line = style(name, state)
            ax.plot(*curve(state, party, lambda e: e["domains"][d]), line, color=colour, marker=".",
                    label=name if state["kind"] != "pcmoe" else f"{name} (party {party})")
        ax.set_title(f"held-out loss on {d}")
        if not ax.lines:  # a study in phases: no run of this domain yet
            ax.text(0.5, 0.5, "no run on this domain yet", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
    ax = axes[len(domains)]
    for name, state in runs.items():
        colour, line = style(name, state)
        for party in range(state["parties"]):
            first = party == 0 and (state["kind"] != "local" or name == f"local-{domains[0]}{_family(state)}")
            ax.plot(*curve(state, party, lambda e: e["union"]), line, color=colour, linewidth=1,
                    label=(f"local-only{_family(state)}" if state["kind"] == "local" else name) if first else None)
    ax.set_title("held-out loss on the union (every party)")
    ax = axes[len(domains) + 1]
    for name, state in runs.items():
        central = runs.get(_central_for(state)) if state["kind"] == "pcmoe" else None
        if central is None:
            continue
        for party, d in enumerate(state["domains"]):
            reference = {e["step"]: e["domains"][d] for e in central["evals"][0]}
            points = [(e["step"] * _tokens_per_step(state), 100 * (e["domains"][d] / reference[e["step"]] - 1))
                      for e in state["evals"][party] if e["step"] in reference]
            ax.plot([x for x, _ in points], [y for _, y in points], style(name, state)[1], marker=".",
                    label=f"{name}: {d}")
    ax.axhline(TARGET, color="green", linewidth=0.8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title(f"PC-MoE's own-domain gap to centralized, % (target {TARGET:g}%)")
    for ax in axes:
        ax.set_xlabel("tokens per party (per domain)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
    for ax in axes[:len(domains) + 1]:
        ax.set_ylabel("cross-entropy")
        top = [y for line in ax.lines for y in line.get_ydata()[1:]]  # step 0 (untrained) would flatten the rest
        if top:
            ax.set_ylim(min(top) - 0.05, max(top) + 0.05)
    fig.suptitle(f"{study['label']}: {', '.join(s['model'])}, {s['steps']} steps of {s['batch']} x {s['seq_len']} "
                 "tokens per party")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.convergence_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--readme", type=Path)
    args = parser.parse_args(argv)
    study = json.loads(args.results.read_text())
    print(f"wrote {write_figure(study, args.results.with_suffix('.png'))}")
    if args.readme:
        print(rewrite_readme(args.readme, study))


def rewrite_readme(readme: Path, study: dict) -> str:
    """Replace the README's section between the study's scale's markers with ``readme_section(study)``."""
    text = readme.read_text()
    start, end = (f"<!-- convergence:{study['scale_name']}:{mark} -->" for mark in ("start", "end"))
    if start not in text or end not in text:
        raise SystemExit(f"convergence: error: {readme} has no {start} ... {end} section to rewrite")
    head, rest = text.split(start, 1)
    readme.write_text(head + start + "\n" + readme_section(study) + rest[rest.index(end):])
    return f"rewrote the convergence section of {readme}"


if __name__ == "__main__":
    main()
