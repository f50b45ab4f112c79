"""Regenerate README.md's performance section (between <!-- bench:start --> and <!-- bench:end -->) from the
latest results under bench/results/: the stage suites' JSON (bench_*.json), the focused run of the fused-MoE
peers at the published anchors' shapes if there is one (peers_*.json, `bench/run_device.sh peers`), and the
end-to-end runs. Where a results file has a rerun beside it (rerun_<its name less "bench_">*.json: the same
suites run again on the same machine), every time and speed-up is followed by how much the rerun moved it.

    python bench/readme_table.py [--bench FILE] [--peers FILE] [--e2e FILE ...] [--readme README.md] [--check]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.report import (EVERY_IMPL_STAGES, HOST_MARK, OURS, RESULTS, STAGES, anchor_flops, cell_changes,
                          host_bound, latest, latest_e2e, markdown_table, readme_cells, shape_label, table_tokens,
                          timed, unavailable, with_change)

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"
GiB = 2**30


def _rel(path: Path, readme: Path) -> str:
    try:
        return str(path.resolve().relative_to(readme.resolve().parent))
    except ValueError:
        return str(path)


def rerun_of(path: Path) -> Path | None:
    """The rerun beside a results file: rerun_<its name less "bench_">*.json (bench/README.md)."""
    found = sorted(path.parent.glob(f"rerun_{path.stem.removeprefix('bench_')}*.json"))
    return found[0] if found else None


def family_table(report: dict, family: str, cases: list[tuple], changes: dict) -> str:
    """Every implementation of ``family`` ("layer" or "experts") in each case (shape, tokens, routing): forward
    and forward+backward ms, rate, peak memory beyond weights and inputs, our speed-up; after each time and
    speed-up, how much the rerun moved it (``changes``, from cell_changes)."""
    out = ["| shape | implementation | fwd ms | fwd+bwd ms | TFLOP/s (f+b) | % of matmul peak | peak extra GiB | "
           "pcmoe speed-up (f+b) |", "|---|---|---|---|---|---|---|---|"]
    rows = {(r["stage"], r["shape"], r["tokens"], r["routing"], r["impl"]): r for r in report["rows"]}
    impls = list(dict.fromkeys(r["impl"] for r in report["rows"] if r["stage"] == f"{family}_fwd_bwd"))
    tokens = table_tokens(report)
    for case in cases:
        for impl in impls:
            fwd, fb = (rows.get((f"{family}_{p}", *case, impl), {}) for p in ("fwd", "fwd_bwd"))
            if not fb:
                continue
            shape = shape_label(fb, tokens)
            fwd_cell, fb_cell = ((f"{family}_{p}", shape, case[2], impl) for p in ("fwd", "fwd_bwd"))
            name = f"**{impl}**" if impl == OURS else impl + (HOST_MARK if host_bound(fb_cell[0], impl) else "")
            fwd_ms = with_change(f"{fwd['ms']:.2f}", changes.get(fwd_cell + ("ms",))) if "ms" in fwd else "-"
            if "ms" not in fb:
                why = fb.get("error") or fb.get("skipped") or "not run"
                out.append(f"| {shape} | {name} | {fwd_ms} | - | - | - | - | {why[:80]} |")
                continue
            fb_ms = with_change(f"{fb['ms']:.2f}", changes.get(fb_cell + ("ms",)))
            speedup = with_change(f"{fb['pcmoe_speedup']:.2f}x", changes.get(fb_cell + ("speed-up",))) \
                if "pcmoe_speedup" in fb else "-"
            peak = "-" if fb.get("peak_bytes") is None else f"{fb['peak_bytes'] / GiB:.2f}"
            out.append(f"| {shape} | {name} | {fwd_ms} | {fb_ms} | {fb['tflops']:.0f} | "
                       f"{100 * fb['frac_matmul']:.0f}% | {peak} | {speedup} |")
    return "\n".join(out)


def _rate(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def anchor_rates(rows: dict, family: str, case: tuple, impl: str, flops: int) -> str:
    """fwd / bwd / f+b TFLOP/s of ``flops`` (6 T k H I) as the anchors count them: forward over the forward time,
    2x over (forward+backward - forward), 3x over forward+backward."""
    fwd, fb = (rows.get((f"{family}_{p}", *case, impl), {}).get("ms") for p in ("fwd", "fwd_bwd"))
    bwd = fb - fwd if fwd and fb and fb > fwd else None
    return " / ".join(_rate(n * flops / ms / 1e9 if ms else None) for n, ms in ((1, fwd), (2, bwd), (3, fb)))


def anchor_table(report: dict) -> str:
    """Each published anchor (shapes.ANCHORS) beside this run's implementations in its case, in its count:
    the routed experts (the routing given) and the whole layer (its router inside the time, as SonicMoE's is)."""
    rows = timed(report)
    out = ["| anchor (T, H, I, E, k) | implementation | routed experts: fwd / bwd / f+b TFLOP/s | "
           "layer: fwd / bwd / f+b TFLOP/s |", "|---|---|---|---|"]
    for a in report.get("anchors", []):
        s, case = report["shapes"][a["shape"]], (a["shape"], a["tokens"], "balanced")
        impls = list(dict.fromkeys(key[4] for key in rows if key[1:4] == case))
        if not impls:
            continue
        flops = anchor_flops(report, a)
        published = " / ".join(_rate(a["tflops"].get(p)) for p in ("fwd", "bwd", "fwd_bwd"))
        out.append(f"| **{a['name']}** ({a['tokens']}, {s['hidden']}, {s['inter']}, {s['experts']}, {s['top_k']}) | "
                   f"published: {a['timed']} | {published} | |")
        for impl in impls:
            out.append(f"| | {impl} | {anchor_rates(rows, 'experts', case, impl, flops)} | "
                       f"{anchor_rates(rows, 'layer', case, impl, flops)} |")
    return "\n".join(out)


def rerun_line(report: dict, rerun_path: Path | None, changes: dict, readme: Path) -> str:
    if rerun_path is None:
        return "No rerun of this run is in bench/results/: how much its cells move from run to run is not shown."
    host = {name for name, (_, host_time) in readme_cells(report).items() if host_time}
    moves = sorted(abs(change) for name, change in changes.items() if name not in host)
    spread = f", by {100 * statistics.median(moves):.1f}% (median) and {100 * moves[-1]:.1f}% at most" if moves else ""
    return (f"After each time and speed-up, in brackets: how much a second run of the same suites on the same machine "
            f"(`{_rel(rerun_path, readme)}`) moved it (+: larger in the rerun); {len(moves)} cells not marked "
            f"{HOST_MARK}{spread}.")


def agreement_lines(report: dict) -> list[str]:
    """Ours against transformers' eager block, and each peer against ours (rows' ``check``), at most."""
    worst: dict[tuple, list] = {}
    for r in report["rows"]:
        if "check" in r:
            w = worst.setdefault((r["impl"], r["check"].get("against", "hf_eager")), [0.0, 0.0])
            w[:] = max(w[0], r["check"]["out_rel_err"]), max(w[1], r["check"]["max_grad_rel_err"])
    lines = [f"Outputs and all gradients agree with transformers' eager block to at most {o:.1e} / {g:.1e} relative "
             f"error (bf16)." for (impl, against), (o, g) in worst.items() if impl == OURS and against == "hf_eager"]
    peers = [f"{impl} {o:.1e} / {g:.1e}" for (impl, against), (o, g) in worst.items() if against == OURS]
    if peers:
        lines.append("Each peer against ours on the same weights and inputs (output / largest gradient, relative "
                     "error, at most): " + "; ".join(peers) + ".")
    return lines


def missing_lines(report: dict) -> list[str]:
    missing = unavailable(report)
    lines = ["Peers that did not run: " + "; ".join(f"**{k}**: {v}" for k, v in missing.items()) + "."] if missing \
        else []
    backends = {r.get("backend") for r in report["rows"] if r["impl"] == "megablocks" and r.get("backend")}
    return lines + (["megablocks back end: " + ", ".join(sorted(backends)) + "."] if backends else [])


def rerun_only_lines(report: dict, rerun: dict | None, rerun_path: Path | None, readme: Path,
                     family: str) -> list[str]:
    """The cases of ``family`` ("experts" or "layer") that only the rerun timed in full, every implementation (the
    first run's time cap ended before one of them), from the rerun alone."""
    if rerun is None:
        return []
    timed = lambda rep: {(r["stage"], r["shape"], r["tokens"], r["routing"], r["impl"]) for r in rep["rows"]
                         if r["stage"] in (f"{family}_fwd", f"{family}_fwd_bwd")}
    first = timed(report)
    cases = list(dict.fromkeys(key[1:4] for key in sorted(timed(rerun) - first, key=str)))
    if not cases:
        return []
    return ["", f"Cases the first run did not time in full (its time cap ended first), from the rerun alone "
                f"(`{_rel(rerun_path, readme)}`):", "", family_table(rerun, family, cases, {})]


def layer_lines(report: dict, rerun: dict | None, rerun_path: Path | None, readme: Path, cases: list[tuple],
                changes: dict) -> list[str]:
    """The whole layer's table: the first run's cases, then those only the rerun timed in full."""
    first = ["", family_table(report, "layer", cases, changes)] \
        if any(r["stage"] == "layer_fwd_bwd" for r in report["rows"]) else []
    rerun_only = rerun_only_lines(report, rerun, rerun_path, readme, "layer")
    if not first and not rerun_only:
        return ["", "The whole layer: not measured in this run (its time budget ended first)."]
    return ["", "The whole layer (every peer but ours inside transformers' block, its router and shared experts in "
                "PyTorch; TFLOP/s count them too):", *first, *rerun_only]


def _load(path: Path | None) -> dict | None:
    return json.loads(path.read_text()) if path else None


def peers_section(path: Path, readme: Path) -> list[str]:
    """The focused run (`bench/run_device.sh peers`): the routed experts and the layer, ours against every peer,
    at the README's shapes and the published anchors' cases, and the anchors beside it."""
    report, rerun_path = _load(path), rerun_of(path)
    rerun = _load(rerun_path)
    changes = cell_changes(report, rerun)
    cases = list(dict.fromkeys((r["shape"], r["tokens"], r["routing"]) for r in report["rows"]
                               if r["stage"] in EVERY_IMPL_STAGES))
    c, settings = report["ceilings"], report.get("peer_settings", {})
    versions = {k: v or "not installed" for k, v in report.get("peers", {}).items()}
    return [
        "", f"**The fused-MoE peers and the published numbers** (`bench/run_device.sh peers`: {report['device']}, "
            f"commit {report['commit']}, {report['date'][:10]}; same run's ceilings {c['bf16_matmul_tflops']:.0f} "
            f"TFLOP/s and {c['copy_gbps']:.0f} GB/s; `{_rel(path, readme)}`). liger: Liger-Kernel "
            f"{versions.get('liger-kernel')}'s fused MoE, {settings.get('liger') or 'not loaded'}; sonicmoe: sonic-moe "
            f"{versions.get('sonic-moe')} (quack-kernels {versions.get('quack-kernels')}, nvidia-cutlass-dsl "
            f"{versions.get('nvidia-cutlass-dsl')}), {settings.get('sonicmoe') or 'not loaded'}. "
            + rerun_line(report, rerun_path, changes, readme),
        "", "Routed experts with the weighted combine, the routing given (TFLOP/s: 18 T k H I over the "
            "forward+backward time, the count the published kernels use):", "",
        family_table(report, "experts", cases, changes),
        *rerun_only_lines(report, rerun, rerun_path, readme, "experts"),
        *layer_lines(report, rerun, rerun_path, readme, cases, changes),
        "", "Against the published numbers, in their count: 6 T k H I over the forward time, 12 T k H I over "
            "forward+backward less forward, 18 T k H I over forward+backward. Our forward is timed without "
            "autograd, so our backward rate is, if anything, low.", "",
        anchor_table(report), "",
        " ".join(f"{a['name']}: {a['source']}; counted {a['convention']}." for a in report.get("anchors", [])),
        *(f"\n{line}" for line in agreement_lines(report) + missing_lines(report)),
    ]


def _or_dash(value, fmt) -> str:
    """A field older results files do not have: '-' there."""
    return "-" if value is None else fmt(value)


def e2e_table(reports: list[dict]) -> str:
    out = ["| parties | device | tokens/s (all parties) | MFU | step ms | peak GiB per party | backbone / local "
           "experts / gradients / optimizer / activations | comm share of step | exposed comm share | GiB sent per "
           "step |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for rep in sorted(reports, key=lambda r: r["parties"]):
        for p in rep["per_party"]:
            share = " / ".join(f"{100 * v:.0f}%" for v in p["memory_share"].values())
            comm = "-" if p["comm_share"] is None else f"{100 * p['comm_share']:.1f}%"
            gpus = rep.get("gpus", rep["parties"])
            device = rep["device"] if rep["parties"] == 1 else \
                f"{gpus} x {rep['device']}{' (shared)' if gpus < rep['parties'] else ''}, {rep['backend']}"
            out.append(f"| {rep['parties']} (party {p['party']}) | {device} | {rep['tokens_per_s_total']:,.0f} | "
                       f"{100 * p['mfu']:.1f}% | {p['step_ms']:.1f} | {p['peak_memory_bytes'] / GiB:.1f} | {share} | "
                       f"{comm} | {_or_dash(p.get('exposed_comm_share'), lambda v: f'{100 * v:.1f}%')} | "
                       f"{_or_dash(p.get('bytes_sent_per_step'), lambda v: f'{v / GiB:.2f}')} |")
    return "\n".join(out)


def section(bench_path: Path, e2e_paths: list[Path], readme: Path, peers_path: Path | None = None) -> str:
    report, rerun_path = _load(bench_path), rerun_of(bench_path)
    changes = cell_changes(report, _load(rerun_path))
    c = report["ceilings"]
    middle = table_tokens(report)

    def cases(routing):
        return [(shape, middle, routing) for shape in dict.fromkeys(
            r["shape"] for r in report["rows"] if r["tokens"] == middle and r["routing"] == routing)]

    lines = [
        f"Measured on an {report['device']} (commit {report['commit']}, {report['date'][:10]}; torch {report['torch']}, "
        f"triton {report['triton']}, transformers {report['transformers']}). Same run's ceilings: dense bf16 matmul "
        f"{c['bf16_matmul_tflops']:.0f} TFLOP/s, copy {c['copy_gbps']:.0f} GB/s. Medians of do_bench (CUDA events) "
        f"on random bf16 data; TFLOP/s counts the router, routed and shared expert GEMMs (backward = 2x forward). "
        f"Generated by `python bench/readme_table.py` from `{_rel(bench_path, readme)}`; reproduce with "
        "`bench/run_device.sh` (bench/README.md). " + rerun_line(report, rerun_path, changes, readme),
        "",
        f"**One MoE layer, {middle} tokens, balanced routing** (pcmoe speed-up > 1: ours is faster):",
        "",
        family_table(report, "layer", cases("balanced"), changes),
        "",
        "**Same, skewed (Zipf) routing:**",
        "",
        family_table(report, "layer", cases("skewed"), changes),
    ]
    if any(r["stage"] == "experts_fwd_bwd" for r in report["rows"]):
        lines += ["", f"**Routed experts with the weighted combine, the routing given, {middle} tokens, balanced "
                      "routing** (TFLOP/s: 18 T k H I over the forward+backward time):", "",
                  family_table(report, "experts", cases("balanced"), changes)]
    lines += [
        "",
        f"**Every stage, {middle} tokens, balanced routing:** our time (wall, do_bench; for the router, permute "
        f"and combine also the GPU time of their kernels), rate and share of the matmul rate (GEMM and layer "
        f"stages) or the copy bandwidth (the others, from the GPU time), and our speed-up over each peer: by wall "
        f"time, or for the router, permute and combine by GPU time with the wall-time ratio in brackets "
        f"({', '.join(f'`{s}`: {d}' for s, d in STAGES.items() if any(r['stage'] == s for r in report['rows']))}):",
        "",
        markdown_table(report, middle, "balanced", changes),
        "",
        f"{HOST_MARK} The host's time more than the GPU's: the small stages (tens of microseconds of GPU work per "
        "call, so the wall time is Python and kernel launches: profiling/host_overhead.py) and the per-expert "
        "Python loops (transformers' eager block, the eager grouped GEMMs: a launch per expert). These move with "
        "the host's load from run to run, by up to several times (bench/compare.py reports them apart); the GPU "
        "times do not.",
    ]
    lines += [f"\n{line}" for line in agreement_lines(report) + missing_lines(report)]
    if peers_path:
        lines += peers_section(peers_path, readme)
    if e2e_paths:
        e2e = [json.loads(p.read_text()) for p in e2e_paths]
        first = e2e[0]
        m = first["config"]["model"]
        lines += ["", f"**End to end** (the engine, {first['total_parameters'] / 1e9:.2f} B parameters: "
                      f"{m['preset']} sizes, {m['num_layers']} layers; "
                      f"{first['config']['train']['batch_size']} x {first['config']['data']['seq_len']} tokens per party "
                      "and step; MFU and memory split as bench/engine_e2e.py says):", "", e2e_table(e2e)]
    plots = [(p.stem.removeprefix(path.stem + "_"), p) for path in filter(None, (bench_path, peers_path))
             for p in sorted(path.parent.glob(f"{path.stem}_*.png"))]
    plots += [(f"memory, {p.stem.split('_')[2]}", p.with_name(f"{p.stem}_memory.png")) for p in e2e_paths
              if p.with_name(f"{p.stem}_memory.png").is_file()]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"[{name}]({_rel(p, readme)})" for name, p in plots) + "."]
    return "\n".join(lines)


