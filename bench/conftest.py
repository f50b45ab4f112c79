"""pytest-benchmark suites, one file per stage family (bench/bench_*.py, functions bench_*; pyproject.toml
points pytest at them): ``pytest bench/ --benchmark-only`` on a GPU machine.

Each test is one (stage, shape, tokens, routing, implementation): the README's shapes x --bench-tokens x
--bench-routing, and with --bench-anchors first each published anchor's case (shapes.ANCHORS: its shape and
token count, balanced routing). It times with do_bench (CUDA events,
median, after warm-up) and puts ms, TFLOP/s, GB/s and the shares of this run's ceilings into the benchmark's
extra_info; at the end one JSON with every row and the ratios between implementations goes to --bench-out.
A peer that cannot run (or would take longer than --bench-max-call-s per call) is recorded with the reason
and its test is skipped with it. Without CUDA every test is skipped.
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch

from .common import ceilings as measure_ceilings
from .common import DEVICE, environment, kernel_ms, sync, time_ms, tuned_tiles
from .peers import Unavailable, settings
from .report import HOST_BOUND_STAGES, OURS, RESULTS, add_ratios, finish_row, gpu_tag, text_table
from .shapes import ANCHORS, README_SHAPES, ROUTINGS, SHAPES, TOKENS, Case


def pytest_addoption(parser):
    group = parser.getgroup("pcmoe bench")
    group.addoption("--bench-shapes", default=",".join(README_SHAPES), help="comma-separated names from bench.shapes")
    group.addoption("--bench-anchors", action="store_true",
                    help="also (first) each published anchor's case: bench.shapes.ANCHORS, balanced routing")
    group.addoption("--bench-tokens", default=",".join(map(str, TOKENS)))
    group.addoption("--bench-routing", default=",".join(ROUTINGS))
    group.addoption("--bench-warmup-ms", type=float, default=25)
    group.addoption("--bench-rep-ms", type=float, default=100)
    group.addoption("--bench-max-call-s", type=float, default=1.5,
                    help="record a peer as skipped when one call takes longer than this")
    group.addoption("--bench-cpu", action="store_true",
                    help="run on the CPU (Triton's interpreter, tiny shapes): checks the harness, times nothing real")
    group.addoption("--bench-out", default=None,
                    help="results JSON, or a folder for <prefix>_<gpu>_<commit>.json (default bench/results)")
    group.addoption("--bench-prefix", default="bench",
                    help="that file's prefix (bench/README.md: bench, peers, rerun_peers, ...)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.pcmoe_rows, config.pcmoe_ceilings = [], None
    # pytest-benchmark's own table times the do_bench call itself; the real numbers are in extra_info, the
    # JSON and the table printed at the end.
    if not any(str(arg).startswith("--benchmark-columns") for arg in config.invocation_params.args):
        config.option.benchmark_columns = ["median"]
    if config.getoption("--bench-cpu", False) and os.environ.get("TRITON_INTERPRET") != "1":
        raise pytest.UsageError("--bench-cpu runs our kernels under Triton's interpreter: set TRITON_INTERPRET=1")


def _cases(config) -> list[Case]:
    opt = config.getoption
    anchors = [Case(a.shape, a.tokens, "balanced") for a in ANCHORS] if opt("--bench-anchors") else []
    grid = [Case(shape, int(tokens), routing) for shape in opt("--bench-shapes").split(",")
            for tokens in opt("--bench-tokens").split(",") for routing in opt("--bench-routing").split(",")]
    return list(dict.fromkeys(anchors + grid))


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        impls = metafunc.definition.get_closest_marker("impls").args
        params = [(case, impl) for case in _cases(metafunc.config) for impl in impls]
        metafunc.parametrize("case,impl", params, ids=[f"{c}-{i}" for c, i in params])


def pytest_collection_modifyitems(config, items):
    # Case by case within each file (stable: functions and implementations keep their order), so one case's
    # inputs are built once for all of a file's stages.
    cases = {c: i for i, c in enumerate(_cases(config))}
    files = {}
    items.sort(key=lambda item: (files.setdefault(item.path, len(files)),
                                 cases.get(getattr(item, "callspec", None) and item.callspec.params.get("case"), -1)))
    if not torch.cuda.is_available() and not config.getoption("--bench-cpu"):
        skip = pytest.mark.skip(reason="needs a CUDA GPU: these suites time GPU kernels (--bench-cpu runs them on "
                                       "the CPU with tiny shapes, to check the harness)")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ceilings(request):
    """Measured once per session, before the first timing, and kept for the report."""
    request.config.pcmoe_ceilings = measure_ceilings()
    return request.config.pcmoe_ceilings


class Measure:
    """Times one implementation of one case into a row, however it ends."""

    def __init__(self, config, benchmark, ceilings):
        self.config, self.benchmark, self.ceilings = config, benchmark, ceilings

    def __call__(self, stage: str, case: Case, impl: str, build, flops: int | None = None,
                 nbytes: int | None = None, after=None, **extra) -> dict:
        """``build(row)`` returns the zero-argument callable to time, or (callable, tensors whose .grad
        do_bench resets), and may add fields to the row; it raises Unavailable for a peer that cannot run.
        ``after(row)``, if given, runs once the timing is done (e.g. a peak-memory probe)."""
        opt = self.config.getoption
        row = dict(stage=stage, shape=case.shape, tokens=case.tokens, routing=case.routing, impl=impl,
                   flops=flops, bytes=nbytes, **extra)
        try:
            fn = build(row)
            fn, grad_to_none = fn if isinstance(fn, tuple) else (fn, None)
            fn()  # compile, autotune, allocate
            sync()
            start = time.perf_counter()
            fn()
            sync()
            once = time.perf_counter() - start
            if impl != OURS and once > opt("--bench-max-call-s"):
                row["skipped"] = f"one call takes {once:.1f} s (> --bench-max-call-s {opt('--bench-max-call-s')})"
            else:
                row["ms"] = self.benchmark.pedantic(
                    time_ms, args=(fn, opt("--bench-warmup-ms"), opt("--bench-rep-ms"), grad_to_none, once * 1e3),
                    rounds=1, iterations=1)
                if stage in HOST_BOUND_STAGES and DEVICE == "cuda":
                    row["gpu_ms"] = kernel_ms(fn, {"gpu": ("",)}, iters=10)["gpu"]
                if after is not None:
                    after(row)
        except Unavailable as e:
            row["error"] = str(e)
        except Exception as e:
            if impl == OURS:
                raise
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        finally:
            sync()
        return self.record(row)

    def record(self, row: dict) -> dict:
        row = finish_row(row, self.ceilings)
        self.config.pcmoe_rows.append(row)
        self.benchmark.extra_info.update({k: v for k, v in row.items() if k != "vs"})
        if "ms" not in row:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            pytest.skip(f"{row['impl']}: " + (row.get("error") or row.get("skipped")))
        return row


@pytest.fixture
def measure(request, benchmark, ceilings):
    return Measure(request.config, benchmark, ceilings)


def pytest_sessionfinish(session):
    rows = session.config.pcmoe_rows
    if not rows:
        return
    opt = session.config.getoption
    env = environment()
    report = dict(env, benchmark="pcmoe-bench", ceilings=session.config.pcmoe_ceilings,
                  shapes={name: s._asdict() for name, s in SHAPES.items()},
                  anchors=[a._asdict() for a in ANCHORS],
                  options={k: opt(f"--bench-{k}") for k in ("shapes", "tokens", "routing", "anchors", "warmup-ms",
                                                             "rep-ms", "max-call-s")},
                  peers=_peer_versions(), peer_settings=settings(), tuned_tiles=tuned_tiles(), rows=add_ratios(rows))
    out = Path(opt("--bench-out") or RESULTS)
    if out.is_dir():
        out = out / f"{opt('--bench-prefix')}_{gpu_tag(env['device'])}_{env['commit']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + text_table(report) + f"\n\nresults: {out}")


def _peer_versions() -> dict:
    import importlib.metadata

    versions = {}
    for name in ("megablocks", "stanford-stk", "grouped_gemm", "liger-kernel", "sonic-moe", "quack-kernels",
                 "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-cu13", "apache-tvm-ffi", "nvtx", "pytest-benchmark"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
