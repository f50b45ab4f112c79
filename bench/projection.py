"""Parties on separate sites: the step time at slower links, projected from what bench/engine_e2e.py measured;
and the README's section on issue 13's variants (measured, then projected).

    python bench/projection.py bench/results/scale_h100_4p_<commit>_*.json             # print the section
    python bench/projection.py bench/results/scale_h100_4p_<commit>_*.json --readme README.md  # and write it

Each results file holds, per party, one timed step's exchanges: the bytes it sent and received, the compute
its GPU queued while the exchange was in flight (``window_s``) and how long it then stalled (``exposed_s``).
Per party and step:

    compute        = measured step time - the measured stalls (the GPU's own work, which no link changes)
    transfer(e)    = latency + max(bytes sent, bytes received) * 8 / link     (a full-duplex link per party)
    step(link)     = compute + sum over exchanges e of max(0, transfer(e) - window(e))   with overlap
                   = compute + sum over exchanges e of transfer(e)                     without overlap

A step waits for every party, so the slowest party's projection is the step. Assumptions: every party has its
own link of that speed to the others and nothing else shares it; the compute measured on the GPUs of one host
is what each site would do; latency is 0 unless --latency-ms says otherwise (a site-to-site round trip adds
latency x the exchanges per step: about 8 per MoE layer).
"""

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

START, END = "<!-- scale:start -->", "<!-- scale:end -->"
LINKS_GBIT = (400.0, 100.0, 25.0)


def party_step_s(party: dict, link_gbit: float, latency_s: float = 0.0, overlap: bool = True) -> float:
    """One party's projected step time at ``link_gbit`` Gbit/s."""
    exchanges = party["exchanges"]
    if not exchanges:
        raise ValueError(f"party {party['party']} has no timed exchanges (1 party, or a run before issue 13)")
    compute = party["step_ms"] / 1e3 - sum(e["exposed_s"] for e in exchanges)
    wire = 0.0
    for e in exchanges:
        transfer = latency_s + max(e["bytes_sent"], e["bytes_received"]) * 8 / (link_gbit * 1e9)
        wire += max(0.0, transfer - e["window_s"]) if overlap else transfer
    return compute + wire


def project(report: dict, links=LINKS_GBIT, latency_s: float = 0.0, overlap: bool = True) -> dict:
    """The slowest party's projected step (seconds) and tokens/s per party at each link speed."""
    tokens = report["config"]["train"]["batch_size"] * report["config"]["train"]["grad_accum"] * \
        report["config"]["data"]["seq_len"]
    out = {}
    for link in links:
        step = max(party_step_s(p, link, latency_s, overlap) for p in report["per_party"])
        out[link] = {"step_s": step, "tokens_per_s": tokens / step}
    return out


def table(reports: list[dict], links=LINKS_GBIT, latency_s: float = 0.0) -> str:
    head = " | ".join(f"{link:g} Gbit/s" for link in links)
    rows = [f"| variant | overlap | measured step ms | GiB sent per party and step | {head} |",
            "|---" * (4 + len(links)) + "|"]
    for rep in reports:
        sent = max(p["bytes_sent_per_step"] for p in rep["per_party"]) / 2**30
        measured = max(p["step_ms"] for p in rep["per_party"])
        for overlap in (False, True):
            cells = " | ".join(f"{r['step_s'] * 1e3:,.0f} ms ({r['tokens_per_s']:,.0f} tok/s)"
                               for r in project(rep, links, latency_s, overlap).values())
            rows.append(f"| {rep.get('variant') or '-'} | {'yes' if overlap else 'no'} | {measured:.0f} | "
                        f"{sent:.2f} | {cells} |")
    return "\n".join(rows)


def measured(reports: list[dict]) -> str:
    """What each variant measured, per party: the worst party's step, the mean of the rest."""
    rows = ["| variant | tokens/s per party | MFU | exposed comm share | GiB sent per party and step | peak GiB per "
            "party | step ms (slowest party) |", "|---|---|---|---|---|---|---|"]
    for rep in reports:
        parties = rep["per_party"]
        mean = {k: sum(p[k] for p in parties) / len(parties) for k in ("tokens_per_s", "mfu", "exposed_comm_share")}
        rows.append(f"| {rep.get('variant') or '-'} | {mean['tokens_per_s']:,.0f} | {100 * mean['mfu']:.1f}% | "
                    f"{100 * mean['exposed_comm_share']:.1f}% | "
                    f"{max(p['bytes_sent_per_step'] for p in parties) / 2**30:.2f} | "
                    f"{max(p['peak_memory_bytes'] for p in parties) / 2**30:.1f} | "
                    f"{max(p['step_ms'] for p in parties):.0f} |")
    return "\n".join(rows)


def section(reports: list[dict], paths: list[Path], links=LINKS_GBIT, latency_s: float = 0.0) -> str:
    first = reports[0]
    setting = (f"{first['parties']} x {first['device']} at {first['commit']}, {first['total_parameters'] / 1e9:.2f} B "
               f"parameters, {first['config']['train']['batch_size']} x {first['config']['data']['seq_len']} tokens "
               "per party and step")
    return "\n".join([
        START,
        f"**Issue 13's variants** ({setting}; `bench/run_device.sh scale`, `bench/engine_e2e.py --variants`, one "
        "model trained through each variant in turn). `pair`: the protocol before issue 13 (one row per (token, "
        "expert), foreach AdamW); `token`: dispatch once per (token, host), fused AdamW; `_host`: combined at the "
        "host; `_fp8`: fp8 dispatch and output gradients; `ac`: activation checkpointing that replays what "
        "crossed; `_8bit`: bitsandbytes' AdamW8bit; `_release`: each parameter stepped in backward.", "",
        measured(reports), "",
        f"**Parties on separate sites** (projected by `bench/projection.py` from the same runs: the slowest "
        f"party's step and its tokens/s; latency {latency_s * 1e3:g} ms per exchange). Without overlap every "
        "transfer adds to the step; with it, only what the compute queued meanwhile does not cover.", "",
        table(reports, links, latency_s), "",
        "From " + ", ".join(f"`{p.name}`" for p in paths) + ".",
        END])


def replace_section(text: str, new: str) -> str:
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {START} ... {END} section in the README: add the markers where the table goes")
    return pattern.sub(lambda _: new, text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="bench/engine_e2e.py JSON files of one machine")
    parser.add_argument("--links", default=",".join(f"{link:g}" for link in LINKS_GBIT), help="Gbit/s, comma-separated")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every exchange")
    parser.add_argument("--readme", type=Path, help="rewrite this file's projection section")
    args = parser.parse_args(argv)
    links = tuple(float(v) for v in args.links.split(","))
    reports = [json.loads(p.read_text()) for p in args.results]
    try:
        text = section(reports, args.results, links, args.latency_ms / 1e3)
    except (ValueError, KeyError) as e:
        parser.exit(2, f"projection: error: {e}\n")
    print(text)
    if args.readme:
        try:
            args.readme.write_text(replace_section(args.readme.read_text(), text))
        except ValueError as e:
            parser.exit(2, f"projection: error: {e}\n")


if __name__ == "__main__":
    main()
