"""One party of a PC-MoE run: its device, data, private backbone, expert shard, wire and optimizer, and what it
does with them, one call at a time.

    party = Party(cfg, rank)       # the process group (or the transport passed), if any, is already up
    party.handshake()              # or party.resume(): continue from the latest checkpoint every party holds
    while party.step_count < cfg.train.steps:
        record = party.step()      # one optimizer step (or one skipped at every party); that step's metrics
    party.save(); party.commit(); party.evaluate(); party.summary(eval_loss)

The parties call the same methods in the same order: every forward pass exchanges rows with every other party
at every MoE layer, so a step, an evaluation or a forward_backward of one party waits for the same call of all
the others. Every step ends with the parties' health vote (lockstep.py): a non-finite loss or gradient at any
party skips the optimizer step at every party (train.nonfinite), and a checkpoint counts as saved once every
party has saved its step. ``train.train`` is the plain loop over this (logging, evaluation and checkpoint cadence);
benchmarks, profilers and evaluations drive a Party the same way. A Party writes no files but its checkpoints
(and its wire log, with train.wire_log).

With ``model.init_from`` a party starts from a transformers checkpoint: its backbone and only its own experts
are allocated on its device without an init and read from the folder (hf.load_party), and its text is tokenised
with the folder's tokenizer. Its checkpoints then also carry the folder's config.json and tokenizer files, so a
party's model can be exported (export.py) without the folder.
"""

import contextlib
import math
import os
import resource
import time
from pathlib import Path

import torch

import csrc_triton as ct

from . import lockstep
from .checkpoint import checkpoint_path, drop_after, held_steps, load_checkpoint, prune, save_checkpoint
from .config import Config
from .data import Batches, eval_batches, party_tokens, tokenizer_for
from .faults import Diverged, say
from .hf import checkpoint_files, load_party, load_public_experts
from .model import Backbone, Loss, compute_loss, count_parameters
from .nvtx import nvtx_range
from .optim import StepInBackward, build_optimizer, clip_grad_norms, grad_bound, grad_norms
from .placement import pin_to_gpu
from .protocol import DistributedExperts, ExpertShard, Wire, WireLog
from .rng import seeded
from .transport import Transport

