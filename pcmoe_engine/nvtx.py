"""Named ranges around the stages of a step, forward and backward: NVTX ranges for Nsight Systems (the nvtx
package, else torch.cuda.nvtx, else none) and torch.profiler ranges (record_function) for
profiling/engine_step.py.

    with stage("experts") as s:
        y = s.output(grouped_mlp(s.input(x), ...))

runs the forward inside a range "experts", and brackets the stage's backward in a range "experts.backward":
it opens when the gradient of the marked output arrives and closes once the gradients of all marked inputs
are computed (other work the autograd engine interleaves falls inside too).

Off unless switched on, and then free: ``stage`` and ``nvtx_range`` return one shared do-nothing context
(no autograd nodes, no record_function) until ``enable()`` is called (profiling/engine_step.py does) or the
process starts with ``PCMOE_PROFILE=1`` (for runs under Nsight Systems, e.g.
``PCMOE_PROFILE=1 nsys profile -t cuda,nvtx pcmoe train ...``). Switch it before a step, not inside one.
The marks are identity nodes, but they change the autograd graph, hence the order in which gradients that
meet are summed: a profiled run may differ from an unprofiled one in the last bits of a float.
"""

import contextlib
import os

import torch
from torch.profiler import record_function

__all__ = ["enable", "enabled", "nvtx_range", "stage"]

try:
    import nvtx as _nvtx

    def _annotate(name: str):
        return _nvtx.annotate(name, domain="pcmoe")

    def _range_start(name: str):
        return _nvtx.start_range(name, domain="pcmoe")

    _range_end = _nvtx.end_range
except ImportError:  # torch's own NVTX bindings need CUDA; without either, NVTX ranges are a no-op
    if torch.cuda.is_available():
        _annotate, _range_start, _range_end = torch.cuda.nvtx.range, torch.cuda.nvtx.range_start, torch.cuda.nvtx.range_end
    else:
        def _annotate(name: str):
            return contextlib.nullcontext()

        def _range_start(name: str):
            return None

        def _range_end(handle) -> None:
            pass

_enabled = os.environ.get("PCMOE_PROFILE", "0") not in ("", "0")


def enable(on: bool = True) -> None:
    """Record the ranges from now on (``enable(False)``: stop)."""
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def _recorded_range(name: str):
    with _annotate(name), record_function(name):
        yield


class _Off:
    """What stage() and nvtx_range() are while nothing records: a context that marks nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    output = input


_OFF = _Off()


def nvtx_range(name: str):
    """A range around a block of host code (and the kernels it launches)."""
    return _recorded_range(name) if _enabled else _OFF


class _BackwardSpan:
    """A range opened and closed from autograd callbacks (not nested: NVTX start/end, not push/pop)."""

    def __init__(self, name: str):
        self.name, self.inputs, self.handles = name, 0, None

    def open(self) -> None:
        if self.handles is None:
            profiler_range = record_function(self.name)
            profiler_range.__enter__()
            self.handles = (_range_start(self.name), profiler_range, self.inputs)

    def input_done(self) -> None:
        if self.handles is None:
            return
        nvtx_handle, profiler_range, pending = self.handles
        if pending > 1:
            self.handles = (nvtx_handle, profiler_range, pending - 1)
            return
        profiler_range.__exit__(None, None, None)
        _range_end(nvtx_handle)
        self.handles = None


class _Mark(torch.autograd.Function):
    """Identity; its backward opens the span (on a stage's output) or counts one input as done."""

    @staticmethod
    def forward(ctx, x, span: _BackwardSpan, opens: bool):
        ctx.span, ctx.opens = span, opens
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.opens:
            ctx.span.open()
        else:
            ctx.span.input_done()
        return grad, None, None


class _Stage(contextlib.AbstractContextManager):
    """A named stage: a forward range, and a backward range over the tensors marked with input/output."""

    def __init__(self, name: str):
        self.backward = _BackwardSpan(f"{name}.backward")
        self._range = _recorded_range(name)

    def __enter__(self):
        self._range.__enter__()
        return self

    def __exit__(self, *exc):
        return self._range.__exit__(*exc)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return x
        self.backward.inputs += 1
        return _Mark.apply(x, self.backward, False)

    def output(self, y: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and y.requires_grad):
            return y
        return _Mark.apply(y, self.backward, True)


def stage(name: str):
    """A named stage (see the module docstring); marks nothing unless profiling is on."""
    return _Stage(name) if _enabled else _OFF
