"""What the parties agree on through the wire, beside the model's traffic: the handshake when they start or
resume, and the health vote of every step. Both are int64 rows of numbers about the run, never data
(``Wire.share``, kinds "handshake" and "health"):

- ``handshake``: the protocol version, a digest of the option names, whether the party resumes, then one
  64-bit digest per option of the run (``PER_PARTY`` options excepted) and the steps of the intact
  checkpoints it holds. A mismatch stops every party with the same line, naming the first party that differs
  from party 0 and the option: no value crosses, so paths stay private and a party can still say what
  differs. Resuming, the parties continue from the latest step every one of them holds intact.
- ``health``, after every step's backward: the step, which of the party's loss, backbone gradients and
  expert gradients are non-finite, and the last step it checkpointed. Every party sees every vote, so all
  skip an optimizer step together (or stop together), and a checkpoint counts as saved (committed) once every
  party reports it.
"""

import hashlib
import json
from typing import NamedTuple

import torch

from .config import Config
from .protocol import Wire

__all__ = ["PROTOCOL_VERSION", "RESUMABLE", "PER_PARTY", "NONFINITE", "options", "first_difference",
           "handshake", "Votes", "vote"]

# Raise it whenever what crosses between parties changes meaning: parties of different versions refuse each other.
PROTOCOL_VERSION = 1

# Options that may change when a run resumes: where it is written and read from (the starting checkpoint's folder
# included: the weights now come from the run's checkpoints), how the parties reach each other, what it logs,
# evaluates and checkpoints, how long a party waits for the others, whether blocks are recomputed in backward,
# which AdamW kernel runs and where a process is pinned. Every other option is the run itself: a checkpoint is
# refused for another value.
RESUMABLE = frozenset({"train.resume", "train.overwrite", "train.out_dir", "train.name", "train.device",
                       "train.log_every", "train.wire_log", "train.tensorboard", "train.eval_every",
                       "train.eval_batches", "train.checkpoints", "train.checkpoint_every", "train.keep_checkpoints",
                       "train.peer_timeout_s", "train.activation_checkpointing", "train.fused_optimizer",
                       "train.pin_cpus", "data.cache_dir", "model.init_from", "transport.kind", "transport.peers",
                       "transport.tls_cert", "transport.tls_key", "transport.tls_ca"})
# Options each party sets for itself, never compared: its paths (the data's and the starting checkpoint's are
# private; the model read from it is compared through model.*), device, logging, process placement and timeout.
# Its precision is compared as the dtype it resolves to (its rows cross in it).
PER_PARTY = frozenset({"train.overwrite", "train.out_dir", "train.name", "train.device", "train.precision",
                       "train.log_every", "train.wire_log", "train.tensorboard", "train.keep_checkpoints",
                       "train.peer_timeout_s", "train.pin_cpus", "data.cache_dir", "data.corpus", "data.party_paths",
                       "data.tokenizer_corpus", "data.tokenizer", "model.init_from", "transport.tls_cert",
                       "transport.tls_key", "transport.tls_ca"})

NONFINITE = ("loss", "backbone gradients", "expert gradients")  # the health vote's flags, bit i for NONFINITE[i]


def options(config: dict) -> dict:
    """``Config.to_dict()`` flattened: {"parties": n, "model.hidden_size": ..., ...}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            flat[key] = value
    return flat


def first_difference(saved: dict, cfg: Config) -> str | None:
    """The first option of the run (``RESUMABLE`` aside) whose value in the configuration ``saved`` (a
    ``to_dict()``) differs from ``cfg``'s, as "name=saved value, this run has ..."; None if they agree."""
    ours, theirs = options(cfg.to_dict()), options(saved)
    for name in sorted(ours.keys() | theirs.keys()):
        if name not in RESUMABLE and ours.get(name) != theirs.get(name):
            return f"{name}={theirs.get(name)!r}, this run has {ours.get(name)!r}"
    return None


def _digest(value) -> int:
    text = json.dumps(value, sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def _int64(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def handshake(wire: Wire, cfg: Config, precision: str, held: list[int] | None, device) -> int | None:
    """Check that every party runs the same protocol version and run (ValueError naming the first party that
    differs from party 0, and what differs). ``held``: the steps of the intact checkpoints this party holds
    when it resumes, None when it starts afresh. Returns the step to continue from: the latest step every party
    holds, None if there is none (or on a fresh start)."""
    run = {name: value for name, value in options(cfg.to_dict()).items() if name not in PER_PARTY}
    run["precision"] = precision
    names = sorted(run)
    resume = held is not None
    held = held or []
    header = _int64([PROTOCOL_VERSION, _digest(names), int(resume), len(held)], device)
    headers = [h.tolist() for h in wire.share("handshake", header)]
    for party, (version, names_digest, resumes, _) in enumerate(headers):
        if version != headers[0][0]:
            raise ValueError(f"party {party} speaks protocol version {version}, party 0 version {headers[0][0]}: "
                             "run the same pcmoe version at every party")
        if names_digest != headers[0][1]:
            raise ValueError(f"party {party}'s pcmoe has other options than party 0's: run the same pcmoe version "
                             "at every party")
        if resumes != headers[0][2]:
            raise ValueError(f"party {party} has train.resume={bool(resumes)}, party 0 {bool(headers[0][2])}: "
                             "resume every party or none")
    rows = wire.share("handshake", _int64([_digest(run[name]) for name in names] + held, device),
                      [len(names) + h[3] for h in headers])
    rows = [row.tolist() for row in rows]
    for party, row in enumerate(rows):
        differ = [name for name, mine, first in zip(names, row, rows[0]) if mine != first]
        if differ:
            raise ValueError(f"party {party}'s {differ[0]} differs from party 0's"
                             f"{f' (and {len(differ) - 1} more)' if len(differ) > 1 else ''}: every party must "
                             "run the same configuration (only paths, devices, logging and timeouts may differ)")
    common = set.intersection(*(set(row[len(names):]) for row in rows))
    return max(common, default=None)


class Votes(NamedTuple):
    nonfinite: dict[int, list[str]]  # party -> what was non-finite there (NONFINITE names); empty: all finite
    saved: list[int]  # each party's last checkpointed step


def vote(wire: Wire, step: int, nonfinite: list[bool], saved: int, device) -> Votes:
    """This step's health vote: every party's flags and last saved step, the same at every party."""
    bits = sum(1 << i for i, flag in enumerate(nonfinite) if flag)
    rows = [row.tolist() for row in wire.share("health", _int64([step, bits, saved], device))]
    for party, (their_step, _, _) in enumerate(rows):
        if their_step != step:
            raise ValueError(f"party {party} is at step {their_step}, this party at step {step}: the parties are "
                             "out of lockstep")
    flagged = {party: [name for i, name in enumerate(NONFINITE) if bits >> i & 1]
               for party, (_, bits, _) in enumerate(rows) if bits}
    return Votes(flagged, [row[2] for row in rows])
