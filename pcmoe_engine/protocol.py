"""The PC-MoE protocol: what each party holds, and the only tensors that cross between parties.

n parties train one MoE model. Party i keeps private its data, its Backbone (embeddings, attention, norms,
every MoE layer's router and shared expert, LM head) and its optimizer state, and holds an ExpertShard: in
every MoE layer, the routed experts e with e mod n == i. At each MoE layer (``DistributedExperts``):

1. party i routes its tokens with its own router and sorts its (token, expert) pairs by the expert's owner,
   then by the owner's local expert index;
2. the per-expert pair counts go to each owner ("splits"), then the pairs' hidden states ("hidden"), with
   uneven splits over all_to_all_single;
3. each owner runs its local experts on the rows received from all parties with one grouped GEMM;
4. the outputs return to their origin ("output"), which combines them with its top-k weights.

The origin computes its shared expert while its hidden states are in flight (the dispatch is asynchronous).
Owner-local expert ids never travel row by row: rows arrive sorted by local expert, so the counts suffice.

Backward retraces the route: output gradients go to the owners ("output_grad"), input gradients come back
("hidden_grad"). An owner's expert gradients thus sum the contributions of every party's tokens. Nothing else
crosses: no token ids, labels, positions, masks, routing weights, backbone parameters or their gradients.
Beside the model's traffic, two control kinds carry numbers about the run, never data (lockstep.py): the
"handshake" when the parties start (protocol version, per-option digests of the configuration, the checkpoint
steps each holds) and the "health" vote of every step (which values were non-finite, the last step saved).
Every transfer goes through ``Wire.exchange``, which counts its bytes, can log it to a ``WireLog`` and can show
what arrived to an observer (``Wire.observer``: e.g. an evaluation recording what a host receives).

Defences (``PrivacyConfig``, off by default): before "hidden" and "output_grad" rows leave for another party,
each row is clipped to an L2 norm and Gaussian noise is added (``clip_and_noise``). The receiver computes on
the noisy rows; the sender's backward passes their gradients straight through to the clean rows.

With one party the exchanges are local no-ops: centralized training through the same code.
"""

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

import csrc_triton as ct

from .config import ModelConfig, PrivacyConfig
from .nvtx import nvtx_range, stage
from .rng import seeded

__all__ = ["WIRE_KINDS", "CONTROL_KINDS", "owner_of", "owned_experts", "ExpertShard", "WireEntry", "WireLog", "Wire", "Observer",
           "Transfer", "DistributedExperts", "clip_and_noise"]

# What may cross between parties, and nothing else.
WIRE_KINDS = (
    "splits",  # per (origin, owner-local expert) pair counts: the all_to_all split sizes
    "hidden",  # dispatched hidden states, origin -> owner
    "output",  # expert outputs, owner -> origin
    "output_grad",  # gradients of the expert outputs, origin -> owner
    "hidden_grad",  # gradients of the dispatched hidden states, owner -> origin
    # Control rows, int64, the same to every party (Wire.share; lockstep.py):
    "handshake",  # at start: protocol version, per-option digests of the configuration, checkpoint steps held
    "health",  # every step: the step, which of loss / backbone / expert gradients are non-finite, last step saved
)
CONTROL_KINDS = ("handshake", "health")  # numbers about the run; the others carry the model's traffic


def owner_of(expert: int, parties: int) -> int:
    """Round-robin ownership: expert e lives with party e mod n."""
    return expert % parties


def owned_experts(party: int, parties: int, num_experts: int) -> list[int]:
    """The global ids of the experts a party owns, in the order of its local indices."""
    return [e for e in range(num_experts) if owner_of(e, parties) == party]


