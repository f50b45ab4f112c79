"""Results files: one JSON per run under bench/results/ (environment, ceilings, shapes, one row per stage,
case and implementation), the ratios between implementations, and text tables made from them."""

import json
import re
from pathlib import Path

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
    "layer_fwd": "MoE layer, forward",
    "layer_fwd_bwd": "MoE layer, forward+backward",
}


# Tens of microseconds of GPU work per call: their wall time is mostly the host's (Python, launches), so their
# rows also carry ``gpu_ms``, the GPU time of their kernels.
HOST_BOUND_STAGES = ("router", "permute", "unpermute")


def case_key(row: dict) -> tuple:
    return row["stage"], row["shape"], row["tokens"], row["routing"]


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
    lines.append(f"{'stage':<14}{'case':<36}{'impl':<15}{'ms':>9}{'TFLOP/s':>9}{'GB/s':>7}{'%mm':>5}{'%copy':>6}"
                 f"{'ours x':>8}")
    for r in report["rows"]:
        case = f"{r['shape']}-{r['tokens']}-{r['routing']}"
        if "ms" not in r:
            lines.append(f"{r['stage']:<14}{case:<36}{r['impl']:<15}  {outcome(r)[:90]}")
            continue
        lines.append(f"{r['stage']:<14}{case:<36}{r['impl']:<15}{r['ms']:>9.3f}{_num(r.get('tflops'), '9.0f'):>9}"
                     f"{_num(r.get('gbps'), '7.0f'):>7}{_num(_pct(r.get('frac_matmul')), '5.0f'):>5}"
                     f"{_num(_pct(r.get('frac_copy')), '6.0f'):>6}"
                     f"{_num(r.get('pcmoe_speedup'), '8.2f'):>8}")
    return "\n".join(lines)


def markdown_table(report: dict, tokens: int, routing: str = "balanced") -> str:
    """One row per (stage, shape): our ms (and GPU ms where the host bounds the wall time) and rate, and our
    speed-up over each peer (or why it did not run)."""
    rows = [r for r in report["rows"] if r["tokens"] == tokens and r["routing"] == routing]
    peers = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != OURS]
    out = ["| stage | shape | pcmoe ms | GPU ms | TFLOP/s | GB/s | % of ceiling | " + " | ".join(f"vs {p}" for p in peers)
           + " |", "|---|---|---|---|---|---|---|" + "---|" * len(peers)]
    for stage in STAGES:
        for r in rows:
            if r["stage"] != stage or r["impl"] != OURS:
                continue
            vs = r.get("vs", {})
            cells = []
            for p in peers:
                v = vs.get(p)
                cells.append(f"{v:.2f}x" if isinstance(v, float) else ("n/a" if v else "-"))
            share = r.get("frac_matmul", r.get("frac_copy"))  # compute stages: matmul rate; the rest: copy bandwidth
            out.append(f"| {stage} | {r['shape']} | {_num(r.get('ms'), '.3f')} | {_num(r.get('gpu_ms'), '.3f')} | "
                       f"{_num(r.get('tflops'), '.0f')} | "
                       f"{_num(r.get('gbps'), '.0f')} | {'-' if share is None else format(100 * share, '.0f') + '%'} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def unavailable(report: dict) -> dict[str, str]:
    """Each implementation that never ran, with its (first) reason."""
    ran = {r["impl"] for r in report["rows"] if "ms" in r}
    reasons = {}
    for r in report["rows"]:
        if r["impl"] not in ran and "ms" not in r:
            reasons.setdefault(r["impl"], outcome(r))
    return reasons
