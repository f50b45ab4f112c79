"""How the Wire's rows travel between parties: a Transport runs one all_to_all of uneven row blocks.

Every cross-party transfer of a run goes through ``protocol.Wire.exchange``, which calls
``transport.all_to_all_single(recv, send, recv_splits, send_splits, async_op)``: rows
``send[sum(send_splits[:p]):...]`` go to party p, and party p's rows land in ``recv`` in party order. The
Wire decides what may cross and counts it; the transport only carries bytes. Two transports:

- ``TorchTransport``: torch.distributed's process group (gloo on CPUs or GPUs shared between parties, NCCL
  with a GPU per party). The default. Its traffic is neither authenticated nor encrypted: for one machine, a
  cluster's private network, or a VPN between sites.
- ``tls.TLSMesh``: a full mesh of mutually authenticated TLS 1.3 connections (Python's ssl, i.e. OpenSSL), one
  per ordered pair of parties, for parties on separate sites (docs/multihost.md).

Both also offer ``barrier()`` (carries no data: the launcher waits for every party's files with it) and
``close()``. A transport that loses a peer raises ``PeerFailure`` naming the peer's rank.
"""

import concurrent.futures
import time
from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist

__all__ = ["PeerFailure", "Work", "Transport", "TorchTransport"]


class PeerFailure(RuntimeError):
    """Party ``rank`` is gone or unresponsive: ``reason`` says how (closed its connection, sent nothing for the
    peer timeout, sent what the protocol did not expect). ``timed_out`` marks a silent peer (hung, or unreachable);
    ``reported_by`` the party that saw it, when not this one; ``at`` when this party learnt of it (monotonic)."""

    def __init__(self, rank: int, reason: str, timed_out: bool = False, reported_by: int | None = None):
        seen = f" (reported by party {reported_by})" if reported_by is not None else ""
        super().__init__(f"party {rank} {reason}{seen}")
        self.rank, self.reason, self.timed_out, self.reported_by = rank, reason, timed_out, reported_by
        self.at = time.monotonic()

    def cause_first(self) -> tuple:
        """Sort key, root causes first: when one party hangs or dies, the others give up on it and close their
        connections too, so a silent peer comes before a closed one, a failure another party saw before a
        closed connection (which may only be that party giving up), then the earliest."""
        return not self.timed_out, self.reported_by is None, self.at


class Work:
    """A transfer under way, like torch.distributed's Work: ``wait()`` returns once every block has been sent and
    received (then runs ``finish``, e.g. the copy of rows staged in host memory to the GPU), or raises the root
    cause among the failures (``PeerFailure.cause_first``), after showing it to ``failed``."""

    def __init__(self, futures: list[concurrent.futures.Future], finish: Callable[[], None] | None = None,
                 failed: Callable[[BaseException], None] | None = None):
        self.futures, self.finish, self.failed = futures, finish, failed

    def wait(self) -> bool:
        concurrent.futures.wait(self.futures)  # each block ends within the peer timeout: sent, received or failed
        failures = [e for f in self.futures if (e := f.exception()) is not None]
        if failures:
            peers = [e for e in failures if isinstance(e, PeerFailure)]
            failure = min(peers, key=PeerFailure.cause_first) if peers else failures[0]
            if self.failed is not None:
                self.failed(failure)
            raise failure
        if self.finish is not None:
            self.finish, finish = None, self.finish
            finish()
        return True


class Transport(Protocol):
    def all_to_all_single(self, recv: torch.Tensor, send: torch.Tensor, recv_splits: list[int],
                          send_splits: list[int], async_op: bool = False) -> "Work | dist.Work | None": ...

    def barrier(self) -> None: ...

    def close(self) -> None: ...


class TorchTransport:
    """torch.distributed over ``group`` (None: the default process group, which must be up)."""

    def __init__(self, group: "dist.ProcessGroup | None" = None):
        self.group = group

    def all_to_all_single(self, recv, send, recv_splits, send_splits, async_op=False):
        return dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group, async_op=async_op)

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def close(self) -> None:
        dist.destroy_process_group(self.group)