def replace_section(text: str, body: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"README has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}\n{END}{tail}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", type=Path, default=None)
    parser.add_argument("--peers", type=Path, nargs="?", const=None, default=False,
                        help="the focused peers run (default: the latest peers_*.json beside the suites' JSON; "
                             "bare --peers: none)")
    parser.add_argument("--e2e", type=Path, nargs="*", default=None)
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--check", action="store_true", help="fail if the README is not what the results give")
    args = parser.parse_args(argv)
    bench_path = args.bench or latest("bench_*.json")
    if bench_path is None:
        raise SystemExit(f"no bench_*.json under {RESULTS}: run bench/run_device.sh on a GPU machine first")
    if args.peers is False:
        args.peers = latest("peers_*.json", bench_path.parent)
    if args.e2e is None:
        args.e2e = latest_e2e()
    text = args.readme.read_text()
    new = replace_section(text, section(bench_path, args.e2e, args.readme, args.peers))
    if args.check:
        if new != text:
            sys.exit(f"{args.readme} is out of date: run python bench/readme_table.py")
        return
    args.readme.write_text(new)
    print(f"{args.readme}: performance section from {bench_path}" + "".join(f", {p}" for p in [args.peers, *args.e2e]
                                                                           if p))


if __name__ == "__main__":
    main()
