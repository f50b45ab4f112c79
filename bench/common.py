"""What every benchmark shares: the run's environment, timing per the device METHOD.md, the device's
ceilings measured in the same run, and a plain-text table."""

import datetime
import os
import platform
import subprocess

import torch
import triton
from triton.testing import do_bench


def environment() -> dict:
    """Device, commit (PCMOE_COMMIT where the tree has no .git, e.g. a copy on a GPU machine), date, versions."""
    commit = os.environ.get("PCMOE_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = commit or "unknown"
    import transformers

    return dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
                commit=commit, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                cuda=torch.version.cuda)


def time_ms(fn, warmup_ms: float = 100, rep_ms: float = 500, grad_to_none=None) -> float:
    """Median milliseconds of fn over CUDA events (triton.testing.do_bench), after warm-up."""
    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")


def ceilings() -> dict:
    """The device's dense bf16 matmul rate (8192^3, random data) and copy bandwidth (read + write), measured now."""
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: a @ b)
    src = torch.randn(512 * 2**20, device="cuda", dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    return dict(bf16_matmul_tflops=2 * n**3 / mm_ms / 1e9, copy_gbps=2 * src.numel() * 4 / copy_ms / 1e6)


def fmt_table(report: dict) -> str:
    lines = [f"{report['device']}  commit {report['commit']}  {report['date']}  torch {report['torch']}  "
             f"triton {report['triton']}  transformers {report['transformers']}"]
    if "ceilings" in report:
        c = report["ceilings"]
        lines.append(f"ceilings: bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s, copy {c['copy_gbps']:.0f} GB/s")
    header = f"{'shape':<20}{'impl':<12}{'fwd ms':>9}{'TFLOP/s':>9}{'f+b ms':>9}{'TFLOP/s':>9}{'peak GiB':>10}{'ours x':>8}{'host ms':>9}"
    lines.append(header)
    for case in report["cases"]:
        for row in case["results"]:
            if "error" in row:
                lines.append(f"{case['shape']:<20}{row['impl']:<12}  could not run: {row['error']}")
                continue
            lines.append(f"{case['shape']:<20}{row['impl']:<12}{row['fwd_ms']:>9.3f}{row['fwd_tflops']:>9.0f}"
                         f"{row['fwd_bwd_ms']:>9.3f}{row['fwd_bwd_tflops']:>9.0f}{row['peak_bytes'] / 2**30:>10.2f}"
                         f"{row.get('pcmoe_speedup_fwd_bwd', float('nan')):>8.2f}"
                         f"{row.get('host_fwd_bwd_ms', float('nan')):>9.2f}")
        chk = case.get("check")
        if chk:
            lines.append(f"{'':<20}check vs eager: out rel err {chk['out_rel_err']:.2e}, "
                         f"max grad rel err {chk['max_grad_rel_err']:.2e}")
    return "\n".join(lines)
