"""One party's training process: ``torchrun --nproc-per-node N -m pcmoe_engine.train [--config f.toml]
[--set key=value ...]`` (or ``pcmoe train --parties N``, which launches these for you).

The parties step in lockstep, each on its own batch. Each one's optimizer updates only its own backbone and
expert shard; the only traffic is the protocol's (see protocol.py). Writes, under the run directory:
party<i>/metrics.jsonl, party<i>/summary.json, party<i>/checkpoints/; party 0 merges the parties' files into
metrics.jsonl and summary.json at the end.
"""

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, load_config
from .data import Batches, encode, eval_batches, load_tokenizer, party_texts
from .model import Backbone, compute_loss, count_parameters
from .rng import seeded
from .nvtx import nvtx_range
from .protocol import DistributedExperts, ExpertShard, Wire, WireLog

__all__ = ["main", "train", "lr_at", "party_device", "process_group_backend"]

MiB = 2**20


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to lr, then cosine down to min_lr at the last step (steps count from 1)."""
    t = cfg.train
    if step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


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


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


def _optimizer(cfg: Config, modules) -> torch.optim.AdamW:
    """AdamW over this party's own parameters; no weight decay on norms and biases."""
    params = [p for m in modules for p in m.parameters()]
    t = cfg.train
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def _bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _compatible(saved: dict, cfg: Config, path: Path) -> None:
    current = {"parties": cfg.parties, "model": cfg.to_dict()["model"]}
    if saved != current:
        raise ValueError(f"checkpoint {path} was written for another model or number of parties: run with the "
                         "same config, or start a new run (--set train.name=...) without train.resume")


