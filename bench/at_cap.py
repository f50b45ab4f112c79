"""The routed experts at the power cap: ours against the fused peers, each run back to back for seconds at a time.

The suites time short repetitions (do_bench) with the L2 flushed between them, so the GPU rests and clocks up; a
training loop runs step after step and holds the GPU at its power cap (700 W on an H100 or H200), where a step's
time is its energy over the cap (csrc_triton/notes/experts.md, entries 21 and 26). Here each implementation runs
forward+backward back to back for ``--seconds`` after a rest, then the forward alone, round after round with the
implementations alternating: ms a step, TFLOP/s, the GPU's energy a step (NVML's counter, where nvidia-ml-py is
installed) and its median SM clock. The inputs and FLOP counts are bench_experts.py's (balanced routing, bf16).

    python -m bench.at_cap --out bench/results/device    # at_cap_<gpu>_<commit>.json; --case shape:tokens
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from . import peers
from .bench_experts import experts_inputs, forward_backward, leaves
from .common import environment, sync
from .report import gpu_tag
from .shapes import PROFILED_CASES, Case, add_case_option, routed_flops

# Each implementation's own function (x, ids, weights, w_gate_up, w_down), called directly: the suites' way through
# transformers' experts module switches one module between them, which two implementations' steps cannot share.
FUNCTIONS = {"pcmoe": peers.ours_experts, "sonicmoe": peers.sonicmoe_experts, "liger": peers.liger_experts}
BATCH = 10  # steps between reads of the clock (each read waits for the GPU)


def gpu_counters(device: int = 0):
    """(energy in mJ since boot, SM clock in MHz) readers of NVML for CUDA device ``device``, or readers of NaN
    where NVML is not there."""
    try:
        import pynvml

        pynvml.nvmlInit()
        # NVML numbers every GPU of the host; torch's mapping through CUDA_VISIBLE_DEVICES (its power_draw's)
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(device))
        return (lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle),
                lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
    except Exception:  # no nvidia-ml-py, no driver, or no energy counter on this GPU
        return (lambda: math.nan), (lambda: math.nan)


def sustained(step, seconds: float, rest: float, energy_mj, sm_clock) -> dict:
    """Run ``step`` back to back for ``seconds`` (whole batches of BATCH) after ``rest`` seconds of rest: ms and
    mJ a step, the median SM clock over the batches."""
    sync()
    time.sleep(rest)
    steps, clocks = 0, []
    e0, t0 = energy_mj(), time.perf_counter()
    while not steps or time.perf_counter() - t0 < seconds:
        for _ in range(BATCH):
            step()
        steps += BATCH
        clocks.append(sm_clock())
        sync()
    elapsed, e1 = time.perf_counter() - t0, energy_mj()
    mj = (e1 - e0) / steps
    return dict(steps=steps, ms=elapsed / steps * 1e3, mj=None if math.isnan(mj) else mj,
                sm_mhz=None if math.isnan(clocks[0]) else statistics.median(clocks))


def steps_of(impl: str, d: dict):
    """(forward+backward, forward) steps of ``impl`` on the case's inputs, rotating over its three input sets;
    raises peers.Unavailable where it cannot run."""
    peers.require(impl)
    experts, calls = d["experts"], iter(range(10**12))

    def fn(x, ids, weights):
        return FUNCTIONS[impl](x, ids, weights, experts.gate_up_proj, experts.down_proj)

    def fwd_bwd():
        forward_backward(fn, d, d["inputs"][next(calls) % 3])
        for t in leaves(d):
            t.grad = None

    @torch.no_grad()
    def fwd():
        fn(d["inputs"][next(calls) % 3], d["ids"], d["weights"])

    return fwd_bwd, fwd


def run(cases, impls, seconds: float, rest: float, rounds: int, warmup: int = 3) -> list[dict]:
    energy_mj, sm_clock = gpu_counters(torch.cuda.current_device() if torch.cuda.is_available() else 0)
    rows = []
    for shape, tokens in cases:
        case = Case(shape, tokens, "balanced")
        d, flops = experts_inputs(case), routed_flops(tokens, case.spec)
        ready = {}
        for impl in impls:
            try:
                ready[impl] = steps_of(impl, d)
                for step in ready[impl]:  # compiles
                    for _ in range(warmup):
                        step()
            except peers.Unavailable as e:
                ready.pop(impl, None)
                rows.append(dict(shape=shape, tokens=tokens, impl=impl, unavailable=str(e)))
                print(f"{shape} at {tokens} {impl}: unavailable: {e}", flush=True)
        for rnd in range(rounds):
            for impl, (fwd_bwd, fwd) in ready.items():
                row = dict(shape=shape, tokens=tokens, impl=impl, round=rnd,
                           fwd_bwd=sustained(fwd_bwd, seconds, rest, energy_mj, sm_clock),
                           fwd=sustained(fwd, seconds, rest, energy_mj, sm_clock))
                for part, count in (("fwd_bwd", 3 * flops), ("fwd", flops)):
                    row[part]["tflops"] = count / row[part]["ms"] / 1e9
                rows.append(row)
                print(f"{shape} at {tokens} round {rnd} {impl:9s} forward+backward {_line(row['fwd_bwd'])} | "
                      f"forward {_line(row['fwd'])}", flush=True)
    return rows


def _line(m: dict) -> str:
    text = f"{m['ms']:.3f} ms {m['tflops']:.0f} TFLOP/s"
    if m["mj"] is not None:
        text += f" {m['mj']:.0f} mJ"
    if m["sm_mhz"] is not None:
        text += f" {m['sm_mhz']:.0f} MHz"
    return text


def summary(rows: list[dict]) -> list[dict]:
    """Per case and implementation: the median over rounds of ms a step (forward+backward, forward) and of mJ a
    forward+backward step, and pcmoe's speed-up (the peer's time over ours) where both ran."""
    out = []
    cases = dict.fromkeys((r["shape"], r["tokens"]) for r in rows if "round" in r)
    for shape, tokens in cases:
        timed = [r for r in rows if (r["shape"], r["tokens"]) == (shape, tokens) and "round" in r]
        medians = {}
        for impl in dict.fromkeys(r["impl"] for r in timed):
            mine = [r for r in timed if r["impl"] == impl]
            mj = [r["fwd_bwd"]["mj"] for r in mine if r["fwd_bwd"]["mj"] is not None]
            medians[impl] = dict(shape=shape, tokens=tokens, impl=impl, rounds=len(mine),
                                 fwd_bwd_ms=statistics.median(r["fwd_bwd"]["ms"] for r in mine),
                                 fwd_ms=statistics.median(r["fwd"]["ms"] for r in mine),
                                 fwd_bwd_mj=statistics.median(mj) if mj else None)
        ours = medians.get("pcmoe")
        for m in medians.values():
            if ours is not None:
                m["speedup_fwd_bwd"] = m["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
                m["speedup_fwd"] = m["fwd_ms"] / ours["fwd_ms"]
            out.append(m)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_option(parser)
    parser.add_argument("--impls", default=",".join(FUNCTIONS), help=f"comma-separated, of {', '.join(FUNCTIONS)}")
    parser.add_argument("--seconds", type=float, default=3.0, help="each measurement's back-to-back run")
    parser.add_argument("--rest", type=float, default=1.0, help="idle seconds before each measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/device"))
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(FUNCTIONS))
    if unknown:
        parser.error(f"--impls: {', '.join(unknown)} not among {', '.join(FUNCTIONS)}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: the power cap is the GPU's")
    rows = run(args.case or PROFILED_CASES, impls, args.seconds, args.rest, args.rounds)
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"at_cap_{gpu_tag(env['device'])}_{env['commit']}.json"
    medians = summary(rows)
    path.write_text(json.dumps(dict(environment=env, peers=peers.settings(), seconds=args.seconds, rest=args.rest,
                                    rounds=args.rounds, summary=medians, rows=rows), indent=1) + "\n")
    for m in medians:
        print(f"{m['shape']} at {m['tokens']} {m['impl']:9s} median of {m['rounds']}: forward+backward "
              f"{m['fwd_bwd_ms']:.3f} ms, forward {m['fwd_ms']:.3f} ms" + (
                  f"; pcmoe's speed-up {m['speedup_fwd_bwd']:.3f}x / {m['speedup_fwd']:.3f}x"
                  if "speedup_fwd_bwd" in m else ""))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
