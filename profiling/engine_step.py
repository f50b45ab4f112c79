"""Time and memory per named range of a few PC-MoE engine training steps (one party): a torch.profiler trace
with memory events, a CUDA memory snapshot (torch.cuda.memory._record_memory_history; drop it on
https://pytorch.org/memory_viz) and a table per range (pcmoe_engine.nvtx: router, permute, dispatch,
experts, combine, attention, shared_expert, lm_head, each one's ".backward", backward, optimizer).

    PYTHONPATH=. python profiling/engine_step.py --out-dir prof [--warmup 3] [--steps 2] [--set model.num_layers=2 ...]

Writes engine_profile.json (the table, per step), engine_trace.json.gz and, on a GPU, engine_memory.pickle.gz;
prints the table as markdown. Runs on a CPU too (CPU time and memory, no snapshot).
"""

import argparse
import bisect
import gzip
import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from pcmoe_engine import nvtx
from pcmoe_engine.config import load_config
from pcmoe_engine.party import Party

GiB = 2**30


def range_table(events: list[dict], steps: int, device_type: int) -> list[dict]:
    """Per range name: calls, host and GPU milliseconds per step, and the most memory a call of it added
    over what was allocated when it began (from the trace's [memory] events of ``device_type``: 0 CPU, 1 CUDA).
    """
    memory = sorted((e["ts"], e["args"]["Total Allocated"]) for e in events
                    if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == device_type)
    times = [ts for ts, _ in memory]
    rows: dict[str, dict] = {}
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("user_annotation", "gpu_user_annotation"):
            continue
        row = rows.setdefault(e["name"], dict(range=e["name"], calls=0, host_ms=0.0, gpu_ms=0.0, peak_added_bytes=0))
        if e["cat"] == "gpu_user_annotation":
            row["gpu_ms"] += e["dur"] / 1e3 / steps
            continue
        row["calls"] += 1
        row["host_ms"] += e["dur"] / 1e3 / steps
        lo, hi = bisect.bisect_left(times, e["ts"]), bisect.bisect_right(times, e["ts"] + e["dur"])
        if hi > lo:
            start = memory[lo - 1][1] if lo else 0
            row["peak_added_bytes"] = max(row["peak_added_bytes"], max(a for _, a in memory[lo:hi]) - start)
    return sorted(rows.values(), key=lambda r: -max(r["gpu_ms"], r["host_ms"]))


def markdown(rows: list[dict]) -> str:
    lines = ["| range | calls/step | host ms/step | GPU ms/step | peak added GiB |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['range']} | {r['calls_per_step']:g} | {r['host_ms']:.2f} | {r['gpu_ms']:.2f} | "
                     f"{r['peak_added_bytes'] / GiB:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="TOML file (default: the packaged tiny.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--warmup", type=int, default=3, help="steps before profiling")
    parser.add_argument("--steps", type=int, default=2, help="steps profiled")
    parser.add_argument("--out-dir", default="prof")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="pcmoe-profile-"))
    cfg = load_config(args.config, [f"train.steps={args.warmup + args.steps}", *args.overrides], parties=1)
    nvtx.enable()  # the named ranges below exist only while profiling
    party = Party(cfg, 0)
    cuda = party.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, profile_memory=True)
    for _ in range(args.warmup):
        party.step()
    if cuda:
        torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")
    prof.start()
    step_times = [party.step()["step_time_s"] for _ in range(args.steps)]
    prof.stop()
    if cuda:
        with gzip.open(out / "engine_memory.pickle.gz", "wb") as f:
            f.write(_snapshot_bytes(scratch))
        torch.cuda.memory._record_memory_history(enabled=None)
    summary = party.summary()
    trace = scratch / "trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(out / "engine_trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    rows = range_table(json.loads(trace.read_text())["traceEvents"], args.steps, device_type=1 if cuda else 0)
    for r in rows:
        r["calls_per_step"] = r.pop("calls") / args.steps
    report = dict(config=cfg.to_dict(), profiled_steps=args.steps, step_time_s=step_times,
                  tokens_per_step=party.tokens_per_step,
                  peak_memory_bytes=summary["peak_memory_bytes"], memory=summary["memory"],
                  device=torch.cuda.get_device_name() if cuda else "cpu", ranges=rows)
    (out / "engine_profile.json").write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"{cfg.model.preset} ({cfg.model.num_layers} layers), {report['tokens_per_step']} tokens/step, "
          f"step {sum(step_times) / len(step_times) * 1e3:.1f} ms under the profiler, on {report['device']}")
    print(markdown(rows))


def _snapshot_bytes(scratch: Path) -> bytes:
    path = scratch / "memory.pickle"
    torch.cuda.memory._dump_snapshot(str(path))
    return path.read_bytes()


if __name__ == "__main__":
    main()
