"""One party's training process: ``torchrun --nproc-per-node N -m pcmoe_engine.train [--config f.toml]
[--set key=value ...]`` (or ``pcmoe train --parties N``, which launches these for you).

The parties step in lockstep, each on its own batch. Each one's optimizer updates only its own backbone and
expert shard; the only traffic is the protocol's (see protocol.py). ``train`` is the loop: a ``Party``
(party.py) steps, and the loop decides when to log, evaluate and checkpoint. Writes, under the run directory:
party<i>/metrics.jsonl, party<i>/summary.json, party<i>/checkpoints/; party 0 merges the parties' files into
metrics.jsonl and summary.json at the end (metrics.py).
"""

import argparse
import os
import sys
from datetime import timedelta

import torch.distributed as dist

from .config import Config, add_config_arguments, load_config
from .metrics import MetricsLog, merge_run, say, start_line, summary_text, write_summary
from .party import Party, process_group_backend

__all__ = ["main", "train"]


def train(cfg: Config, rank: int, quiet: bool = False) -> dict:
    """Train as party ``rank`` of ``cfg.parties`` (the process group, if any, is already up); ``quiet``: print
    nothing (`pcmoe train` shows the parties' progress from their metrics files). Returns its summary."""
    t = cfg.train
    party = Party(cfg, rank)
    if t.resume and (checkpoint := party.resume()) is not None and not quiet:
        say(f"party {rank} | resumed from {checkpoint} at step {party.step_count}")
    log = MetricsLog(party, quiet)
    while party.step_count < t.steps:
        record = party.step()
        step = record["step"]
        log.write(record)
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
            log.write({"step": step, "eval_loss": party.evaluate()})
        if t.checkpoints and ((t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps):
            party.save()
    eval_loss = party.evaluate()
    log.write({"step": party.step_count, "eval_loss": eval_loss})
    summary = party.summary(eval_loss)
    write_summary(party.dir / "summary.json", summary)
    log.close()
    party.close()
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pcmoe_engine.train", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors (pcmoe train's parties)")
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = load_config(args.config, args.overrides, parties=world if "WORLD_SIZE" in os.environ else None,
                          preset=args.preset)
    except ValueError as e:
        sys.exit(f"pcmoe: error: {e}")
    if cfg.parties != world:
        sys.exit(f"pcmoe: error: parties={cfg.parties} needs one process per party: run `pcmoe train --parties "
                 f"{cfg.parties}` or `torchrun --nproc-per-node {cfg.parties} -m pcmoe_engine.train`")
    if world > 1:
        dist.init_process_group(process_group_backend(cfg), rank=rank, world_size=world, timeout=timedelta(minutes=10))
    if rank == 0 and not args.quiet:
        say(start_line(cfg))
    try:
        train(cfg, rank, args.quiet)
        if world > 1:
            dist.barrier()  # carries no data: it only waits for every party's files
        if rank == 0:
            summary = merge_run(cfg)
            if not args.quiet:
                say(summary_text(summary, cfg.run_dir))
    except ValueError as e:
        sys.exit(f"pcmoe: error (party {rank}): {e}")
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