class ExpertShard(nn.Module):
    """A party's routed experts: in every MoE layer, the SwiGLU experts it owns, stacked for the grouped GEMM.

    ``w_gate_up[layer]`` is [local experts, 2I, H] (gate rows first) and ``w_down[layer]`` [local, H, I], for
    ``layer`` the position in ``cfg.moe_layers`` (every layer unless some are dense): the
    layout csrc_triton's grouped_mlp takes. Parameters stay fp32 (the optimizer's master copy); they are cast
    to the activations' dtype at use, so under bf16 autocast the GEMMs run in bf16.
    """

    def __init__(self, cfg: ModelConfig, party: int = 0, parties: int = 1):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.expert_ids = owned_experts(party, parties, cfg.num_experts)
        local, hidden, inter = len(self.expert_ids), cfg.hidden_size, cfg.expert_intermediate_size
        self.w_gate_up = nn.ParameterList(
            [nn.Parameter(torch.empty(local, 2 * inter, hidden)) for _ in cfg.moe_layers])
        self.w_down = nn.ParameterList(
            [nn.Parameter(torch.empty(local, hidden, inter)) for _ in cfg.moe_layers])

    @torch.no_grad()
    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """Each expert from its own generator, so expert e starts the same whatever the number of parties."""
        num_layers = len(self.w_down)
        for layer in range(num_layers):
            for local, expert in enumerate(self.expert_ids):
                gen = seeded(seed, "expert", layer, expert)
                w_gate_up, w_down = self.w_gate_up[layer][local], self.w_down[layer][local]
                w_gate_up.copy_(torch.randn(w_gate_up.shape, generator=gen) * std)
                w_down.copy_(torch.randn(w_down.shape, generator=gen) * (std / math.sqrt(2 * num_layers)))


@dataclass
class WireEntry:
    """One transfer between two parties, as the audit sees it."""
    kind: str
    layer: int
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    src: int
    dst: int


