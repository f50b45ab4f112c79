"""When to run a Triton kernel and when the PyTorch reference, plus small shared helpers."""

import functools
import os

import torch

__all__ = ["use_triton", "interpreting", "programs_per_device", "check", "next_pow2"]


def interpreting() -> bool:
    """True when Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run the kernels; CPU tensors run the references unless the interpreter is on."""
    return t.is_cuda or interpreting()


@functools.cache
def programs_per_device(device: torch.device) -> int:
    """How many programs a persistent kernel launches: one per SM; 3 under the interpreter, so that tests see a
    program walk several tiles."""
    if interpreting():
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def check(ok: bool, message: str) -> None:
    """Raise a ValueError that says what was wrong and what to do, instead of a failure deep in a kernel."""
    if not ok:
        raise ValueError(message)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
