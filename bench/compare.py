"""Does a rerun reproduce a results file? For every case both runs timed (stage, shape, tokens, routing,
implementation): the ratio of the two medians (and of the GPU times, where rows have them), summarised per
stage; then the README's cells (report.readme_cells: every time and speed-up at the middle token count and in
the published anchors' cases) checked against a tolerance, and the largest move of the speed-ups per stage (issue 16
asks that a rerun reproduce them within 5%). Cells the README marks as the host's time
(report.host_bound) are listed apart and not held to it: they move with the host's load; the GPU time of the same
stages is held.

    python bench/compare.py FIRST.json RERUN.json [--tolerance 0.1] [--out report.md] [--clocks clocks.csv]

With the GPU's clocks sampled through both runs (run_device.sh's clocks.csv), it also says how the card ran during
each (a run the power cap held down more often may be slower for that alone).

Exits 1 when a README cell that is not the host's time moved by more than the tolerance (relative), listing them.
"""

import argparse
import json
import math
import statistics
from datetime import datetime, timezone
from pathlib import Path

from bench.report import HOST_BOUND_STAGES, HOST_MARK, STAGES, host_bound, readme_cells, timed


def compare(first: dict, rerun: dict, tolerance: float) -> tuple[list[str], list[str]]:
    """(report lines, README cells out of tolerance)."""
    a, b = timed(first), timed(rerun)
    common = sorted(set(a) & set(b))
    lines = [f"first: commit {first['commit']}, {first['date']}, {first['device']}",
             f"rerun: commit {rerun['commit']}, {rerun['date']}, {rerun['device']}",
             f"cases timed in both: {len(common)} (first only: {len(set(a) - set(b))}, rerun only: "
             f"{len(set(b) - set(a))})", "",
             "| stage | cases | median change | 90th percentile | largest | beyond tolerance |", "|---|---|---|---|---|---|"]
    pct = lambda x: f"{100 * math.expm1(x):.1f}%"  # noqa: E731
    for stage in STAGES:  # wall times of the GPU-bound rows, of the host-bound ones, then GPU times
        for label, field, host_time in ((stage, "ms", False), (f"{stage} {HOST_MARK}", "ms", True),
                                        (f"{stage} (GPU time)", "gpu_ms", None)):
            changes = sorted(abs(math.log(b[k][field] / a[k][field])) for k in common
                             if k[0] == stage and field in a[k] and field in b[k]
                             and host_time in (None, host_bound(stage, k[-1])))
            if changes:
                lines.append(f"| {label} | {len(changes)} | {pct(statistics.median_low(changes))} | "
                             f"{pct(changes[int(0.9 * (len(changes) - 1))])} | {pct(changes[-1])} | "
                             f"{sum(c > math.log1p(tolerance) for c in changes)} |")
    cells_a, cells_b = readme_cells(first), readme_cells(rerun)
    both = sorted(set(cells_a) & set(cells_b))
    moved, host = [], []
    for name in both:
        (va, host_time), (vb, _) = cells_a[name], cells_b[name]
        change = vb / va - 1
        if host_time:
            host.append(abs(math.log(vb / va)))
        elif abs(change) > tolerance:
            moved.append(f"{' / '.join(map(str, name))}: {va:.3f} -> {vb:.3f} ({change:+.0%})")
    missing = sorted(set(cells_a) ^ set(cells_b))
    lines += ["", f"README cells: {len(both)} in both runs, {len(missing)} in one only, of which {len(host)} are the "
                  f"host's time ({', '.join(HOST_BOUND_STAGES)} wall times and the per-expert loops)."]
    if host:
        host.sort()
        lines += [f"The host's cells moved by {math.expm1(statistics.median_low(host)):.1%} (median) and "
                  f"{math.expm1(host[-1]):.0%} at most: not held to the tolerance."]
    lines += [f"The other {len(both) - len(host)}: {len(moved)} moved by more than {tolerance:.0%}"
              + (":" if moved else ".")]
    lines += [f"- {m}" for m in moved]
    speedups = {}  # stage -> relative change of each of its GPU-bound speed-up cells (issue 16 holds them to 5%)
    for name in both:
        if name[-1].endswith("speed-up") and not cells_a[name][1]:
            speedups.setdefault(name[0], []).append(abs(cells_b[name][0] / cells_a[name][0] - 1))
    if speedups:
        lines.append("Their speed-ups moved at most (cells): " + ", ".join(
            f"{stage} {max(changes):.1%} ({len(changes)})" for stage, changes in sorted(speedups.items())) + ".")
    return lines + tile_lines(first, rerun), moved


