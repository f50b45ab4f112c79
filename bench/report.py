"""Results files: one JSON per run under bench/results/ (environment, ceilings, shapes, one row per stage,
case and implementation), the ratios between implementations, and text tables made from them."""

import json
import re
from pathlib import Path

from .shapes import Shape, routed_flops

RESULTS = Path(__file__).parent / "results"
OURS = "pcmoe"
# What each stage means, for the tables (and the order they are listed in).
STAGES = {
    "router": "router (scores, top-k, renorm)",
    "permute": "permutation (plan + gather)",
    "unpermute": "un-permutation (weighted combine)",
    "gemm_fwd": "grouped SwiGLU GEMMs, forward",
    "gemm_dgrad": "grouped SwiGLU GEMMs, dgrad",
    "gemm_wgrad": "grouped SwiGLU GEMMs, wgrad",
    "experts_fwd": "routed experts + combine, forward",
    "experts_fwd_bwd": "routed experts + combine, forward+backward",
    "layer_fwd": "MoE layer, forward",
    "layer_fwd_bwd": "MoE layer, forward+backward",
}


# The stages whose README tables list every implementation (the others: ours, and our speed-up over each peer).
EVERY_IMPL_STAGES = ("experts_fwd", "experts_fwd_bwd", "layer_fwd", "layer_fwd_bwd")

# Tens of microseconds of GPU work per call: their wall time is mostly the host's (Python, launches), so their
# rows also carry ``gpu_ms``, the GPU time of their kernels.
HOST_BOUND_STAGES = ("router", "permute", "unpermute")
# Per-expert Python loops (a GEMM launch per expert): transformers' eager block, our eager grouped-GEMM peer.
LOOP_IMPLS = ("eager", "hf_eager")
HOST_MARK = "†"


def host_bound(stage: str, impl: str) -> bool:
    """Whether a row's wall time is the host's (Python, launches) more than the GPU's: every row of the small
    stages, and the per-expert loops. It moves with the host's load from run to run (measured: up to several
    times); the GPU time does not. The README marks such cells with HOST_MARK; compare.py reports them apart."""
    return stage in HOST_BOUND_STAGES or impl in LOOP_IMPLS


def gpu_speedups(rows: list[dict], mine: dict) -> dict[str, float]:
    """Our speed-up over each peer by the GPU time of the kernels (rows that carry ``gpu_ms``), for ``mine``'s case."""
    return {r["impl"]: r["gpu_ms"] / mine["gpu_ms"] for r in rows
            if r is not mine and case_key(r) == case_key(mine) and "gpu_ms" in r and "gpu_ms" in mine}


def case_key(row: dict) -> tuple:
    return row["stage"], row["shape"], row["tokens"], row["routing"]