__all__ = ["Party", "initial_backbone", "build_optimizer", "lr_at", "party_device", "process_group_backend",
           "peak_memory"]


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to lr, then cosine down to min_lr (lr / 10 unset) at the last step (steps count from 1)."""
    t = cfg.train
    if step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr_floor + 0.5 * (t.lr - t.lr_floor) * (1 + math.cos(math.pi * progress))


def party_device(cfg: Config) -> torch.device:
    """This party's device. GPU LOCAL_RANK when there is one per party on this host; with train.device=cuda
    and fewer GPUs than parties, the parties share them round-robin (LOCAL_RANK mod the GPU count)."""
    local_parties = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.parties))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and gpus >= local_parties)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % gpus) if use_cuda else torch.device("cpu")


def process_group_backend(cfg: Config) -> str:
    """NCCL when each party on this host has a GPU of its own; gloo on CPUs, and when parties share a GPU
    (NCCL refuses two ranks on one device; gloo stages GPU tensors through host memory)."""
    local_parties = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.parties))
    own_gpu = party_device(cfg).type == "cuda" and torch.cuda.device_count() >= local_parties
    return "nccl" if own_gpu else "gloo"


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): the most GPU memory allocated so far, or on a CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


def initial_backbone(cfg: Config, rank: int) -> Backbone:
    """The backbone party ``rank`` starts from: drawn from its own seed, so no other party knows it."""
    backbone = Backbone(cfg.model)
    backbone.init_weights(seeded(cfg.train.seed, "backbone", rank))
    return backbone


def _bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class Party:
    """Party ``rank`` of ``cfg.parties``. Public state: ``cfg``, ``rank``, ``device``, ``autocast`` (the
    precision context of its forward passes), ``dir`` (its run folder), ``tokenizer``, ``hf_files`` (what an
    export of its model needs beside the weights: name -> text), ``batches``, ``eval_tokens``, ``backbone``,
    ``shard``, ``wire``, ``experts``, ``optimizer``, ``step_count`` (steps taken), ``progress`` (losses and
    timed throughput, checkpointed with the rest), ``saved`` and ``committed`` (the step of this party's latest
    checkpoint, and of the latest one every party holds; None: none) and ``setup`` (the seconds and peak memory
    of building it)."""

    def __init__(self, cfg: Config, rank: int, transport: Transport | None = None,
                 tokens: tuple[torch.Tensor, torch.Tensor] | None = None):
        started = time.perf_counter()
        t, init_from = cfg.train, cfg.model.init_from
        self.cfg, self.rank = cfg, rank
        self.device = party_device(cfg)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if t.pin_cpus:
                pin_to_gpu(self.device)
        bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        self.precision = "bf16" if bf16 else "fp32"
        self.dir = cfg.run_dir / f"party{rank}"

        self.tokenizer = tokenizer_for(cfg)
        self.hf_files = checkpoint_files(init_from) if init_from else {"tokenizer.json": self.tokenizer.to_str()}
        # ``tokens``: (train, held-out) tokens made by the caller (bench/convergence.py pools several texts).
        train_tokens, self.eval_tokens = tokens if tokens is not None else party_tokens(cfg, rank, self.tokenizer)
        self.batches = Batches(train_tokens, cfg.data.seq_len, t.batch_size, seed=(t.seed, "data", rank))

        if init_from:
            self.backbone, self.shard = load_party(init_from, cfg.model, rank, cfg.parties, self.device)
        else:
            self.backbone = initial_backbone(cfg, rank).to(self.device)
            self.shard = ExpertShard(cfg.model, rank, cfg.parties)
            self.shard.init_weights(t.seed)
            self.shard.to(self.device)
        wire_log = None
        if t.wire_log:
            self.dir.mkdir(parents=True, exist_ok=True)
            wire_log = WireLog(self.dir / "wire.jsonl")
        # The rows travel over ``transport``; by default torch.distributed's default process group.
        # Its defences' noise and row order come from a secret of its own (wire.py), not from train.seed, which
        # every party knows.
        self.wire = Wire(rank, cfg.parties, log=wire_log, privacy=cfg.privacy.resolved(bool(init_from)),
                         transport=transport)
        self.experts = DistributedExperts(self.shard, self.wire, cfg.wire)
        if cfg.privacy.public_correction and init_from and cfg.parties > 1:  # (bench/privacy gives its own)
            self.experts.public_experts = load_public_experts(
                init_from, cfg.model, self.device, torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.optimizer = build_optimizer(cfg, (self.backbone, self.shard), self.device)
        self.step_count = 0
        self.progress = {"initial_loss": None, "final_loss": None, "timed_tokens": 0, "timed_seconds": 0.0}
        self.saved: int | None = None
        self.committed: int | None = None
        self.nonfinite_streak = 0  # steps skipped in a row
        self.setup = {"seconds": time.perf_counter() - started,
                      "peak_host_rss_bytes": peak_memory(torch.device("cpu"))[0],
                      "peak_device_bytes": peak_memory(self.device)[0] if self.device.type == "cuda" else None}

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        t = self.cfg.train
        return t.batch_size * t.grad_accum * self.cfg.data.seq_len

    def load_backbone(self, state: dict) -> None:
        """Start from another backbone's weights (e.g. ``initial_backbone(cfg, 0).state_dict()`` in every party:
        a shared initialisation, as when all parties fine-tune one public model). Before the first step."""
        self.backbone.load_state_dict(state)

    def _warn(self, line: str) -> None:
        say(f"party {self.rank} | {line}")

    def handshake(self) -> None:
        """Check with every other party that all run the same protocol and configuration (a fresh start)."""
        lockstep.handshake(self.wire, self.cfg, self.precision, None, self.device)

    def resume(self) -> Path | None:
        """The handshake, resuming: continue from the latest checkpoint every party holds intact (damaged ones
        are skipped with a warning, later ones dropped: not every party holds them); returns its path, or None
        when there is none (the run starts from step 0)."""
        held = held_steps(self.checkpoint_dir, self._warn)
        step = lockstep.handshake(self.wire, self.cfg, self.precision, held, self.device)
        drop_after(self.checkpoint_dir, -1 if step is None else step, held, self._warn)
        if step is None:
            return None
        path = checkpoint_path(self.checkpoint_dir, step)
        state = load_checkpoint(path, self.device)
        if difference := lockstep.first_difference(state["config"], self.cfg):
            raise ValueError(f"checkpoint {path} was written for another configuration ({difference}): resume with "
                             "its configuration, or start a new run (--set train.name=NAME) without train.resume")
        self.backbone.load_state_dict(state["backbone"])
        self.shard.load_state_dict(state["experts"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["data"])
        self.wire.bytes_sent, self.wire.bytes_received = state["bytes_sent"], state["bytes_received"]
        self.wire.load_state_dict(state["wire"])  # its secret: the noise and row order go on as if never stopped
        self.step_count, self.progress = state["step"], state["progress"]
        self.saved = self.committed = step
        return path

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[Loss, list[ct.RouterOutput]]:
        """One micro-batch through the model and back: its gradients add to the parameters' (scaled by
        1 / train.grad_accum). Returns the loss and each MoE layer's routing."""
        t = self.cfg.train
        # Without waiting for the device: a blocking copy would drain its queue at every micro-batch.
        inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        with self.autocast:
            logits, routings = self.backbone(inputs, self.experts, t.activation_checkpointing)
            loss = compute_loss(logits, targets, routings, t.aux_loss_coef, t.z_loss_coef)
        with nvtx_range("backward"):
            (loss.total / t.grad_accum).backward()
        return loss, routings

    def step(self) -> dict:
        """One optimizer step over train.grad_accum micro-batches; returns that step's metrics record."""
        t, model = self.cfg.train, self.cfg.model
        self.step_count += 1
        started = time.perf_counter()
        lr = lr_at(self.step_count, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # The step's metrics stay on the device until its end: one device->host sync per step, not per micro-batch.
        sums = torch.zeros(3, device=self.device)
        load = torch.zeros(len(model.moe_layers), model.num_experts, dtype=torch.int64, device=self.device)
        for _ in range(t.grad_accum):
            loss, routings = self.forward_backward(*self.batches.next())
            sums += torch.stack([loss.ce, loss.load_balancing, loss.z]).detach().float()
            load += torch.stack([r.tokens_per_expert for r in routings])
        with nvtx_range("optimizer"):
            in_backward = isinstance(self.optimizer, StepInBackward)  # backward has stepped every parameter already
            # The backbone and the expert shard, each clipped to its own bound (optim.py).
            param_sets = [(list(m.parameters()), grad_bound(self.cfg, m)) for m in (self.backbone, self.shard)]
            norms = self.optimizer.grad_norms() if in_backward else grad_norms([params for params, _ in param_sets])
            nonfinite = torch.cat([(~sums.isfinite()).any().reshape(1), ~norms.isfinite()]).tolist()
            votes = lockstep.vote(self.wire, self.step_count, nonfinite, -1 if self.saved is None else self.saved,
                                  self.device)
            self._commit(votes.saved)
            if votes.nonfinite:
                self._skip(votes.nonfinite, in_backward)
            else:
                self.nonfinite_streak = 0
                if not in_backward:
                    clip_grad_norms(param_sets, norms)
                    self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)  # (a no-op in backward: there are no gradients left)
        ce, balance, z, grad_norm, expert_grad_norm = torch.cat([sums / t.grad_accum, norms.to(sums.device)]).tolist()
        seconds = time.perf_counter() - started
        progress = self.progress
        progress["final_loss"] = ce
        if progress["initial_loss"] is None:
            progress["initial_loss"] = ce
        else:  # the first step pays for warm-up (allocator, caches): leave it out of the throughput
            progress["timed_tokens"] += self.tokens_per_step
            progress["timed_seconds"] += seconds
        return {"step": self.step_count, "loss": ce, "load_balancing_loss": balance, "z_loss": z, "lr": lr,
                "skipped": bool(votes.nonfinite), "grad_norm": grad_norm, "expert_grad_norm": expert_grad_norm,
                "step_time_s": seconds, "tokens_per_s": self.tokens_per_step / seconds,
                "peak_memory_bytes": peak_memory(self.device)[0], "bytes_sent": self.wire.total_sent,
                "bytes_received": self.wire.total_received, "expert_load": load.tolist()}

    def _skip(self, nonfinite: dict[int, list[str]], stepped: bool) -> None:
        """Every party skips this step's optimizer update (they all saw the same votes), or all stop: always when
        the parameters have ``stepped`` already (train.optimizer_in_backward)."""
        t = self.cfg.train
        self.nonfinite_streak += 1
        where = "; ".join(f"{', '.join(what)} at party {party}" for party, what in nonfinite.items())
        advice = ("the run diverged: start a new run (--set train.name=NAME) with a lower train.lr or more "
                  "train.warmup_steps")
        if t.nonfinite == "stop" or stepped:
            why = "train.nonfinite=stop" if t.nonfinite == "stop" else \
                "train.optimizer_in_backward stepped already: the step cannot be skipped"
            raise Diverged(f"step {self.step_count}: non-finite {where} ({why}); {advice}")
        if self.nonfinite_streak >= t.nonfinite_patience:
            raise Diverged(f"steps {self.step_count - self.nonfinite_streak + 1}-{self.step_count}: non-finite "
                           f"values {self.nonfinite_streak} steps in a row, last {where} "
                           f"(train.nonfinite_patience={t.nonfinite_patience}); {advice}")
        self._warn(f"step {self.step_count} skipped at every party: non-finite {where} ({self.nonfinite_streak} in a "
                   f"row; the run stops at train.nonfinite_patience={t.nonfinite_patience})")

    def _commit(self, saved: list[int]) -> None:
        """When every party has saved the same step: it is committed, and older checkpoints may go."""
        if saved[0] >= 0 and len(set(saved)) == 1 and saved[0] != self.committed:
            self.committed = saved[0]
            prune(self.checkpoint_dir, self.committed, self.cfg.train.keep_checkpoints)

    def commit(self) -> None:
        """At the end of a run: if this party saved a checkpoint since the last vote, one more vote, so every party
        commits it (every party saves at the same steps, so all take part)."""
        if self.saved is not None and self.saved != self.committed:
            self._commit(lockstep.vote(self.wire, self.step_count, [False] * 3, self.saved, self.device).saved)

    def evaluate(self, tokens: torch.Tensor | None = None) -> float:
        """Mean held-out cross-entropy over train.eval_batches batches (the same ones every time) of the party's
        held-out tokens, or of ``tokens``."""
        t = self.cfg.train
        # Every party runs the same number of forward passes: the experts need all parties in lockstep.
        self.backbone.eval()
        losses = []
        with torch.no_grad(), self.autocast:
            for inputs, targets in eval_batches(self.eval_tokens if tokens is None else tokens, self.cfg.data.seq_len,
                                                t.batch_size, t.eval_batches):
                logits, routings = self.backbone(inputs.to(self.device), self.experts)
                losses.append(compute_loss(logits, targets.to(self.device), routings, 0, 0).ce.item())
        self.backbone.train()
        return sum(losses) / len(losses)

    def save(self) -> Path:
        """A checkpoint of everything this party owns at this step, and its whole configuration (whole or absent).
        It counts as saved once every party has saved this step (the next health vote, or ``commit``); only then
        do the oldest beyond train.keep_checkpoints go. Non-finite weights or optimizer state are never saved:
        Diverged instead."""
        state = [*self.backbone.parameters(), *self.shard.parameters(),
                 *(v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
        if not torch.stack([v.isfinite().all() for v in state]).all():
            raise Diverged(f"step {self.step_count}: non-finite weights or optimizer state, not checkpointed: the run "
                           "diverged; start a new run (--set train.name=NAME) with a lower train.lr")
        path = save_checkpoint(self.checkpoint_dir, self.step_count, {
            "step": self.step_count, "config": self.cfg.to_dict(), "expert_ids": self.shard.expert_ids,
            "backbone": self.backbone.state_dict(), "experts": self.shard.state_dict(),
            "optimizer": self.optimizer.state_dict(), "data": self.batches.state_dict(),
            "bytes_sent": self.wire.bytes_sent, "bytes_received": self.wire.bytes_received,
            "wire": self.wire.state_dict(), "progress": self.progress, "hf_files": self.hf_files})
        self.saved = self.step_count
        return path

    def summary(self, eval_loss: float | None = None) -> dict:
        """This party's run so far: losses, throughput, peak memory and what holds it, traffic."""
        progress, wire = self.progress, self.wire
        peak, memory_kind = peak_memory(self.device)
        optimizer_bytes = sum(v.numel() * v.element_size() for s in self.optimizer.state.values()
                              for v in s.values() if torch.is_tensor(v))
        return {
            "party": self.rank, "parties": self.cfg.parties, "preset": self.cfg.model.preset,
            "steps": self.step_count, "device": str(self.device),
            "initial_loss": progress["initial_loss"], "final_loss": progress["final_loss"], "eval_loss": eval_loss,
            "tokens_per_s": (progress["timed_tokens"] / progress["timed_seconds"]
                             if progress["timed_seconds"] else None),
            "peak_memory_bytes": peak, "peak_memory_kind": memory_kind,
            "bytes_sent": wire.total_sent, "bytes_received": wire.total_received,
            "bytes_sent_by_kind": wire.bytes_sent, "bytes_received_by_kind": wire.bytes_received,
            "parameters": {"backbone": count_parameters(self.backbone), "local_experts": count_parameters(self.shard)},
            "expert_ids": self.shard.expert_ids, "setup": self.setup,
            "memory": {"backbone_params_bytes": _bytes(self.backbone), "expert_params_bytes": _bytes(self.shard),
                       "optimizer_state_bytes": optimizer_bytes},
        }

    def close(self) -> None:
        """Flush and close the wire log, if any."""
        if self.wire.log is not None:
            self.wire.log.close()