def _say(line: str) -> None:
    """One line to stdout in a single write, so the parties' lines never interleave mid-line."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _Log:
    """This party's metrics (JSON lines) and progress line."""

    def __init__(self, path: Path, party: int, resume_step: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and path.is_file():  # drop what was logged after the checkpoint we resume from
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a", buffering=1)
        self.party = party

    def write(self, record: dict) -> None:
        self.file.write(json.dumps({"party": self.party, **record}) + "\n")

    def progress(self, r: dict, steps: int, memory_kind: str) -> None:
        kind = "rss" if memory_kind == "cpu_max_rss" else "gpu"
        _say(f"party {self.party} | step {r['step']:>{len(str(steps))}}/{steps} | loss {r['loss']:.4f} | "
            f"lr {r['lr']:.2e} | {r['tokens_per_s']:,.0f} tok/s | peak mem {r['peak_memory_bytes'] / MiB:,.0f} "
            f"MiB ({kind}) | sent {r['bytes_sent'] / MiB:,.1f} MiB")


def train(cfg: Config, party: int, on_step=None) -> dict:
    """Train as ``party`` of ``cfg.parties`` (the process group, if any, is already up). Returns its summary.

    ``on_step(record)``, if given, is called after every step with that step's metrics (benchmarks and
    profilers hook in here)."""
    t, parties = cfg.train, cfg.parties
    device = party_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    party_dir = cfg.run_dir / f"party{party}"
    party_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(cfg.data, cfg.model.vocab_size)
    train_text, eval_text = party_texts(cfg, party)
    batches = Batches(encode(tokenizer, train_text), cfg.data.seq_len, t.batch_size, seed=(t.seed, "data", party))
    eval_tokens = encode(tokenizer, eval_text)

    backbone = Backbone(cfg.model)
    backbone.init_weights(seeded(t.seed, "backbone", party))  # each party its own
    shard = ExpertShard(cfg.model, party, parties)
    shard.init_weights(t.seed)
    backbone.to(device)
    shard.to(device)
    wire_log = WireLog(party_dir / "wire.jsonl") if t.wire_log else None
    wire = Wire(party, parties, dist.group.WORLD if parties > 1 else None, wire_log, cfg.privacy, t.seed)
    experts = DistributedExperts(shard, wire)
    optimizer = _optimizer(cfg, (backbone, shard))

    step, progress = 0, {"initial_loss": None, "final_loss": None, "timed_tokens": 0, "timed_seconds": 0.0}
    checkpoints = party_dir / "checkpoints"
    resume_from = latest_checkpoint(checkpoints) if t.resume else None
    if resume_from is not None:
        state = load_checkpoint(resume_from, device)
        _compatible(state["config"], cfg, resume_from)
        backbone.load_state_dict(state["backbone"])
        shard.load_state_dict(state["experts"])
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"])
        wire.bytes_sent, wire.bytes_received = state["bytes_sent"], state["bytes_received"]
        step, progress = state["step"], state["progress"]
        _say(f"party {party} | resumed from {resume_from} at step {step}")
    log = _Log(party_dir / "metrics.jsonl", party, step)

    def evaluate() -> float:
        # Every party runs the same number of forward passes: the experts need all parties in lockstep.
        backbone.eval()
        losses = []
        with torch.no_grad(), autocast:
            for inputs, targets in eval_batches(eval_tokens, cfg.data.seq_len, t.batch_size, t.eval_batches):
                logits, routings = backbone(inputs.to(device), experts)
                losses.append(compute_loss(logits, targets.to(device), routings, 0, 0).ce.item())
        backbone.train()
        return sum(losses) / len(losses)

    def save() -> None:
        save_checkpoint(checkpoints, step, {
            "step": step, "config": {"parties": parties, "model": cfg.to_dict()["model"]},
            "expert_ids": shard.expert_ids, "backbone": backbone.state_dict(), "experts": shard.state_dict(),
            "optimizer": optimizer.state_dict(), "data": batches.state_dict(), "bytes_sent": wire.bytes_sent,
            "bytes_received": wire.bytes_received, "progress": progress}, t.keep_checkpoints)

    params = list(backbone.parameters()) + list(shard.parameters())
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len
    memory_kind = _peak_memory(device)[1]
    while step < t.steps:
        step += 1
        started = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(3)
        load = torch.zeros(cfg.model.num_layers, cfg.model.num_experts, dtype=torch.int64)
        for _ in range(t.grad_accum):
            inputs, targets = (b.to(device) for b in batches.next())
            with autocast:
                logits, routings = backbone(inputs, experts, t.activation_checkpointing)
                loss = compute_loss(logits, targets, routings, t.aux_loss_coef, t.z_loss_coef)
            with nvtx_range("backward"):
                (loss.total / t.grad_accum).backward()
            sums += torch.stack([loss.ce, loss.load_balancing, loss.z]).detach().float().cpu()
            load += torch.stack([r.tokens_per_expert for r in routings]).cpu()
        with nvtx_range("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        ce, balance, z = (sums / t.grad_accum).tolist()
        progress["final_loss"] = ce
        if progress["initial_loss"] is None:
            progress["initial_loss"] = ce
        else:  # the first step pays for warm-up (allocator, caches): leave it out of the throughput
            progress["timed_tokens"] += tokens_per_step
            progress["timed_seconds"] += seconds
        record = {"step": step, "loss": ce, "load_balancing_loss": balance, "z_loss": z, "lr": lr,
                  "grad_norm": grad_norm.item(), "step_time_s": seconds, "tokens_per_s": tokens_per_step / seconds,
                  "peak_memory_bytes": _peak_memory(device)[0], "bytes_sent": wire.total_sent,
                  "bytes_received": wire.total_received, "expert_load": load.tolist()}
        log.write(record)
        if on_step is not None:
            on_step(record)
        if step == 1 or step % t.log_every == 0 or step == t.steps:
            log.progress(record, t.steps, memory_kind)
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
            log.write({"step": step, "eval_loss": evaluate()})
        if t.checkpoints and ((t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps):
            save()

    eval_loss = evaluate()
    log.write({"step": step, "eval_loss": eval_loss})
    _say(f"party {party} | eval loss {eval_loss:.4f}")
    peak, memory_kind = _peak_memory(device)
    optimizer_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                          if torch.is_tensor(v))
    summary = {
        "party": party, "parties": parties, "preset": cfg.model.preset, "steps": step, "device": str(device),
        "initial_loss": progress["initial_loss"], "final_loss": progress["final_loss"],
        "eval_loss": eval_loss,
        "tokens_per_s": progress["timed_tokens"] / progress["timed_seconds"] if progress["timed_seconds"] else None,
        "peak_memory_bytes": peak, "peak_memory_kind": memory_kind,
        "bytes_sent": wire.total_sent, "bytes_received": wire.total_received,
        "bytes_sent_by_kind": wire.bytes_sent, "bytes_received_by_kind": wire.bytes_received,
        "parameters": {"backbone": count_parameters(backbone), "local_experts": count_parameters(shard)},
        "expert_ids": shard.expert_ids,
        "memory": {"backbone_params_bytes": _bytes(backbone), "expert_params_bytes": _bytes(shard),
                   "optimizer_state_bytes": optimizer_bytes},
    }
    (party_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if wire_log is not None:
        wire_log.close()
    return summary


def merge_run(cfg: Config) -> dict:
    """Gather the parties' summaries and metrics (as far as this machine can read them) into the run's own."""
    run_dir = cfg.run_dir
    parts = [json.loads(p.read_text()) if (p := run_dir / f"party{i}" / "summary.json").is_file() else None
             for i in range(cfg.parties)]
    present = [s for s in parts if s is not None]
    per_party = {key: [s and s[key] for s in parts] for key in (
        "initial_loss", "final_loss", "eval_loss", "tokens_per_s", "peak_memory_bytes", "bytes_sent",
        "bytes_received")}
    summary = {
        "parties": cfg.parties, "preset": cfg.model.preset, "steps": cfg.train.steps,
        "device": [s and s["device"] for s in parts], **per_party,
        "tokens_per_s_total": sum(s["tokens_per_s"] or 0 for s in present),
        "peak_memory_kind": present[0]["peak_memory_kind"] if present else None,
        "parameters": {"backbone": [s and s["parameters"]["backbone"] for s in parts],
                       "local_experts": [s and s["parameters"]["local_experts"] for s in parts]},
        "memory": [s and s["memory"] for s in parts],
        "parties_missing": [i for i, s in enumerate(parts) if s is None],
        "config": cfg.to_dict(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = []
    for i in range(cfg.parties):
        if (path := run_dir / f"party{i}" / "metrics.jsonl").is_file():
            lines += [json.loads(line) for line in path.read_text().splitlines()]
    lines.sort(key=lambda r: (r["step"], "eval_loss" in r, r["party"]))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pcmoe_engine.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="TOML file (default: the packaged configs/tiny.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    party = int(os.environ.get("RANK", 0))
    try:
        cfg = load_config(args.config, args.overrides, parties=world if "WORLD_SIZE" in os.environ else None)
    except ValueError as e:
        sys.exit(f"pcmoe: error: {e}")
    if cfg.parties != world:
        sys.exit(f"pcmoe: error: parties={cfg.parties} needs one process per party: run `pcmoe train --parties "
                 f"{cfg.parties}` or `torchrun --nproc-per-node {cfg.parties} -m pcmoe_engine.train`")
    if world > 1:
        dist.init_process_group(process_group_backend(cfg), rank=party, world_size=world, timeout=timedelta(minutes=10))
    try:
        train(cfg, party)
        if world > 1:
            dist.barrier()  # carries no data: it only waits for every party's files
        if party == 0:
            merge_run(cfg)
    except ValueError as e:
        sys.exit(f"pcmoe: error (party {party}): {e}")
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
