"""A party's trained model out of the engine, as a transformers checkpoint folder (``pcmoe export``).

Without --pool a party writes what it owns: its backbone and its own routed experts (e mod n == its index). That
is a partial checkpoint: transformers' ``from_pretrained`` cannot load it whole (the other parties' experts would
be missing keys, initialised at random); the engine reads it back as that party's model (hf.load_hf_weights with
the party's shard), and ``pcmoe eval`` / ``pcmoe generate`` say that it is partial.

With --pool the parties opt in to pool their routed experts. All of them run their export at once (on one machine
one command launches them all; across hosts each party runs its own with --rendezvous HOST:PORT), and in every MoE
layer each sends its experts' weights to every other party: wire kind "expert_weights", through Wire.exchange like
everything that crosses (docs/privacy.md says what it reveals). Every party then holds every expert, and writes
a complete model, its own backbone with all the experts, that ``AutoModelForCausalLM.from_pretrained`` loads with
no missing, unexpected or mismatched key. Launched from one machine only party --party writes (the others only
contribute); across hosts each party writes its own.

The folder holds the weights (hf.save_hf_checkpoint: safetensors, and a config.json built from the run's model
over the config.json the run started from) and the tokenizer's files: those of the checkpoint the run started
from (model.init_from), or the run's own BPE as tokenizer.json.

    python -m pcmoe_engine.export RUN_DIR --party I --out DIR [--step S] [--dtype D] [--timeout S]

is one party's process of a pooled export, the torchrun way (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in
the environment, as cli.launch sets them: rendezvous.py).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from . import rendezvous
from .config import ModelConfig
from .hf import save_hf_checkpoint
from .protocol import ExpertShard, Wire
from .runs import SavedParty, read_party

__all__ = ["DTYPES", "export_dtype", "pool_experts", "write", "main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
POOL_HINT = ("start every party's `pcmoe export RUN_DIR --party I --pool` at once (across hosts each with the same "
             "--rendezvous HOST:PORT, party 0's), or export without --pool: a partial checkpoint")


def export_dtype(saved: SavedParty, name: str | None = None) -> torch.dtype:
    """``name``, or the dtype of the checkpoint the run started from (its config.json), or float32."""
    if name:
        return DTYPES[name]
    config = json.loads(saved.hf_files.get("config.json", "{}"))
    return DTYPES.get(config.get("dtype") or config.get("torch_dtype"), torch.float32)


def _empty_shard(cfg: ModelConfig, party: int, parties: int, dtype: torch.dtype) -> ExpertShard:
    """Party ``party``'s shard in ``dtype`` on the CPU, allocated but not initialised."""
    with torch.device("meta"):
        shard = ExpertShard(cfg, party, parties)
    return shard.to(dtype).to_empty(device="cpu")


@torch.no_grad()
def pool_experts(cfg: ModelConfig, shard: ExpertShard, wire: Wire, dtype: torch.dtype) -> list[ExpertShard]:
    """Every party's shard, in party order: this party's own, and every other's as it sent it (in ``dtype``).
    One exchange per MoE layer: this party's experts' weights, one row per expert (gate_up then down, flattened),
    to every other party."""
    me, parties = wire.party, wire.parties
    shards = [shard if p == me else _empty_shard(cfg, p, parties, dtype) for p in range(parties)]
    counts = [0 if p == me else len(s.expert_ids) for p, s in enumerate(shards)]  # nothing to send to oneself
    local = len(shard.expert_ids)
    gate_up_size = 2 * cfg.expert_intermediate_size * cfg.hidden_size
    for layer in range(len(cfg.moe_layers)):
        rows = torch.cat([shard.w_gate_up[layer].flatten(1), shard.w_down[layer].flatten(1)], dim=1).to(dtype)
        send = rows.repeat(parties - 1, 1)
        send_splits = [0 if p == me else local for p in range(parties)]
        received = wire.exchange("expert_weights", layer, send, send_splits, counts).wait()
        for other, part in zip(shards, received.split(counts)):
            if other is not shard:
                gate_up, down = part.split([gate_up_size, part.shape[1] - gate_up_size], dim=1)
                other.w_gate_up[layer].copy_(gate_up.view(other.w_gate_up[layer].shape))
                other.w_down[layer].copy_(down.view(other.w_down[layer].shape))
    return shards


def write(saved: SavedParty, out, shards: list[ExpertShard], dtype: torch.dtype) -> Path:
    """Party ``saved``'s backbone with the experts of ``shards``, and its tokenizer's files, as a transformers
    folder in ``out`` (which must not hold a checkpoint yet)."""
    files = dict(saved.hf_files)
    base = json.loads(files.pop("config.json")) if "config.json" in files else None
    return save_hf_checkpoint(out, saved.backbone("cpu"), shards, base, dtype, extra_files=files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pcmoe_engine.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--party", type=int, required=True, help="the party whose model is written")
    parser.add_argument("--out", required=True)
    parser.add_argument("--step", type=int)
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    rank = int(os.environ["RANK"])
    joined = False
    try:
        saved = read_party(args.run_dir, rank, args.step)
        dtype = export_dtype(saved, args.dtype)
        shard = saved.shard("cpu")
        _, world = rendezvous.join("gloo", args.timeout, POOL_HINT)
        joined = True
        if world != saved.parties:
            raise ValueError(f"{world} processes joined, but the run has {saved.parties} parties: start one per party")
        wire = Wire(rank, world, dist.group.WORLD)
        try:
            shards = pool_experts(saved.model, shard, wire, dtype)
        except RuntimeError as e:  # gloo: a party left mid-way
            raise ValueError(f"a party left while the experts were pooled ({str(e).splitlines()[0]}): nothing "
                             f"written; {POOL_HINT}") from None
        if rank == args.party:
            out = write(saved, args.out, shards, dtype)
            print(f"party {rank}: wrote {out}: its backbone with all {saved.model.num_experts} experts (pooled with "
                  f"{world - 1} other part{'y' if world == 2 else 'ies'}, {wire.total_received / 2**20:,.1f} MiB "
                  f"received), step {saved.step}, {str(dtype).removeprefix('torch.')}", flush=True)
    except ValueError as e:
        sys.exit(f"pcmoe: error (party {rank}): {e}")
    finally:
        if joined:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
