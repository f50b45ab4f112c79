"""Time and memory per named range of a few PC-MoE engine training steps: a torch.profiler trace with memory
events, a CUDA memory snapshot (torch.cuda.memory._record_memory_history; drop it on
https://pytorch.org/memory_viz), a table per range (pcmoe_engine.nvtx: router, permute, dispatch, experts,
combine, attention, shared_expert, lm_head, each one's ".backward", backward, optimizer) and, on a GPU, where
the step's GPU time went: the share of the step any kernel ran (``gpu_busy_ms``), NCCL's share, the kernels that
took the most, and where the GPU idled (``idle_ms``: how much of it waiting for the host's launches, and after
which named range).

    PYTHONPATH=. python profiling/engine_step.py --out-dir prof [--warmup 3] [--steps 2] [--set model.num_layers=2 ...]
    PYTHONPATH=. torchrun --nproc-per-node 4 profiling/engine_step.py --out-dir prof ...   # 4 parties

Writes engine_profile.json (the table, per step), engine_trace.json.gz and, on a GPU, engine_memory.pickle.gz
(with several parties: engine_profile_p<rank>.json and engine_trace_p<rank>.json.gz each, the snapshot party 0's);
prints the tables as markdown. Runs on a CPU too (CPU time and memory, no snapshot). ``--trace FILE`` reads a
saved trace instead and writes its GPU tables (busy, idle and why, top kernels) beside it.
"""

import argparse
import bisect
import gzip
import json
import os
import shutil
import tempfile
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from pcmoe_engine import nvtx
from pcmoe_engine.config import load_config
from pcmoe_engine.party import Party, party_device, process_group_backend

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


def kernel_table(events: list[dict], steps: int, top: int = 25) -> dict:
    """Per step: milliseconds any GPU kernel ran (overlapping kernels counted once), NCCL kernels' milliseconds,
    and the ``top`` kernel names by GPU time, with calls and milliseconds."""
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]
    busy_us, end = 0.0, float("-inf")
    for e in sorted(kernels, key=lambda e: e["ts"]):  # the union of the kernels' intervals
        busy_us += max(0.0, e["ts"] + e["dur"] - max(e["ts"], end))
        end = max(end, e["ts"] + e["dur"])
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_name[e["name"]][0] += 1
        by_name[e["name"]][1] += e["dur"]
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return dict(gpu_busy_ms=busy_us / 1e3 / steps,
                nccl_ms=sum(us for name, (_, us) in by_name.items() if "nccl" in name.lower()) / 1e3 / steps,
                kernels=[dict(kernel=name[:120], calls_per_step=calls / steps, gpu_ms=us / 1e3 / steps)
                         for name, (calls, us) in ranked])


def idle_table(events: list[dict], steps: int, top: int = 15) -> dict:
    """Per step: milliseconds the GPU idled between its operations (kernels, copies, memsets), how many of them
    the host's (the operation that ended the gap was launched only after the GPU had run dry:
    ``host_late_ms``), and the gaps by the named range whose launch ended them (``idle_by_range``)."""
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    launched = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ranges = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
              if e.get("ph") == "X" and e.get("cat") == "user_annotation"]

    def innermost(ts: float) -> str:
        around = [r for r in ranges if r[0] <= ts <= r[1]]
        return min(around, key=lambda r: r[1] - r[0])[2] if around else "(no range)"

    idle_us = late_us = 0.0
    by_range: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    end = ops[0]["ts"] + ops[0]["dur"] if ops else 0.0
    for e in ops[1:]:
        if e["ts"] > end:
            gap, launch = e["ts"] - end, launched.get(e.get("args", {}).get("correlation"))
            idle_us += gap
            late_us += gap if launch is not None and launch > end else 0.0
            row = by_range[innermost(launch) if launch is not None else "(launch not traced)"]
            row[0] += 1
            row[1] += gap
        end = max(end, e["ts"] + e["dur"])
    ranked = sorted(by_range.items(), key=lambda kv: -kv[1][1])[:top]
    return dict(idle_ms=idle_us / 1e3 / steps, host_late_ms=late_us / 1e3 / steps,
                idle_by_range=[dict(range=name, gaps_per_step=gaps / steps, idle_ms=us / 1e3 / steps)
                               for name, (gaps, us) in ranked])


