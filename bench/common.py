"""What every benchmark shares: the run's environment, timing per the device METHOD.md (do_bench medians,
warm-up, rotating input sets where one set would sit in L2) and the device's ceilings measured in the same run."""

import datetime
import gc
import itertools
import math
import os
import platform
import subprocess
import time

import torch
import triton
from triton.testing import do_bench


def source_commit() -> str:
    """The commit results are recorded against: PCMOE_COMMIT where the tree has no .git (e.g. a copy on a GPU
    machine), else git's short HEAD, else "unknown"."""
    try:
        return os.environ.get("PCMOE_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    """Device, commit (PCMOE_COMMIT where the tree has no .git, e.g. a copy on a GPU machine), date, versions."""
    import transformers

    return dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
                commit=source_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                cuda=torch.version.cuda, gpu=gpu_properties())


def tuned_tiles() -> list[dict]:
    """The tiles the wgrad's autotuner chose in this process, per shape key: two runs that differ in them time
    different kernels (csrc_triton/notes/experts.md, version 8)."""
    from csrc_triton._grouped_gemm import _wgrad_kernel

    return [dict(key=[str(part) for part in key], config=str(config)) for key, config in _wgrad_kernel.cache.items()]


def gpu_properties() -> dict | None:
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return dict(name=p.name, sm_count=p.multi_processor_count, l2_bytes=p.L2_cache_size,
                memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}", count=torch.cuda.device_count())


def set_count(bytes_per_set: int, limit: int = 256) -> int:
    """How many input sets to rotate through so that together they are twice the L2 cache: timing one set
    over and over would measure the cache, not device memory."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if torch.cuda.is_available() else 50 * 2**20
    return max(1, min(limit, math.ceil(2 * l2 / max(bytes_per_set, 1))))


def rotating(fn, sets: list):
    """A zero-argument callable that calls fn(*set) on the next of the sets each time."""
    it = itertools.cycle(sets)
    return lambda: fn(*next(it))


_cache: dict = {}


def cached(key, build):
    """One case's inputs at a time: building the next frees the last (they run to gigabytes), and whatever a
    reference cycle in a peer's code still holds of it (freed only by Python's collector, which the GPU's memory
    does not prompt)."""
    if key not in _cache:
        _cache.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _cache[key] = build()
    return _cache[key]


# The suites run on the GPU; on a CPU (--bench-cpu, tiny shapes, Triton's interpreter) only to check the
# harness itself: host-clock medians, and ceilings of the same kind.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


MIN_REPS = 5  # do_bench times rep_ms / (its estimate of one call) calls: slow peers would get one or two


def time_ms(fn, warmup_ms: float = 100, rep_ms: float = 500, grad_to_none=None, call_ms: float = 0.0) -> float:
    """Median milliseconds of fn over CUDA events (triton.testing.do_bench), after warm-up; ``call_ms``, one
    call's time if known, stretches rep_ms to at least MIN_REPS calls."""
    if DEVICE == "cpu":
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]
    return do_bench(fn, warmup=warmup_ms, rep=max(rep_ms, MIN_REPS * call_ms), grad_to_none=grad_to_none,
                    return_mode="median")


def kernel_ms(fn, groups: dict[str, tuple[str, ...]], iters: int = 5) -> dict[str, float]:
    """Mean GPU time per call of fn's kernels, summed per group of kernel names, from torch.profiler (for
    stages that share one call with others; the name "" matches every kernel)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        sync()
    totals = dict.fromkeys(groups, 0.0)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            for group, names in groups.items():
                if any(n in event.name for n in names):
                    totals[group] += event.device_time
    if not all(totals.values()):
        raise RuntimeError(f"no kernel matched {groups} (renamed?): kernel times {totals}")
    return {group: us / iters / 1e3 for group, us in totals.items()}


def ceilings() -> dict:
    """The device's dense bf16 matmul rate (8192^3, random data) and copy bandwidth (read + write), measured now."""
    n, copy_elems = (8192, 512 * 2**20) if DEVICE == "cuda" else (512, 2**22)  # 2 GiB copied on a GPU
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    mm_ms = time_ms(lambda: a @ b)
    src = torch.randn(copy_elems, device=DEVICE, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    return dict(bf16_matmul_tflops=2 * n**3 / mm_ms / 1e9, copy_gbps=2 * src.numel() * 4 / copy_ms / 1e6)
