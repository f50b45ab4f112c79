"""One party's training process: ``torchrun --nproc-per-node N -m pcmoe_engine.train [--config f.toml]
[--set key=value ...]`` (or ``pcmoe train --parties N``, which launches these for you; or, one party per host,
``pcmoe party`` or ``torchrun --nnodes N``: docs/multihost.md).

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
from .tls import TLSMesh
from .transport import PeerFailure, TorchTransport, Transport

__all__ = ["main", "train", "open_transport"]


def train(cfg: Config, rank: int, transport: Transport | None = None, quiet: bool = False) -> dict:
    """Train as party ``rank`` of ``cfg.parties`` over ``transport`` (default: the process group, which is
    already up if there are several parties); ``quiet``: print nothing (`pcmoe train` shows the parties'
    progress from their metrics files). Returns its summary."""
    t = cfg.train
    party = Party(cfg, rank, transport)
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


def open_transport(cfg: Config, rank: int, timeout: timedelta) -> Transport:
    """Connect to the other parties: the TLS mesh with transport.kind=tls, else torch.distributed's process group
    (its rendezvous from MASTER_ADDR and MASTER_PORT, as the launchers and torchrun set them)."""
    if cfg.transport.kind == "tls":
        return TLSMesh.from_config(cfg, rank, timeout.total_seconds())
    dist.init_process_group(process_group_backend(cfg), rank=rank, world_size=cfg.parties, timeout=timeout)
    return TorchTransport()


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
    if rank == 0 and not args.quiet:
        say(start_line(cfg))
    transport = None
    try:
        if world > 1:
            transport = open_transport(cfg, rank, timedelta(minutes=10))
        train(cfg, rank, transport, args.quiet)
        if transport is not None:
            transport.barrier()  # carries no data: it only waits for every party's files
        if rank == 0:
            summary = merge_run(cfg)
            if not args.quiet:
                say(summary_text(summary, cfg.run_dir))
    except (ValueError, PeerFailure) as e:
        sys.exit(f"pcmoe: error (party {rank}): {e}")
    finally:
        if transport is not None:
            transport.close()


if __name__ == "__main__":
    main()