def gpu_tables(events: list[dict], steps: int) -> dict:
    """The report's ``gpu``: kernel_table and idle_table of one trace."""
    return {**kernel_table(events, steps), **idle_table(events, steps)}


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
    parser.add_argument("--trace", type=Path, help="analyse this saved trace (with --steps: how many it holds), "
                                                   "run nothing")
    args = parser.parse_args(argv)
    if args.trace:
        return analyse(args.trace, args.steps)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="pcmoe-profile-"))
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cfg = load_config(args.config, [f"train.steps={args.warmup + args.steps}", *args.overrides], parties=world)
    if party_device(cfg).type == "cuda":
        torch.cuda.set_device(party_device(cfg))
    if world > 1:
        dist.init_process_group(process_group_backend(cfg), timeout=timedelta(minutes=10))
    nvtx.enable()  # the named ranges below exist only while profiling
    party = Party(cfg, rank)
    cuda = party.device.type == "cuda"
    snapshot = cuda and rank == 0  # one party's: each is hundreds of MB at OLMoE's size
    suffix = f"_p{rank}" if world > 1 else ""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, profile_memory=True)
    for _ in range(args.warmup):
        party.step()
    if snapshot:
        torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")
    prof.start()
    step_times = [party.step()["step_time_s"] for _ in range(args.steps)]
    prof.stop()
    if snapshot:
        with gzip.open(out / "engine_memory.pickle.gz", "wb") as f:
            f.write(_snapshot_bytes(scratch))
        torch.cuda.memory._record_memory_history(enabled=None)
    summary = party.summary()
    if world > 1:
        dist.destroy_process_group()
    trace = scratch / "trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(out / f"engine_trace{suffix}.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    events = json.loads(trace.read_text())["traceEvents"]
    rows = range_table(events, args.steps, device_type=1 if cuda else 0)
    for r in rows:
        r["calls_per_step"] = r.pop("calls") / args.steps
    report = dict(config=cfg.to_dict(), party=rank, parties=world, profiled_steps=args.steps,
                  step_time_s=step_times, tokens_per_step=party.tokens_per_step,
                  peak_memory_bytes=summary["peak_memory_bytes"], memory=summary["memory"],
                  device=torch.cuda.get_device_name() if cuda else "cpu", ranges=rows,
                  gpu=gpu_tables(events, args.steps) if cuda else None)
    (out / f"engine_profile{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    step_ms = sum(step_times) / len(step_times) * 1e3
    print(f"party {rank}/{world}: {cfg.model.preset} ({cfg.model.num_layers} layers), {report['tokens_per_step']} "
          f"tokens/step, step {step_ms:.1f} ms under the profiler, on {report['device']}")
    if cuda:
        g = report["gpu"]
        print(f"GPU busy {g['gpu_busy_ms']:.1f} ms per step ({g['gpu_busy_ms'] / step_ms:.0%}), "
              f"NCCL kernels {g['nccl_ms']:.1f} ms; {idle_line(g)}")
    if rank == 0:
        print(markdown(rows))


def idle_line(g: dict) -> str:
    return (f"idle between operations {g['idle_ms']:.1f} ms, {g['host_late_ms']:.1f} of it waiting for the host's "
            "launches; by the range that launched: " + ", ".join(f"{r['range']} {r['idle_ms']:.1f}"
                                                               for r in g["idle_by_range"][:6]))


def analyse(trace: Path, steps: int) -> None:
    """--trace: the GPU tables of a saved trace (engine_trace*.json.gz), written beside it as *_gpu.json."""
    with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
    g = gpu_tables(events, steps)
    out = trace.with_name(trace.name.split(".")[0] + "_gpu.json")
    out.write_text(json.dumps(g, indent=1) + "\n")
    print(f"{trace}: GPU busy {g['gpu_busy_ms']:.1f} ms per step, NCCL kernels {g['nccl_ms']:.1f} ms; "
          f"{idle_line(g)}; written to {out}")


def _snapshot_bytes(scratch: Path) -> bytes:
    path = scratch / "memory.pickle"
    torch.cuda.memory._dump_snapshot(str(path))
    return path.read_bytes()


if __name__ == "__main__":
    main()
