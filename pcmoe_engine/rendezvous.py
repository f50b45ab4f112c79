"""How the parties' processes find each other: the torchrun way, from RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in the environment, party 0 listening at MASTER_ADDR:MASTER_PORT. ``pcmoe``'s launcher (cli.launch)
sets them for the parties of one machine (a free port on 127.0.0.1), or for one party of a run spread over
hosts (``--rendezvous HOST:PORT``, the same address given to every party; config.parse_address reads it). A
party that does not come within the timeout is one line saying so, not a hang or a c10d traceback.
"""

import os
from datetime import timedelta

import torch.distributed as dist

__all__ = ["join"]


def join(backend: str, timeout_s: float, hint: str) -> tuple[int, int]:
    """Join the parties' process group (also the timeout of its collectives); returns (rank, world size).
    ``hint`` says what to do when a party is missing."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    except dist.DistError as e:
        raise ValueError(f"not all {world} parties joined at {address} within {timeout_s:g} s "
                         f"({str(e).splitlines()[0].rstrip('.')}): {hint}") from None
    return rank, world