class WireLog:
    """Every transfer a party sends or receives (one entry per other party and direction, empty ones
    included); kept in memory, or written as JSON lines to ``path``."""

    def __init__(self, path=None):
        self.entries: list[WireEntry] = []
        self._file = open(path, "a", buffering=1) if path is not None else None

    def record(self, entry: WireEntry) -> None:
        if self._file is None:
            self.entries.append(entry)
        else:
            self._file.write(json.dumps(asdict(entry)) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def clip_and_noise(rows: torch.Tensor, clip: float, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Each row scaled to L2 norm <= clip, plus N(0, (noise * clip)^2) per coordinate (the Gaussian mechanism
    on rows of bounded norm), in the rows' dtype."""
    rows32 = rows.float()
    scale = (clip / rows32.norm(dim=-1, keepdim=True)).clamp(max=1.0)  # a zero row's inf clamps to 1
    noisy = rows32 * scale
    if noise > 0:
        noisy = noisy + torch.randn(rows.shape, generator=generator, device=rows.device) * (noise * clip)
    return noisy.to(rows.dtype)


# observer(kind, layer, received, recv_splits): the rows that arrived, from each party in party order.
Observer = Callable[[str, int, torch.Tensor, list[int]], None]


class Transfer(NamedTuple):
    """A tensor on its way in: ``wait()`` returns it once it has arrived (and shows it to ``arrived``)."""
    tensor: torch.Tensor
    work: "dist.Work | None"
    arrived: Callable[[torch.Tensor], None] | None = None

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        if self.arrived is not None:
            self.arrived(self.tensor)
        return self.tensor


class Wire:
    """A party's link to the others: the process group, its traffic counters, an optional WireLog, the
    defences on what it sends (``privacy``; ``seed`` draws this party's noise) and an optional ``observer``
    shown every tensor that arrives from the other parties, as it arrived."""

    def __init__(self, party: int = 0, parties: int = 1, group=None, log: WireLog | None = None,
                 privacy: PrivacyConfig | None = None, seed: int = 0, observer: Observer | None = None):
        self.party, self.parties, self.group, self.log, self.observer = party, parties, group, log, observer
        self.bytes_sent = dict.fromkeys(WIRE_KINDS, 0)
        self.bytes_received = dict.fromkeys(WIRE_KINDS, 0)
        privacy = privacy or PrivacyConfig()
        self.defences = {kind: (clip, noise) for kind, clip, noise in (
            ("hidden", privacy.hidden_clip, privacy.hidden_noise),
            ("output_grad", privacy.grad_clip, privacy.grad_noise)) if clip > 0}
        self._noise_seed = seeded(seed, "privacy", party).initial_seed()
        self._generators: dict[torch.device, torch.Generator] = {}

    def _defend(self, kind: str, send: torch.Tensor, send_splits: list[int]) -> torch.Tensor:
        """The rows bound for other parties, clipped and noised; the party's own rows as they are."""
        clip, noise = self.defences[kind]
        if send.device not in self._generators:
            self._generators[send.device] = torch.Generator(send.device).manual_seed(self._noise_seed)
        start = sum(send_splits[:self.party])
        away = torch.ones(send.shape[0], dtype=torch.bool, device=send.device)
        away[start:start + send_splits[self.party]] = False
        defended = send.clone()
        defended[away] = clip_and_noise(send[away], clip, noise, self._generators[send.device])
        return defended

    def exchange(self, kind: str, layer: int, send: torch.Tensor, send_splits: list[int],
                 recv_splits: list[int], async_op: bool = False) -> Transfer:
        """THE crossing point: rows ``send[sum(send_splits[:p]):...]`` go to party p, rows from each party
        arrive in party order. Rows a party keeps for itself are copied locally and count as no traffic."""
        if kind not in WIRE_KINDS:
            raise ValueError(f"{kind!r} may not cross between parties; allowed: {', '.join(WIRE_KINDS)}")
        row_shape = tuple(send.shape[1:])
        row_bytes = math.prod(row_shape) * send.element_size()
        for other in range(self.parties):
            if other == self.party:
                continue
            self.bytes_sent[kind] += send_splits[other] * row_bytes
            self.bytes_received[kind] += recv_splits[other] * row_bytes
            if self.log is not None:
                dtype = str(send.dtype).removeprefix("torch.")
                self.log.record(WireEntry(kind, layer, (send_splits[other], *row_shape), dtype,
                                          send_splits[other] * row_bytes, self.party, other))
                self.log.record(WireEntry(kind, layer, (recv_splits[other], *row_shape), dtype,
                                          recv_splits[other] * row_bytes, other, self.party))
        if self.parties == 1:
            return Transfer(send, None)
        if kind in self.defences:
            send = self._defend(kind, send, send_splits)
        send = send.contiguous()
        recv = send.new_empty((sum(recv_splits), *row_shape))
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group, async_op=async_op)
        observer = self.observer
        arrived = (lambda rows: observer(kind, layer, rows, recv_splits)) if observer is not None else None
        return Transfer(recv, work, arrived)

    def share(self, kind: str, row: torch.Tensor, lengths: list[int] | None = None) -> list[torch.Tensor]:
        """Send the same 1-D control ``row`` to every party; returns every party's row, in party order.
        ``lengths``: each party's row length, when they differ (default: all as long as this one's)."""
        n = row.numel()
        received = self.exchange(kind, -1, row.repeat(self.parties), [n] * self.parties,
                                 lengths or [n] * self.parties).wait()
        return list(received.split(lengths or [n] * self.parties))

    @property
    def total_sent(self) -> int:
        return sum(self.bytes_sent.values())

    @property
    def total_received(self) -> int:
        return sum(self.bytes_received.values())


class _AllToAll(torch.autograd.Function):
    """Rows in flight between parties; backward sends their gradients back along the reverse route.

    Forward only waits: the caller launched the transfer, so it can compute while the rows travel. The
    splits given are the backward's (each received row's gradient returns to where the row came from).
    """

    @staticmethod
    def forward(ctx, send, transfer: Transfer, wire: Wire, grad_kind: str, layer: int, grad_send_splits,
                grad_recv_splits):
        ctx.backward_route = wire, grad_kind, layer, grad_send_splits, grad_recv_splits
        return transfer.wait()

    @staticmethod
    def backward(ctx, grad):
        wire, grad_kind, layer, grad_send_splits, grad_recv_splits = ctx.backward_route
        grad_send = wire.exchange(grad_kind, layer, grad, grad_send_splits, grad_recv_splits).wait()
        return grad_send, None, None, None, None, None, None


class _Route(NamedTuple):
    send_splits: list[int]  # rows to each party
    recv_splits: list[int]  # rows from each party
    local_expert: torch.Tensor  # [received rows]: the owner-local expert of each received row


class DistributedExperts:
    """The routed experts of one MoE model spread over the parties, as party ``wire.party`` reaches them.

    ``experts(layer, x, weights, expert_ids, concurrent)`` returns (sum_j weights[t,j] * MLP_{expert_ids[t,j]}(x[t]),
    concurrent()): ``concurrent`` (the shared expert) computes while the hidden states are in flight.
    """

    def __init__(self, shard: ExpertShard, wire: Wire):
        self.shard, self.wire = shard, wire
        parties = wire.parties
        self.local_counts = [len(owned_experts(p, parties, shard.num_experts)) for p in range(parties)]
        # Position of each global expert in the wire order: grouped by owner, then by owner-local index.
        order = [e for p in range(parties) for e in owned_experts(p, parties, shard.num_experts)]
        position = torch.empty(len(order), dtype=torch.int64)
        position[order] = torch.arange(len(order))
        self.wire_position = position.to(shard.w_down[0].device)

    def plan(self, expert_ids: torch.Tensor) -> ct.RoutingPlan:
        """The wire order of this party's (token, expert) pairs: grouped by the expert's owner, then by the
        owner-local expert, tokens in order within an expert. The rows for party p are the slots
        ``plan.offsets[sum(local_counts[:p])]`` up to ``plan.offsets[sum(local_counts[:p + 1])]``."""
        return ct.plan_routing(self.wire_position[expert_ids.long()], self.shard.num_experts, validate=False)

    def _route(self, layer: int, pairs_per_expert: torch.Tensor) -> _Route:
        """Exchange the split sizes: per owner-local expert counts, so each owner knows what it will receive."""
        wire, mine = self.wire, self.local_counts[self.wire.party]
        send_counts = pairs_per_expert.to(torch.int64)
        recv_counts = wire.exchange("splits", layer, send_counts, self.local_counts, [mine] * wire.parties).wait()
        counts = torch.cat([send_counts, recv_counts]).tolist()  # one host sync for both
        sent, received = counts[:len(send_counts)], counts[len(send_counts):]
        starts = [0, *itertools.accumulate(self.local_counts)]
        send_splits = [sum(sent[starts[p]:starts[p + 1]]) for p in range(wire.parties)]
        recv_splits = [sum(received[p * mine:(p + 1) * mine]) for p in range(wire.parties)]
        local_expert = torch.arange(mine, device=recv_counts.device).repeat(wire.parties)
        return _Route(send_splits, recv_splits, local_expert.repeat_interleave(recv_counts))

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                 concurrent: Callable[[], torch.Tensor] | None = None):
        wire, shard = self.wire, self.shard
        with stage("permute") as s:
            plan = self.plan(expert_ids)
            x_sorted = s.output(ct.permute(s.input(x), plan))
        with nvtx_range("dispatch"):
            route = self._route(layer, plan.tokens_per_expert)
            transfer = wire.exchange("hidden", layer, x_sorted.detach(), route.send_splits, route.recv_splits,
                                     async_op=True)
        side = concurrent() if concurrent is not None else None
        with stage("dispatch") as s:
            received = s.output(_AllToAll.apply(s.input(x_sorted), transfer, wire, "hidden_grad", layer,
                                                route.recv_splits, route.send_splits))
        with stage("experts") as s:
            rows = s.input(received)
            if rows.shape[0]:
                y = ct.grouped_mlp(rows, route.local_expert, shard.w_gate_up[layer].to(rows.dtype),
                                   shard.w_down[layer].to(rows.dtype))
            else:  # nothing to run, but the empty output must stay on the graph: its backward exchanges too
                y = rows * 0
            y = s.output(y)
        with stage("combine") as s:
            y = s.input(y)
            transfer = wire.exchange("output", layer, y.detach(), route.recv_splits, route.send_splits)
            y_sorted = _AllToAll.apply(y, transfer, wire, "output_grad", layer, route.send_splits,
                                       route.recv_splits)
            out = s.output(ct.unpermute(y_sorted, plan, weights))
        return out, side