def table_tokens(report: dict) -> int:
    """The token count the README's tables show: the middle of the run's --bench-tokens (the published anchors'
    cases have their own)."""
    tokens = sorted(map(int, str(report["options"]["tokens"]).split(","))) if "options" in report else sorted(
        {r["tokens"] for r in report["rows"]})
    return tokens[len(tokens) // 2]


def anchor_cases(report: dict) -> set[tuple[str, int]]:
    """(shape, tokens) of the published anchors the run measured."""
    return {(a["shape"], a["tokens"]) for a in report.get("anchors", ())} & {(r["shape"], r["tokens"])
                                                                            for r in report["rows"]}


def anchor_flops(report: dict, anchor: dict) -> int:
    """A published anchor's forward count, 6 T k H I (shapes.routed_flops), from the shapes the run recorded."""
    return routed_flops(anchor["tokens"], Shape(**report["shapes"][anchor["shape"]]))


def timed(report: dict) -> dict[tuple, dict]:
    """The rows that have a time, by case and implementation."""
    return {case_key(r) + (r["impl"],): r for r in report["rows"] if "ms" in r}


def shape_label(row: dict, tokens: int) -> str:
    """A case's shape as the README names it: with its token count where that is not the table's."""
    return row["shape"] if row["tokens"] == tokens else f"{row['shape']} at {row['tokens']}"


def readme_cells(report: dict) -> dict[tuple, tuple[float, bool]]:
    """What the README shows, by name (stage, shape label, routing, implementation, what): (value, whether it is
    the host's time) for each time of the tables that list every implementation (the routed experts and the
    layer, at the table's token count and in the published anchors' cases), and our time and speed-ups in the
    stage table."""
    tokens, anchors = table_tokens(report), anchor_cases(report)
    rows = [r for r in report["rows"] if "ms" in r and (r["tokens"] == tokens or (r["shape"], r["tokens"]) in anchors)]
    cells = {}
    for r in rows:
        stage, every = r["stage"], r["stage"] in EVERY_IMPL_STAGES
        if r["tokens"] != tokens and not every:
            continue
        name = (stage, shape_label(r, tokens), r["routing"])
        if every or (r["impl"] == OURS and r["routing"] == "balanced"):
            cells[name + (r["impl"], "ms")] = r["ms"], host_bound(stage, r["impl"])
            if "gpu_ms" in r:
                cells[name + (r["impl"], "GPU ms")] = r["gpu_ms"], False
        if r["impl"] == OURS and (every or r["routing"] == "balanced"):
            by_gpu = gpu_speedups(rows, r)
            for peer, v in r.get("vs", {}).items():
                if isinstance(v, float):
                    cells[name + (peer, "speed-up")] = v, host_bound(stage, peer)
                if peer in by_gpu:
                    cells[name + (peer, "GPU speed-up")] = by_gpu[peer], False
    return cells


def cell_changes(report: dict, rerun: dict | None) -> dict[tuple, float]:
    """How much a rerun moved each README cell (relative), by readme_cells' names; {} without a rerun."""
    if rerun is None:
        return {}
    first, again = readme_cells(report), readme_cells(rerun)
    return {name: again[name][0] / first[name][0] - 1 for name in first.keys() & again.keys()}


def with_change(text: str, change: float | None) -> str:
    """A README cell and, where there was a rerun, how much it moved the value: '11.64 (+0.8%)'."""
    return text if change is None else f"{text} ({100 * change:+.1f}%)"


def add_ratios(rows: list[dict]) -> list[dict]:
    """Per case: each row's ``pcmoe_speedup`` (its ms over ours: > 1 means ours is faster) and, on our row,
    ``vs``: the same ratio for every peer, or the peer's reason for not running."""
    ours = {case_key(r): r for r in rows if r["impl"] == OURS and "ms" in r}
    for row in rows:
        mine = ours.get(case_key(row))
        if mine is None:
            continue
        if "ms" in row:
            row["pcmoe_speedup"] = row["ms"] / mine["ms"]
        if row is not mine:
            mine.setdefault("vs", {})[row["impl"]] = row.get("pcmoe_speedup", row.get("error") or row.get("skipped"))
    return rows


def finish_row(row: dict, ceilings: dict | None) -> dict:
    """Rates from ms and the counted work, and their share of this run's measured ceilings."""
    ms = row.get("ms")
    if ms:
        if row.get("flops"):
            row["tflops"] = row["flops"] / ms / 1e9
            if ceilings:
                row["frac_matmul"] = row["tflops"] / ceilings["bf16_matmul_tflops"]
        if row.get("bytes"):
            row["gbps"] = row["bytes"] / ms / 1e6
            if ceilings:
                row["frac_copy"] = row["gbps"] / ceilings["copy_gbps"]
    return row


def gpu_tag(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    match = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", device)
    return match.group(1).lower() if match else re.sub(r"\W+", "_", device).strip("_").lower() or "cpu"


def latest(pattern: str = "bench_*.json", results: Path = RESULTS) -> Path | None:
    """The newest results file (by its recorded date) matching pattern."""
    files = sorted(results.glob(pattern), key=lambda p: json.loads(p.read_text()).get("date", ""))
    return files[-1] if files else None


def latest_e2e(results: Path = RESULTS) -> list[Path]:
    """The newest end-to-end result of each number of parties, fewest parties first."""
    reports = sorted(((json.loads(p.read_text()), p) for p in results.glob("e2e_*.json")), key=lambda r: r[0]["date"])
    by_parties = {rep["parties"]: path for rep, path in reports}
    return [by_parties[n] for n in sorted(by_parties)]


def _num(v, fmt):
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def _pct(frac):
    return None if frac is None else 100 * frac


def outcome(row: dict) -> str:
    return "could not run: " + row["error"] if "error" in row else "skipped: " + row["skipped"]


def text_table(report: dict) -> str:
    """Every row, for the terminal."""
    c = report.get("ceilings") or {}
    lines = [f"{report['device']}  commit {report['commit']}  {report['date']}  torch {report['torch']}  "
             f"triton {report['triton']}  transformers {report['transformers']}"]
    if c:
        lines.append(f"ceilings: bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s, copy {c['copy_gbps']:.0f} GB/s")
    lines.append(f"{'stage':<16}{'case':<36}{'impl':<15}{'ms':>9}{'TFLOP/s':>9}{'GB/s':>7}{'%mm':>5}{'%copy':>6}"
                 f"{'ours x':>8}")
    for r in report["rows"]:
        case = f"{r['shape']}-{r['tokens']}-{r['routing']}"
        if "ms" not in r:
            lines.append(f"{r['stage']:<16}{case:<36}{r['impl']:<15}  {outcome(r)[:90]}")
            continue
        lines.append(f"{r['stage']:<16}{case:<36}{r['impl']:<15}{r['ms']:>9.3f}{_num(r.get('tflops'), '9.0f'):>9}"
                     f"{_num(r.get('gbps'), '7.0f'):>7}{_num(_pct(r.get('frac_matmul')), '5.0f'):>5}"
                     f"{_num(_pct(r.get('frac_copy')), '6.0f'):>6}"
                     f"{_num(r.get('pcmoe_speedup'), '8.2f'):>8}")
    return "\n".join(lines)


def markdown_table(report: dict, tokens: int, routing: str = "balanced", changes: dict | None = None) -> str:
    """One row per (stage, shape): our ms (and GPU ms where the host bounds the wall time) and rate, and our
    speed-up over each peer (or why it did not run). Where the wall time is the host's, the speed-up is by GPU
    time, then by wall time in brackets; host-bound wall times carry HOST_MARK. ``changes`` (cell_changes):
    how much a rerun moved each value, shown after it."""
    changes = changes or {}
    rows = [r for r in report["rows"] if r["tokens"] == tokens and r["routing"] == routing]
    peers = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != OURS]
    out = ["| stage | shape | pcmoe ms | GPU ms | TFLOP/s | GB/s | % of ceiling | " + " | ".join(f"vs {p}" for p in peers)
           + " |", "|---|---|---|---|---|---|---|" + "---|" * len(peers)]
    for stage in STAGES:
        for r in rows:
            if r["stage"] != stage or r["impl"] != OURS:
                continue
            vs, by_gpu, name = r.get("vs", {}), gpu_speedups(rows, r), (stage, r["shape"], routing)
            cells = []
            for p in peers:
                v, mark = vs.get(p), HOST_MARK if host_bound(stage, p) else ""
                if not isinstance(v, float):
                    cells.append("n/a" if v else "-")
                elif p in by_gpu:
                    cells.append(with_change(f"{by_gpu[p]:.2f}x", changes.get(name + (p, "GPU speed-up")))
                                 + f" ({v:.2f}x{mark})")
                else:
                    cells.append(with_change(f"{v:.2f}x{mark}", changes.get(name + (p, "speed-up"))))
            share = r.get("frac_matmul", r.get("frac_copy"))  # compute stages: matmul rate; the rest: copy bandwidth
            gbps = r.get("gbps")
            if gbps and "gpu_ms" in r:  # the kernels' bandwidth, not the host's
                gbps = r["bytes"] / r["gpu_ms"] / 1e6
                share = gbps / report["ceilings"]["copy_gbps"] if report.get("ceilings") else None
            ms = with_change(_num(r.get("ms"), ".3f") + (HOST_MARK if host_bound(stage, OURS) else ""),
                             changes.get(name + (OURS, "ms")))
            gpu_ms = with_change(_num(r.get("gpu_ms"), ".3f"), changes.get(name + (OURS, "GPU ms")))
            out.append(f"| {stage} | {r['shape']} | {ms} | {gpu_ms} | "
                       f"{_num(r.get('tflops'), '.0f')} | {_num(gbps, '.0f')} | "
                       f"{'-' if share is None else format(100 * share, '.0f') + '%'} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def unavailable(report: dict) -> dict[str, str]:
    """Each implementation that never ran, with its (first) reason."""
    ran = {r["impl"] for r in report["rows"] if "ms" in r}
    reasons = {}
    for r in report["rows"]:
        if r["impl"] not in ran and "ms" not in r:
            reasons.setdefault(r["impl"], outcome(r))
    return reasons
