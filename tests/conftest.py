import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter; it must be chosen before triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A party process that a test spawns and that dies of a signal prints every thread's Python stack
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty during the test comes back full of NaN (floats) or -1 (integers)."""
    from helpers import poisoned_empty

    monkeypatch.setattr(torch, "empty", poisoned_empty(torch.empty))


@pytest.fixture
def profiling():
    """The engine's named ranges switched on for the test (pcmoe_engine.nvtx)."""
    from pcmoe_engine import nvtx

    was = nvtx.enabled()
    nvtx.enable()
    yield
    nvtx.enable(was)
