"""Random numbers by purpose: every random draw of a run (a party's backbone init, an expert's init, the data
split and order, a party's wire noise) comes from its own generator, keyed by what it is for, so one purpose
never shifts another's numbers and every process derives the same generator from the same keys.
"""

import hashlib

import torch

__all__ = ["seeded"]


def seeded(*keys: int | str) -> torch.Generator:
    """A generator for one purpose of one run, e.g. seeded(seed, "expert", layer, expert): the same in every
    process (a stable digest, unlike hash() of a str) and independent of everything else drawn."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