def tile_lines(first: dict, rerun: dict) -> list[str]:
    """Where the wgrad's autotuner chose other tiles in the two runs (results files since 5dba7b8 record them)."""
    if "tuned_tiles" not in first or "tuned_tiles" not in rerun:
        return []
    a, b = ({tuple(t["key"]): t["config"] for t in run["tuned_tiles"]} for run in (first, rerun))
    differ = [key for key in sorted(set(a) & set(b)) if a[key] != b[key]]
    lines = ["", f"wgrad tiles the autotuner chose: {len(set(a) & set(b))} shape keys in both runs, {len(differ)} "
                 "chosen differently" + (":" if differ else ".")]
    return lines + [f"- {', '.join(key)}: {a[key]} -> {b[key]}" for key in differ]


SW_POWER_CAP = 0x4  # nvidia-smi's clocks_throttle_reasons.active bit: the clock lowered to stay under the power limit


def clock_lines(clocks: Path, first: dict, rerun: dict, busy_watts: float = 200.0) -> list[str]:
    """How the GPU ran in each run, from nvidia-smi samples (``clocks``: timestamp, [index,] SM clock, power,
    temperature, throttle reasons, as run_device.sh's clock_log writes them): the samples under load (power above
    ``busy_watts``) up to each run's end (its results' date), their median and lowest SM clock, and in how many the
    power cap held the clock down."""
    ends = [datetime.fromisoformat(run["date"]) for run in (first, rerun)]
    runs: list[list[tuple[float, bool]]] = [[], []]
    for line in clocks.read_text().splitlines():
        fields = [f.strip() for f in line.split(",")]
        try:
            when = datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=timezone.utc)
            mhz = next(float(f.removesuffix(" MHz")) for f in fields if f.endswith(" MHz"))
            watts = next(float(f.removesuffix(" W")) for f in fields if f.endswith(" W"))
            capped = bool(int(fields[-1], 16) & SW_POWER_CAP)
        except (ValueError, StopIteration):  # a header, or nvidia-smi's "[N/A]"
            continue
        run = 0 if when <= ends[0] else 1 if when <= ends[1] else None
        if run is not None and watts > busy_watts:
            runs[run].append((mhz, capped))
    parts = [f"{name} {len(samples)} samples, SM clock median {statistics.median_low([m for m, _ in samples]):.0f} MHz "
             f"(lowest {min(m for m, _ in samples):.0f}), power cap active in {sum(c for _, c in samples)}"
             if samples else f"{name} none" for name, samples in zip(("first run", "rerun"), runs)]
    return ["", f"The GPU under load (above {busy_watts:.0f} W, `{clocks.name}`): " + "; ".join(parts) + "."]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("rerun", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.1, help="relative change allowed per README cell")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (markdown)")
    parser.add_argument("--clocks", type=Path, default=None, help="nvidia-smi samples through both runs (csv)")
    args = parser.parse_args(argv)
    first, rerun = json.loads(args.first.read_text()), json.loads(args.rerun.read_text())
    lines, moved = compare(first, rerun, args.tolerance)
    if args.clocks:
        lines += clock_lines(args.clocks, first, rerun)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(f"# {args.rerun.name} against {args.first.name}\n\n{text}\n")
    raise SystemExit(1 if moved else 0)


if __name__ == "__main__":
    main()
