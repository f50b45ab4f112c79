"""The PC-MoE protocol: what each party holds, and how one MoE layer's routed experts are reached across parties.

n parties train one MoE model. Party i keeps private its data, its Backbone (embeddings, attention, norms,
every MoE layer's router and shared expert, LM head) and its optimizer state, and holds an ExpertShard: in
every MoE layer, the routed experts e with e mod n == i. At each MoE layer (``DistributedExperts``):

1. party i routes its tokens with its own router and orders its (token, expert) pairs by owner, token and the
   owner's local expert (dispatch.py: the wire order both sides compute);
2. "splits": each owner learns how many rows and pairs it will get (the only device->host sync of the layer);
3. "hidden": a token's hidden state crosses to a host once however many of the host's experts it picked
   (``wire.dispatch=token``; or once per pair, ``pair``), with an "expert_mask" row saying which;
4. each host runs its local experts on the rows of every party with one grouped GEMM per source: its own
   rows (which never cross) while the others' are in flight, then theirs;
5. "output": one row per pair back to the origin, which combines them with its top-k weights; or, with
   ``wire.combine=host``, the origin sends the host its "routing_weights" and gets one combined row per
   (token, host).

Backward retraces the route: "output_grad" to the hosts, whose expert gradients thus gather every party's
contributions, "hidden_grad" back, one row per dispatched row (the host sums a row's per-expert gradients
first); with combine at host also "routing_weights_grad". The hidden_grad exchange is launched and left in
flight while autograd runs the host's own rows and the shared expert; its wait sits on the origin's rows
(``_AwaitGrad``). Nothing else crosses: no token ids, labels, positions, masks, backbone parameters or their
gradients. Every transfer goes through ``Wire.exchange`` (wire.py: the kinds, counters, log, defences, fp8
packing, the observer, and the tape that replays a checkpointed block's forward in its recompute).

The expert gradient's scale. Each party's loss is the mean over its own tokens, so the sum of the parties'
gradients of an expert is n times the gradient of the mean loss over all their tokens. The host scales its shard's
gradient by 1 / n (``_ScaleGrad``, on the host's side of the weights: nothing that crosses changes), so an expert's
gradient is that of the mean over every party's tokens: n parties with batches of B sequences give each expert the
gradient a centralized run gives it on one batch of the n x B sequences (tests/test_engine_parity.py). AdamW is
nearly blind to a constant scale, but gradient clipping is not: the backbone and the shard are clipped separately
(optim.py, train.grad_clip), so a bound means the same at every n.

Beside the model's traffic, two control kinds carry numbers about the run, never data (lockstep.py): the
"handshake" when the parties start (protocol version, per-option digests of the configuration, the checkpoint
steps each holds) and the "health" vote of every step (which values were non-finite, the last step saved).

With one party nothing crosses: centralized training through the same code.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

import csrc_triton as ct

from .config import ModelConfig, WireConfig
from .dispatch import (dispatch_rows, expand, first_copy, gather, owners, plan_pairs, rows_per_owner, scatter_add,
                       shuffle)
from .nvtx import stage
from .rng import seeded
from .wire import (CONTROL_KINDS, EXPORT_KINDS, TRAINING_KINDS, WIRE_KINDS, ExchangeTimer, Observer, Tape, Transfer,
                   Wire, WireEntry, WireLog, clip_and_noise, pack_fp8, unpack_fp8)

__all__ = ["WIRE_KINDS", "TRAINING_KINDS", "CONTROL_KINDS", "EXPORT_KINDS", "owner_of", "owned_experts", "ExpertShard",
           "WireEntry", "WireLog", "Wire", "Observer", "Transfer", "Tape", "ExchangeTimer", "DistributedExperts",
           "kinds_sent", "clip_and_noise", "pack_fp8", "unpack_fp8"]


def owner_of(expert: int, parties: int) -> int:
    """Round-robin ownership: expert e lives with party e mod n (as its local expert e // n)."""
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


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward scales the gradient (a host's expert weights: by 1 / parties)."""

    @staticmethod
    def forward(ctx, weights, scale: float):
        ctx.scale = scale
        return weights.view_as(weights)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class _Arrive(torch.autograd.Function):
    """Rows in flight between parties: forward waits for them (the caller launched the transfer, so it could
    compute meanwhile); backward sends their gradients back along the reverse route (the splits given are the
    backward's). With a ``pending`` list, backward only launches that exchange and leaves it there for the
    sender's ``_AwaitGrad``, so that what autograd runs in between overlaps it."""

    @staticmethod
    def forward(ctx, send, transfer: Transfer, wire: Wire, grad_kind: str, layer: int, grad_send_splits,
                grad_recv_splits, pending: list | None, copies: Callable | None = None):
        ctx.backward_route = wire, grad_kind, layer, grad_send_splits, grad_recv_splits, pending, copies
        ctx.send_shape = send.shape
        return transfer.wait()

    @staticmethod
    def backward(ctx, grad):
        wire, grad_kind, layer, grad_send_splits, grad_recv_splits, pending, copies = ctx.backward_route
        transfer = wire.exchange(grad_kind, layer, grad.contiguous(), grad_send_splits, grad_recv_splits,
                                 async_op=pending is not None, copies=copies() if copies is not None else None)
        nothing = (None,) * 8
        if pending is None:
            return transfer.wait(), *nothing
        pending.append(transfer)
        placeholder = grad.new_zeros(()).expand(ctx.send_shape)  # _AwaitGrad returns the real gradient
        return placeholder, *nothing


class _AwaitGrad(torch.autograd.Function):
    """Identity on rows about to be sent; backward waits for their gradient, launched by ``_Arrive``."""

    @staticmethod
    def forward(ctx, rows, pending: list):
        ctx.pending = pending
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad):
        return ctx.pending.pop().wait(), None


class _Route(NamedTuple):
    """One layer's sizes per party, in party order: what this party sends each owner as an origin, and what
    it receives from each origin as a host (rows and pairs)."""
    rows_to: list[int]
    pairs_to: list[int]
    rows_from: list[int]
    pairs_from: list[int]


def kinds_sent(options: WireConfig) -> set[str]:
    """The kinds a training run with these wire options sends (evaluation sends the forward ones only), the
    control rows of lockstep.py included."""
    kinds = {*CONTROL_KINDS, "splits", "expert_mask", "output", "hidden_grad",
             "hidden_fp8" if options.hidden_dtype == "fp8" else "hidden",
             "output_grad_fp8" if options.grad_dtype == "fp8" else "output_grad"}
    return kinds | ({"routing_weights", "routing_weights_grad"} if options.combine == "host" else set())


def _away(splits: list[int], party: int) -> list[int]:
    """The splits with the party's own share removed: its own rows never go through the wire."""
    return [0 if p == party else s for p, s in enumerate(splits)]


class DistributedExperts:
    """The routed experts of one MoE model spread over the parties, as party ``wire.party`` reaches them, with
    the wire options of ``options`` (config.WireConfig).

    ``experts(layer, x, weights, expert_ids, concurrent)`` returns (sum_j weights[t,j] * MLP_{expert_ids[t,j]}(x[t]),
    concurrent()): ``concurrent`` (the shared expert) computes while the hidden states are in flight.
    """

    def __init__(self, shard: ExpertShard, wire: Wire, options: WireConfig | None = None):
        options = options or WireConfig()
        self.shard, self.wire = shard, wire
        self.once = options.dispatch == "token"
        self.combine_at_host = options.combine == "host"
        self.hidden_kind = "hidden_fp8" if options.hidden_dtype == "fp8" else "hidden"
        self.grad_kind = "output_grad_fp8" if options.grad_dtype == "fp8" else "output_grad"
        self.local_counts = [len(owned_experts(p, wire.parties, shard.num_experts)) for p in range(wire.parties)]
        # plan_observer(layer, plan, rows): the wire order of each layer's pairs and rows as sent (shuffled or
        # not); for an evaluation that pairs what a host received with the tokens it was (bench/privacy)
        self.plan_observer: Callable | None = None
        # The public checkpoint's routed experts (per MoE layer, [E, 2I, H] and [E, H, I], frozen) when the parties
        # start from it and privacy.public_correction is on: the origin then adds f0(x) - f0(sent row) to what a
        # host returns for each pair, f0 the public expert, so that the noise on the rows it sent cancels to
        # first order in how far the host's expert has moved from f0 (_public_correction).
        self.public_experts: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def plan(self, expert_ids: torch.Tensor) -> ct.RoutingPlan:
        """The wire order of this party's (token, expert) pairs: by owner, token, owner-local expert. The pairs
        for party p are the slots ``plan.offsets[p]`` up to ``plan.offsets[p + 1]``; outputs return per pair in
        this order (dispatch.py)."""
        return plan_pairs(expert_ids, self.wire.parties, self.shard.num_experts)

    def recomputable(self, block: Callable) -> Callable:
        """``block`` for torch.utils.checkpoint: the first call records what its exchanges received on a tape,
        the recompute replays it, so nothing crosses twice and the recompute is local work only."""
        tape, wire = Tape(), self.wire

        def run(*args):
            outer, wire.tape = wire.tape, tape
            try:
                return block(*args)
            finally:
                wire.tape = outer
                tape.replaying = True  # every later call is the recompute

        return run

    def _route(self, layer: int, expert_ids: torch.Tensor, plan: ct.RoutingPlan) -> _Route:
        """Tell each owner how many rows and pairs it will get: one host sync for both directions."""
        wire, n = self.wire, self.wire.parties
        if n == 1:  # every token goes to this party's experts: the sizes are the routing's shape
            pairs = expert_ids.numel()
            rows = expert_ids.shape[0] if self.once else pairs
            return _Route([rows], [pairs], [rows], [pairs])
        rows = rows_per_owner(expert_ids, n, self.once)
        send = torch.stack([rows, plan.tokens_per_expert.long()], dim=1).flatten()
        recv = wire.exchange("splits", layer, send, [2] * n, [2] * n).wait()
        both = torch.cat([send, recv])
        counts = both.tolist() if wire.timer is None else wire.timer.host_sync(both.tolist)
        return _Route(counts[0:2 * n:2], counts[1:2 * n:2], counts[2 * n::2], counts[2 * n + 1::2])

    def _host(self, layer: int, rows: torch.Tensor, mask: torch.Tensor, pairs: int, weights: torch.Tensor | None,
              w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        """A host's local experts on received rows: one output per pair (row by row, local experts ascending),
        or per row, its pairs' outputs combined with the origin's ``weights``."""
        local = self.local_counts[self.wire.party]
        pair_row, pair_expert = expand(mask, local, pairs)
        expanded = gather(rows, pair_row) if self.once else rows  # dispatched per pair: already one per pair
        if not pairs:  # nothing to run, but the empty output must stay on the graph: its backward exchanges too
            y = expanded * 0
        else:
            y = ct.grouped_mlp(expanded, pair_expert, w_gate_up, w_down, validate=False)  # < local by construction
        return scatter_add(y, pair_row, rows.shape[0], weights) if self.combine_at_host else y

    def _public_correction(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, pair: torch.Tensor,
                           row_token: torch.Tensor, row_owner: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
        """f0(x[token]) - f0(sent row) for each pair sent away (``pair``: indices into expert_ids, in the order
        the outputs return), f0 the public expert: what the host returns, f(sent row), plus this is f(x[token])
        up to (f - f0)(sent row) - (f - f0)(x[token]). Its gradient reaches x through both terms (the sent row
        as x plus a constant, as the host's returned gradient does)."""
        tokens, k = expert_ids.shape
        expert = expert_ids.reshape(-1)[pair].long()
        token = pair // k
        row_of = torch.empty(self.wire.parties * tokens, dtype=torch.long, device=x.device)
        row_of[row_owner * tokens + row_token] = torch.arange(row_token.numel(), device=x.device)
        clean = gather(x, token)
        noisy = clean + (gather(sent, row_of[expert % self.wire.parties * tokens + token]).to(x.dtype)
                         - clean).detach()
        w_gate_up, w_down = (w[layer].to(x.dtype) for w in self.public_experts)
        both = ct.grouped_mlp(torch.cat([clean, noisy]), expert.repeat(2), w_gate_up, w_down, validate=False)
        return both[:expert.numel()] - both[expert.numel():]

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                 concurrent: Callable[[], torch.Tensor] | None = None):
        wire, shard, me, n = self.wire, self.shard, self.wire.party, self.wire.parties
        with stage("permute") as s:
            x = s.input(x)
            plan = self.plan(expert_ids)
            route = wire.kept(lambda: self._route(layer, expert_ids, plan))
            rows = dispatch_rows(expert_ids, plan, n, shard.num_experts, self.once, sum(route.rows_to))
            if wire.shuffle:  # a fresh secret order, the same in a checkpointed block's recompute
                plan, rows = wire.kept(lambda: shuffle(plan, rows, wire.permutation(owners(route.rows_to, x.device))))
            if self.plan_observer is not None:
                self.plan_observer(layer, plan, rows)
            row_start, pair_start = sum(route.rows_to[:me]), sum(route.pairs_to[:me])
            own = slice(row_start, row_start + route.rows_to[me])
            own_pairs = slice(pair_start, pair_start + route.pairs_to[me])
            pair_weights = weights.reshape(-1)[plan.sorted_pair.long()] if self.combine_at_host else None
            x_own = s.output(gather(x, rows.token[own]))  # the rows for this party's own experts never cross
            if n > 1:
                away_token = torch.cat([rows.token[:own.start], rows.token[own.stop:]])
                x_away = s.output(gather(x, away_token))
        with stage("dispatch") as s:
            x_own = s.output(s.input(x_own))  # straight to this party's experts (a mark: the range of the stage)
            if n > 1:
                away_mask = torch.cat([rows.mask[:own.start], rows.mask[own.stop:]])
                rows_to, rows_from = _away(route.rows_to, me), _away(route.rows_from, me)
                pairs_to, pairs_from = _away(route.pairs_to, me), _away(route.pairs_from, me)
                pending = []  # the hidden_grad exchange, from _Arrive's backward to _AwaitGrad's
                x_away = _AwaitGrad.apply(x_away, pending)

                def copies(token, counts):  # the noise groups of rows bound for the owners: one per (token, owner)
                    return first_copy(owners(counts, x.device), token, x.shape[0], n)

                hidden_copies = None if self.once or not wire.defends(self.hidden_kind) else copies(away_token, rows_to)
                hidden = wire.exchange(self.hidden_kind, layer, x_away.detach(), rows_to, rows_from, async_op=True,
                                       copies=hidden_copies, keep_sent=self.public_experts is not None)
                masks = wire.exchange("expert_mask", layer, away_mask, rows_to, rows_from, async_op=True)
                if self.combine_at_host:
                    w_away = torch.cat([pair_weights[:own_pairs.start], pair_weights[own_pairs.stop:]]).float()
                    w_sent = wire.exchange("routing_weights", layer, w_away.detach(), pairs_to, pairs_from,
                                           async_op=True)
        side = concurrent() if concurrent is not None else None
        with stage("experts") as s:
            # An expert's gradient is the mean over every party's tokens (the module docstring): 1 / n of the sum.
            w_gate_up, w_down = ((w if n == 1 else _ScaleGrad.apply(w, 1 / n)).to(x.dtype)
                                 for w in (shard.w_gate_up[layer], shard.w_down[layer]))
            own_weights = pair_weights[own_pairs] if self.combine_at_host else None
            y_own = s.output(self._host(layer, s.input(x_own), rows.mask[own], route.pairs_to[me], own_weights,
                                        w_gate_up, w_down))
        if n == 1:
            y_all = y_own
        else:
            with stage("dispatch") as s:
                received = s.output(_Arrive.apply(s.input(x_away), hidden, wire, "hidden_grad", layer, rows_from,
                                                  rows_to, pending))
                w_received = None
                if self.combine_at_host:
                    w_received = _Arrive.apply(w_away, w_sent, wire, "routing_weights_grad", layer, pairs_from,
                                               pairs_to, None)
            with stage("experts") as s:
                y = s.output(self._host(layer, s.input(received), masks.wait(), sum(pairs_from), w_received,
                                        w_gate_up, w_down))
            with stage("combine") as s:
                back_to, back_from = (rows_from, rows_to) if self.combine_at_host else (pairs_from, pairs_to)
                y = s.input(y)
                transfer = wire.exchange("output", layer, y.detach(), back_to, back_from)
                grad_copies = None  # a token's gradient rows at one host: one per pair, or per row if per pair
                if wire.defends(self.grad_kind) and not (self.combine_at_host and self.once):
                    back_token = away_token if self.combine_at_host else torch.cat(
                        [plan.sorted_token[:own_pairs.start], plan.sorted_token[own_pairs.stop:]]).long()
                    grad_copies = lambda: copies(back_token, back_from)  # noqa: E731
                y_back = _Arrive.apply(y, transfer, wire, self.grad_kind, layer, back_from, back_to, None, grad_copies)
                if self.public_experts is not None and hidden.sent is not None:
                    away_pair = torch.cat([plan.sorted_pair[:own_pairs.start], plan.sorted_pair[own_pairs.stop:]])
                    y_back = y_back + self._public_correction(layer, x, expert_ids, away_pair.long(), away_token,
                                                              owners(rows_to, x.device), hidden.sent)
                start = row_start if self.combine_at_host else pair_start
                y_all = s.output(torch.cat([y_back[:start], y_own, y_back[start:]]))
        with stage("combine") as s:
            y_all = s.input(y_all)
            if self.combine_at_host:
                out = scatter_add(y_all, rows.token, x.shape[0])
            else:
                out = ct.unpermute(y_all, plan, weights)
            out = s.output(out)
        return out, side
