"""A run folder read back: the model each party owns, from its checkpoints (``party<i>/checkpoints/step_*.pt``,
written by Party.save). A checkpoint is opened memory-mapped, so only the tensors used are read: its backbone and
expert shard, never its optimizer state (twice their size).

A run folder on one machine holds every party's folder; a party on its own host holds only its own. What needs
the other parties' experts (``pcmoe eval`` and ``pcmoe generate`` of a run) reads them from the run folder, so it
works on one machine; across sites it takes the pooled export (export.py).
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import checkpoint_steps, load_checkpoint
from .config import ModelConfig
from .model import Backbone, empty_backbone
from .protocol import ExpertShard

__all__ = ["SavedParty", "is_run", "read_party", "common_step"]


def is_run(path: Path) -> bool:
    """Whether ``path`` is a run folder (it holds party0/, ...)."""
    return path.is_dir() and any(p.is_dir() and p.name[5:].isdigit() for p in path.glob("party[0-9]*"))


@dataclass
class SavedParty:
    """One party's checkpoint of a run: ``state`` is the checkpoint (tensors memory-mapped)."""
    path: Path
    party: int
    parties: int
    step: int
    model: ModelConfig
    state: dict

    @property
    def hf_files(self) -> dict[str, str]:
        """What an export of its model needs beside the weights (Party.hf_files): name -> text."""
        return self.state["hf_files"]

    def backbone(self, device) -> Backbone:
        backbone = empty_backbone(self.model, device)
        backbone.load_state_dict(self.state["backbone"])
        return backbone

    def shard(self, device) -> ExpertShard:
        with torch.device(device):
            shard = ExpertShard(self.model, self.party, self.parties)  # torch.empty: nothing initialised
        shard.load_state_dict(self.state["experts"])
        return shard


def _steps(run_dir: Path, party: int) -> dict[int, Path]:
    steps = checkpoint_steps(run_dir / f"party{party}" / "checkpoints")
    if not steps:
        raise ValueError(f"party {party} of run {str(run_dir)!r} has no checkpoint (party{party}/checkpoints/"
                         "step_*.pt): export and evaluation read the checkpoints; train with train.checkpoints=true "
                         "(a checkpoint is written at the last step)")
    return steps


def read_party(run_dir, party: int, step: int | None = None) -> SavedParty:
    """Party ``party``'s checkpoint of ``step`` (default: its latest) in the run folder ``run_dir``."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ValueError(f"run folder {str(run_dir)!r} does not exist: give the folder `pcmoe train` wrote "
                         "(train.out_dir/train.name)")
    if not (run_dir / f"party{party}").is_dir():
        known = sorted(int(p.name[5:]) for p in run_dir.glob("party[0-9]*") if p.name[5:].isdigit())
        if not is_run(run_dir):
            raise ValueError(f"{str(run_dir)!r} is not a run folder (no party<i>/ in it): give the folder `pcmoe "
                             "train` wrote")
        parties = read_party(run_dir, known[0]).parties
        if not 0 <= party < parties:
            raise ValueError(f"--party {party} is out of range: run {str(run_dir)!r} has {parties} parties "
                             f"(0 to {parties - 1})")
        raise ValueError(f"run folder {str(run_dir)!r} has no party{party}/: party {party}'s checkpoints are on "
                         "its own host; run this there, or use the pooled export (pcmoe export --pool)")
    steps = _steps(run_dir, party)
    if step is None:
        step = max(steps)
    if step not in steps:
        raise ValueError(f"party {party} of run {str(run_dir)!r} has no checkpoint of step {step} (it has steps "
                         f"{', '.join(map(str, steps))}): pick one of those with --step")
    state = load_checkpoint(steps[step], "cpu", mmap=True)
    if "hf_files" not in state:
        raise ValueError(f"checkpoint {str(steps[step])!r} has no tokenizer files (written by an older pcmoe): "
                         "resume the run for one step with this version to write a new checkpoint")
    parties = state["config"]["parties"]
    if not 0 <= party < parties:
        raise ValueError(f"--party {party} is out of range: run {str(run_dir)!r} has {parties} parties "
                         f"(0 to {parties - 1})")
    return SavedParty(steps[step], party, parties, step, ModelConfig(**state["config"]["model"]), state)


def common_step(run_dir, parties: int) -> int:
    """The latest step of which every party of the run folder has a checkpoint."""
    run_dir = Path(run_dir).expanduser()
    steps = [set(_steps(run_dir, p)) if (run_dir / f"party{p}").is_dir() else None for p in range(parties)]
    absent = [p for p, s in enumerate(steps) if s is None]
    if absent:
        raise ValueError(f"run folder {str(run_dir)!r} has no folder of part{'y' if len(absent) == 1 else 'ies'} "
                         f"{', '.join(map(str, absent))}: every party's shard is needed here; with the parties on "
                         "their own hosts, pool the experts (pcmoe export --pool --rendezvous HOST:PORT)")
    shared = set.intersection(*steps)
    if not shared:
        raise ValueError(f"the parties of run {str(run_dir)!r} have no checkpoint step in common: resume the run "
                         "so that all of them write one")
    return max(shared)
