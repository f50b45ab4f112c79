"""Named NVTX ranges around the stages of a step, for Nsight Systems; free when nothing records them."""

import contextlib

import torch

__all__ = ["nvtx_range"]

try:
    import nvtx as _nvtx

    def nvtx_range(name: str):
        return _nvtx.annotate(name, domain="pcmoe")
except ImportError:  # torch's own NVTX bindings need CUDA; without either, ranges are a no-op
    if torch.cuda.is_available():
        nvtx_range = torch.cuda.nvtx.range
    else:
        def nvtx_range(name: str):
            return contextlib.nullcontext()
