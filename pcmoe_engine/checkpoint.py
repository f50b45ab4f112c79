"""A party's run folder on disk: the checks before anything is written there, the configuration it was started
with, and its checkpoints.

Before a party starts, its folder must be writable, and a fresh start never replaces a run silently: it is
refused unless train.overwrite (or train.resume) says what to do with it. Once the parties have agreed to
start, config.json records the party's whole configuration; resuming is refused for another configuration,
named by its first differing option (lockstep.RESUMABLE lists what may change).

A party writes only what it owns (backbone, expert shard, optimizer, data position) into its own folder,
atomically: a temporary file, flushed to disk, renamed into place, so a checkpoint is whole or absent. It
counts as saved (committed) once every party has saved its step (the health vote, lockstep.py); only then
are older ones beyond train.keep_checkpoints deleted (``prune``), so the latest step every party holds is never
deleted. On resume a damaged checkpoint (empty, truncated or corrupt: its zip CRCs fail) is skipped with a
warning, the parties agree on the latest step every one of them holds intact, and the later ones, which not
every party holds, are dropped.
"""

import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from .config import Config
from .lockstep import first_difference

__all__ = ["check_writable", "check_run_dir", "prepare_party_dir", "record_config", "save_checkpoint", "held_steps",
           "prune", "drop_after", "checkpoint_path", "checkpoint_steps", "load_checkpoint"]

_NAME = re.compile(r"step_(\d+)\.pt")
_HOW = "resume it (--set train.resume=true), name this run (--set train.name=NAME) or replace it " \
       "(--set train.overwrite=true)"


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a file there, or raise a one-line ValueError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".pcmoe-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to {str(folder)!r} ({e.strerror or e}): choose a writable train.out_dir")


def _holds_a_run(folder: Path) -> bool:
    """Any file under ``folder`` (the empty folders a refused start leaves do not count)."""
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def check_run_dir(cfg: Config) -> None:
    """Before any party starts (the launcher): the run's folder is writable and holds no run that this one
    would replace silently."""
    run_dir, t = cfg.run_dir, cfg.train
    if _holds_a_run(run_dir) and not (t.resume or t.overwrite):
        raise ValueError(f"{run_dir} holds a run already: {_HOW}")
    check_writable(run_dir)


def prepare_party_dir(cfg: Config, rank: int) -> Path:
    """A party's own folder, checked before it starts (under torchrun too, where no launcher checked): writable;
    a fresh start refuses an earlier run there unless train.overwrite (then removes it, and party 0 the run's
    merged files); resuming refuses a folder of another configuration."""
    t, folder = cfg.train, cfg.run_dir / f"party{rank}"
    saved = folder / "config.json"
    if t.resume:
        if saved.is_file() and (difference := first_difference(json.loads(saved.read_text()), cfg)):
            raise ValueError(f"{folder} holds a run of another configuration ({difference}): resume it with its "
                             "own configuration, or start a new run (--set train.name=NAME) without train.resume")
    elif _holds_a_run(folder):
        if not t.overwrite:
            raise ValueError(f"{folder} holds a run already: {_HOW}")
        shutil.rmtree(folder)
        if rank == 0:
            for merged in ("summary.json", "metrics.jsonl"):
                (cfg.run_dir / merged).unlink(missing_ok=True)
    check_writable(folder)
    return folder


def record_config(folder: Path, cfg: Config) -> None:
    """config.json, once the parties have agreed to start: what a resume of this folder must match."""
    if not (folder / "config.json").is_file():
        (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def _steps(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name)))


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:07d}.pt"


def save_checkpoint(directory: Path, step: int, state: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    tmp = directory / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)  # the rename itself reaches the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _intact(path: Path) -> bool:
    """Whether a checkpoint file reads back whole: torch.save writes a zip archive with a CRC per entry."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def held_steps(directory: Path, warn: Callable[[str], None]) -> list[int]:
    """The steps of the intact checkpoints in ``directory``; each damaged one gets a one-line warning."""
    held = []
    for step, path in _steps(directory):
        if _intact(path):
            held.append(step)
        else:
            warn(f"checkpoint {path} is damaged (empty, truncated or corrupt): it is skipped, an earlier intact "
                 "one is used")
    return held


def prune(directory: Path, committed: int, keep: int) -> None:
    """Once every party holds step ``committed``: delete all but the ``keep`` latest checkpoints up to it."""
    for _, old in [s for s in _steps(directory) if s[0] <= committed][:-keep]:
        old.unlink()


def drop_after(directory: Path, step: int, held: list[int], warn: Callable[[str], None]) -> None:
    """Delete the checkpoints after ``step``, the step the parties resume from: damaged ones (``held``: the
    intact steps, the others were warned about), and intact ones not every party holds (a line each)."""
    for later, path in _steps(directory):
        if later > step:
            if later in held:
                warn(f"dropping {path}: not every party holds step {later} intact, the run continues from "
                     f"{f'step {step}' if step >= 0 else 'the start'}")
            path.unlink()


def checkpoint_steps(directory: Path) -> dict[int, Path]:
    """Every checkpoint in ``directory``: step -> path, in step order."""
    return dict(_steps(directory))


def load_checkpoint(path: Path, device, mmap: bool = False) -> dict:
    """A checkpoint's state; with ``mmap`` its tensors are mapped from the file and read only when used (e.g.
    the weights without the optimizer state)."""
    try:
        state = torch.load(path, map_location=device, weights_only=False, mmap=mmap)
    except Exception as e:  # a file that passed the CRCs but is not a torch checkpoint
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}): move it away to resume from an "
                         "earlier step") from None
    if not isinstance(state, dict) or not {"step", "config", "backbone", "experts"} <= state.keys():
        raise ValueError(f"{path} is not a pcmoe checkpoint: move it away to resume from an earlier step")
    return state
