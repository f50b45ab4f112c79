"""PNG plots from results JSON, written next to it: per-stage times of every implementation, our speed-up
over each peer against tokens, the shares of the device's ceilings, every implementation's rate beside the
published anchors', and (end to end) per-party memory.

    python bench/plots.py [bench/results/{bench,peers}_*.json] [bench/results/e2e_*.json]
    # default: the latest bench_*.json and peers_*.json, and the latest e2e_*.json of each party count
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.report import (OURS, STAGES, anchor_cases, anchor_flops, latest, latest_e2e, table_tokens,  # noqa: E402
                          timed)


def _rows(report, **match):
    return [r for r in report["rows"] if all(r[k] == v for k, v in match.items())]


def stage_times(report: dict, out: Path, tokens: int, routing: str = "balanced") -> Path:
    """One panel per stage: ms of every implementation on every shape (log scale; missing bars did not run)."""
    stages = [s for s in STAGES if _rows(report, stage=s, tokens=tokens, routing=routing)]
    fig, axes = plt.subplots(2, (len(stages) + 1) // 2, figsize=(4.2 * ((len(stages) + 1) // 2), 7.5), squeeze=False)
    for ax, stage in zip(axes.flat, stages):
        rows = _rows(report, stage=stage, tokens=tokens, routing=routing)
        shapes = list(dict.fromkeys(r["shape"] for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            ms = [next((r.get("ms", 0) for r in rows if r["shape"] == s and r["impl"] == impl), 0) for s in shapes]
            ran = any(r.get("ms") for r in rows if r["impl"] == impl)
            ax.bar([j + i * width for j in range(len(shapes))], ms, width, label=impl if ran else f"{impl} (did not run)")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], [s.split("-")[0] for s in shapes],
                      fontsize=8)
        ax.set_yscale("log")
        ax.set_title(STAGES[stage], fontsize=9)
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(stages):]:
        ax.axis("off")
    fig.suptitle(f"{report['device']} ({report['commit']}): {tokens} tokens, {routing} routing, bf16")
    return _save(fig, out, f"stages_{tokens}_{routing}")


def speedups(report: dict, out: Path, stage: str = "layer_fwd_bwd") -> Path:
    """Our speed-up over each peer against tokens, per shape and routing (> 1: ours is faster)."""
    rows = [r for r in _rows(report, stage=stage) if r["impl"] != OURS and "pcmoe_speedup" in r]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, max(len(shapes), 1), figsize=(4.2 * max(len(shapes), 1), 3.8), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            for routing, style in (("balanced", "-o"), ("skewed", "--s")):
                pts = sorted((r["tokens"], r["pcmoe_speedup"]) for r in rows
                             if r["shape"] == shape and r["impl"] == impl and r["routing"] == routing)
                if pts:
                    ax.plot(*zip(*pts), style, label=f"vs {impl}, {routing}")
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_title(shape, fontsize=9)
        ax.legend(fontsize=7)
    axes.flat[0].set_ylabel(f"pcmoe speed-up, {stage}")
    fig.suptitle(f"{report['device']} ({report['commit']})")
    return _save(fig, out, f"speedup_{stage}")


def ceiling_shares(report: dict, out: Path, routing: str = "balanced") -> Path:
    """Our share of the measured matmul rate (compute stages) or copy bandwidth (memory-bound stages)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for stage in STAGES:
        rows = sorted((r for r in _rows(report, stage=stage, impl=OURS, routing=routing)
                       if "frac_matmul" in r or "frac_copy" in r), key=lambda r: (r["shape"], r["tokens"]))
        for shape in dict.fromkeys(r["shape"] for r in rows):
            pts = [(r["tokens"], r.get("frac_matmul", r.get("frac_copy"))) for r in rows if r["shape"] == shape]
            ax.plot(*zip(*pts), "-o", ms=3, label=f"{stage} {shape.split('-')[0]}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    ax.set_xlabel("tokens")
    ax.set_ylabel("share of matmul rate (GEMM, layer) or copy bandwidth")
    ax.legend(fontsize=6, ncol=3)
    ax.set_title(f"pcmoe vs the device's ceilings ({report['device']}, {routing})", fontsize=9)
    return _save(fig, out, f"ceilings_{routing}")


def anchor_rates(report: dict, out: Path) -> Path:
    """Per published anchor: each implementation's routed-experts forward and forward+backward TFLOP/s in the
    anchors' count (6 T k H I, 3x with the backward), the published numbers as dashed lines."""
    rows, anchors = timed(report), [a for a in report["anchors"] if (a["shape"], a["tokens"]) in anchor_cases(report)]
    fig, axes = plt.subplots(1, len(anchors), figsize=(4.2 * len(anchors), 3.8), squeeze=False)
    for ax, a in zip(axes.flat, anchors):
        case, flops = (a["shape"], a["tokens"], "balanced"), anchor_flops(report, a)
        impls = list(dict.fromkeys(key[4] for key in rows if key[1:4] == case and key[0].startswith("experts")))
        for i, (stage, mult) in enumerate((("experts_fwd", 1), ("experts_fwd_bwd", 3))):
            rates = [mult * flops / rows[(stage, *case, impl)]["ms"] / 1e9 if (stage, *case, impl) in rows else 0
                     for impl in impls]
            ax.bar([j + 0.4 * i for j in range(len(impls))], rates, 0.4, label=stage.removeprefix("experts_"))
        for p, style in (("fwd", "--"), ("fwd_bwd", ":")):
            if p in a["tflops"]:
                ax.axhline(a["tflops"][p], color="grey", ls=style, lw=1, label=f"published {p}")
        ax.set_xticks([j + 0.2 for j in range(len(impls))], impls, fontsize=7)
        ax.set_title(f"{a['name']}: T={a['tokens']}", fontsize=9)
        ax.legend(fontsize=7)
    axes.flat[0].set_ylabel("routed-expert TFLOP/s (6 T k H I per pass)")
    fig.suptitle(f"{report['device']} ({report['commit']}), routing given")
    return _save(fig, out, "anchors")


def e2e_memory(report: dict, out: Path) -> Path:
    """Per-party peak memory, split into what holds it."""
    fig, ax = plt.subplots(figsize=(5, 4))
    parties = report["per_party"]
    bottom = [0.0] * len(parties)
    for key in parties[0]["memory"]:
        gib = [p["memory"][key] / 2**30 for p in parties]
        ax.bar([f"party {p['party']}" for p in parties], gib, bottom=bottom, label=key)
        bottom = [b + g for b, g in zip(bottom, gib)]
    ax.set_ylabel("GiB at peak")
    ax.set_title(f"{report['parties']} part{'ies' if report['parties'] > 1 else 'y'}, "
                 f"{report['total_parameters'] / 1e9:.2f} B parameters ({report['device']})", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out, "memory")


def _save(fig, out: Path, name: str) -> Path:
    path = out.with_name(f"{out.stem}_{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(path: Path) -> list[Path]:
    report = json.loads(path.read_text())
    if report["benchmark"] == "engine-e2e":
        return [e2e_memory(report, path)]
    middle, routings = table_tokens(report), sorted({r["routing"] for r in report["rows"]})
    pngs = [stage_times(report, path, middle, routing) for routing in routings]
    if len({r["tokens"] for r in report["rows"]} - {tokens for _, tokens in anchor_cases(report)}) > 1:
        pngs += [speedups(report, path, stage) for stage in ("layer_fwd_bwd", "experts_fwd_bwd", "gemm_fwd")
                 if any(r["stage"] == stage for r in report["rows"])]
        pngs.append(ceiling_shares(report, path, routings[0]))
    if anchor_cases(report):
        pngs.append(anchor_rates(report, path))
    return pngs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path)
    args = parser.parse_args()
    paths = args.results or [p for p in (latest("bench_*.json"), latest("peers_*.json")) if p] + latest_e2e()
    for path in paths:
        for png in plot(path):
            print(png)


if __name__ == "__main__":
    main()
