"""Does a rerun reproduce a results file? For every case both runs timed (stage, shape, tokens, routing,
implementation): the ratio of the two medians (and of the GPU times, where rows have them), summarised per
stage; then the README's cells (every time and speed-up at the middle token count, bench/readme_table.py)
checked against a tolerance.

    python bench/compare.py FIRST.json RERUN.json [--tolerance 0.1] [--out report.md]

Exits 1 when a README cell moved by more than the tolerance (relative), listing those cells.
"""

import argparse
import json
import math
import statistics
from pathlib import Path

from bench.report import OURS, STAGES, case_key


def _timed(report: dict) -> dict[tuple, dict]:
    return {case_key(r) + (r["impl"],): r for r in report["rows"] if "ms" in r}


def readme_cells(report: dict) -> dict[tuple, float]:
    """What the README shows, by name: each time of the layer tables, our time and speed-ups in the stage table."""
    tokens = sorted({r["tokens"] for r in report["rows"]})
    middle = tokens[len(tokens) // 2]
    cells = {}
    for r in report["rows"]:
        if r["tokens"] != middle or "ms" not in r:
            continue
        layer = r["stage"].startswith("layer")
        if layer or (r["impl"] == OURS and r["routing"] == "balanced"):
            cells[(r["stage"], r["shape"], r["routing"], r["impl"], "ms")] = r["ms"]
            if "gpu_ms" in r:
                cells[(r["stage"], r["shape"], r["routing"], r["impl"], "GPU ms")] = r["gpu_ms"]
        if r["impl"] == OURS and (layer or r["routing"] == "balanced"):
            for peer, v in r.get("vs", {}).items():
                if isinstance(v, float):
                    cells[(r["stage"], r["shape"], r["routing"], peer, "speed-up")] = v
    return cells


def compare(first: dict, rerun: dict, tolerance: float) -> tuple[list[str], list[str]]:
    """(report lines, README cells out of tolerance)."""
    a, b = _timed(first), _timed(rerun)
    common = sorted(set(a) & set(b))
    lines = [f"first: commit {first['commit']}, {first['date']}, {first['device']}",
             f"rerun: commit {rerun['commit']}, {rerun['date']}, {rerun['device']}",
             f"cases timed in both: {len(common)} (first only: {len(set(a) - set(b))}, rerun only: "
             f"{len(set(b) - set(a))})", "",
             "| stage | cases | median change | 90th percentile | largest | beyond tolerance |", "|---|---|---|---|---|---|"]
    for stage, field in [(stage, field) for stage in STAGES for field in ("ms", "gpu_ms")]:
        changes = sorted(abs(math.log(b[k][field] / a[k][field])) for k in common
                         if k[0] == stage and field in a[k] and field in b[k])
        if not changes:
            continue
        pct = lambda x: f"{100 * math.expm1(x):.1f}%"  # noqa: E731
        lines.append(f"| {stage}{' (GPU time)' if field == 'gpu_ms' else ''} | {len(changes)} | "
                     f"{pct(statistics.median_low(changes))} | {pct(changes[int(0.9 * (len(changes) - 1))])} | "
                     f"{pct(changes[-1])} | {sum(c > math.log1p(tolerance) for c in changes)} |")
    cells_a, cells_b = readme_cells(first), readme_cells(rerun)
    moved = []
    for name in sorted(set(cells_a) & set(cells_b)):
        change = cells_b[name] / cells_a[name] - 1
        if abs(change) > tolerance:
            moved.append(f"{' / '.join(map(str, name))}: {cells_a[name]:.3f} -> {cells_b[name]:.3f} ({change:+.0%})")
    missing = sorted(set(cells_a) ^ set(cells_b))
    lines += ["", f"README cells: {len(set(cells_a) & set(cells_b))} in both runs, {len(missing)} in one only, "
                  f"{len(moved)} moved by more than {tolerance:.0%}" + (":" if moved else ".")]
    lines += [f"- {m}" for m in moved]
    return lines, moved


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("rerun", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.1, help="relative change allowed per README cell")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (markdown)")
    args = parser.parse_args(argv)
    lines, moved = compare(json.loads(args.first.read_text()), json.loads(args.rerun.read_text()), args.tolerance)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(f"# {args.rerun.name} against {args.first.name}\n\n{text}\n")
    raise SystemExit(1 if moved else 0)


if __name__ == "__main__":
    main()
