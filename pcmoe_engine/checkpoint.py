"""Per-party checkpoints: a party writes only what it owns (backbone, expert shard, optimizer, data position),
into its own directory, atomically: a temporary file renamed into place, so a checkpoint is whole or absent.
"""

import os
import re
from pathlib import Path

import torch

__all__ = ["save_checkpoint", "latest_checkpoint", "latest_step", "checkpoint_steps", "load_checkpoint"]

_NAME = re.compile(r"step_(\d+)\.pt")


def _steps(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name)))


def save_checkpoint(directory: Path, step: int, state: dict, keep: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:07d}.pt"
    tmp = directory / f".{path.name}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for _, old in _steps(directory)[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(directory: Path) -> Path | None:
    steps = _steps(directory)
    return steps[-1][1] if steps else None


def latest_step(directory: Path) -> int:
    """The step of the latest checkpoint in ``directory``; 0 when there is none."""
    steps = _steps(directory)
    return steps[-1][0] if steps else 0


def checkpoint_steps(directory: Path) -> dict[int, Path]:
    """Every checkpoint in ``directory``: step -> path, in step order."""
    return dict(_steps(directory))


def load_checkpoint(path: Path, device, mmap: bool = False) -> dict:
    """A checkpoint's state; with ``mmap`` its tensors are mapped from the file and read only when used (e.g.
    the weights without the optimizer state)."""
    return torch.load(path, map_location=device, weights_only=False, mmap=mmap)
