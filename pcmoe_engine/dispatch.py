"""Where one MoE layer's rows go: the origin's wire order and rows, the host's expansion of rows into pairs.

A party routes each token to k experts; expert e lives with party ``e mod n`` as its local expert ``e // n``.
Both sides order the (token, expert) pairs the same way, so no per-pair ids travel:

- the **wire order** of an origin's pairs: by owner, then token, then the owner's local expert (``plan_pairs``);
- the **rows** it dispatches (``dispatch_rows``), in the same order: one per (token, host) when dispatching once
  (the host runs all of that token's experts on the one row), or one per pair;
- with each row, a bitmask of the host's local experts it picked (the "expert_mask" kind); the host expands
  its rows into pairs row by row, local experts ascending (``expand``): exactly the origin's wire order.

A token's k experts are distinct (a top-k routing): the mask has one bit per expert it picked.

Outputs return per pair in that order (the origin's ``unpermute`` combines them with its routing weights), or,
combined at the host, per row (the origin sums a token's rows). Nothing here syncs the device with the host,
given the row and pair counts, which the splits exchange brings to the host once per layer.

``shuffle`` puts each owner's rows in a secret order (privacy.shuffle: fresh per step and layer, drawn by the
origin's wire) together with their masks, and the plan's slots in the order the host's expansion of those rows
then yields: the host expands exactly as before, and the origin's combine reads the returned rows through the
shuffled plan, so outputs and gradients find their tokens while the host cannot tell a row's position in the
batch or link it to the same token's rows at other layers. ``first_copy`` names the rows (or pairs) that carry
one token to one owner, which the wire's defence noises together.
"""

import math
from typing import NamedTuple

import torch

import csrc_triton as ct

__all__ = ["plan_pairs", "Rows", "rows_per_owner", "dispatch_rows", "mask_bytes", "expand", "shuffle", "owners",
           "first_copy", "gather", "scatter_add"]


def mask_bytes(num_experts: int, parties: int) -> int:
    """Bytes of one row's expert mask: one bit per local expert of the party that owns the most."""
    return math.ceil(math.ceil(num_experts / parties) / 8)


def _counts(index: torch.Tensor, bins: int) -> torch.Tensor:
    """How often each value in [0, bins) occurs in ``index`` (int64), without bincount's device sync."""
    flat = index.reshape(-1)
    return torch.zeros(bins, dtype=torch.int64, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


def plan_pairs(expert_ids: torch.Tensor, parties: int, num_experts: int) -> ct.RoutingPlan:
    """The pairs of [T, k] ``expert_ids`` in wire order, as a RoutingPlan over the owners (what ``ct.unpermute``
    takes): ``sorted_pair`` (pair t*k + j of each slot), ``sorted_token``, ``slot_of_pair``,
    ``tokens_per_expert`` (pairs per owner) and ``offsets`` (each owner's first slot)."""
    tokens, k = expert_ids.shape
    ids = expert_ids.long()
    owner, local = ids % parties, ids // parties
    token = torch.arange(tokens, device=ids.device).unsqueeze(1)
    # (owner, token, local) as one integer: a token picks an expert at most once, so the keys are distinct.
    key = (owner * tokens + token) * math.ceil(num_experts / parties) + local
    sorted_pair = key.flatten().argsort()
    slot_of_pair = torch.empty_like(sorted_pair)
    slot_of_pair[sorted_pair] = torch.arange(sorted_pair.numel(), device=ids.device)
    counts = _counts(owner, parties)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return ct.RoutingPlan((sorted_pair // k).int(), sorted_pair.int(), slot_of_pair.view(tokens, k).int(),
                          counts.int(), offsets.int())


class Rows(NamedTuple):
    """An origin's dispatched rows in wire order (owner, token): whose hidden state each row is, and the bitmask
    of the owner's local experts it goes to."""
    token: torch.Tensor  # [rows] int64
    mask: torch.Tensor  # [rows, mask bytes] uint8


def rows_per_owner(expert_ids: torch.Tensor, parties: int, once: bool) -> torch.Tensor:
    """[parties] int64: the rows an origin sends each owner, one per (token, owner) when dispatching once."""
    owner = expert_ids.long() % parties
    if not once:
        return _counts(owner, parties)
    hit = torch.zeros(expert_ids.shape[0], parties, dtype=torch.bool, device=owner.device)
    return hit.scatter_(1, owner, True).sum(0)


def dispatch_rows(expert_ids: torch.Tensor, plan: ct.RoutingPlan, parties: int, num_experts: int, once: bool,
                  rows: int) -> Rows:
    """The ``rows`` rows (their total, from ``rows_per_owner``) an origin dispatches, in wire order."""
    tokens, k = expert_ids.shape
    ids = expert_ids.long()
    owner, local = ids % parties, ids // parties
    width = mask_bytes(num_experts, parties)
    bit = torch.ones_like(local) << (local % 8)
    if not once:  # one row per pair: the plan's slots, one bit each
        pair = plan.sorted_pair.long()
        mask = torch.zeros(pair.numel(), width, dtype=torch.int32, device=ids.device)
        mask.scatter_(1, (local.flatten()[pair] // 8).unsqueeze(1), bit.flatten()[pair].int().unsqueeze(1))
        return Rows(plan.sorted_token.long(), mask.to(torch.uint8))
    # One row per (token, owner): its mask ORs the bits of the token's experts at that owner (distinct experts,
    # so adding the bits is OR-ing them). Laid out owner-major, the nonzero masks are the rows in wire order.
    masks = torch.zeros(parties, tokens, width, dtype=torch.int32, device=ids.device)
    index = (owner * tokens + torch.arange(tokens, device=ids.device).unsqueeze(1)) * width + local // 8
    masks.view(-1).index_add_(0, index.flatten(), bit.flatten().int())
    hit = masks.view(parties * tokens, width).any(dim=1)
    row = torch.nonzero_static(hit, size=rows).squeeze(1)
    return Rows(row % tokens, masks.view(parties * tokens, width)[row].to(torch.uint8))


def expand(mask: torch.Tensor, local_experts: int, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A host's received rows -> its pairs, row by row, local experts ascending: (row of each pair, local
    expert of each pair), ``pairs`` of them (the total the splits announced)."""
    shifts = torch.arange(8, device=mask.device)
    bits = (mask.long().unsqueeze(-1) >> shifts) & 1  # [rows, bytes, 8]: bit b of byte j is local 8j + b
    bits = bits.reshape(mask.shape[0], mask.shape[1] * 8)[:, :local_experts]
    flat = torch.nonzero_static(bits.reshape(-1), size=pairs).squeeze(1)
    return flat // local_experts, flat % local_experts


def owners(counts: list[int], device) -> torch.Tensor:
    """The owner of each row (or pair) of an owner-major layout with ``counts`` per owner."""
    return torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device),
                                   output_size=sum(counts))


def shuffle(plan: ct.RoutingPlan, rows: Rows, order: torch.Tensor) -> tuple[ct.RoutingPlan, Rows]:
    """The rows in ``order`` (a permutation within each owner's block) with their masks, and the plan whose slots
    follow the host's expansion of the shuffled rows: each row's pairs, local experts ascending, which are
    consecutive slots of the unshuffled plan (wire order: owner, token, local expert)."""
    bits = (rows.mask.long().unsqueeze(-1) >> torch.arange(8, device=order.device)) & 1
    pairs_of_row = bits.flatten(1).sum(1)  # [rows]
    first_slot = pairs_of_row.cumsum(0) - pairs_of_row  # of each row, in the unshuffled plan
    moved = pairs_of_row[order]
    pairs = plan.sorted_pair.numel()
    row_of_slot = torch.repeat_interleave(torch.arange(order.numel(), device=order.device), moved, output_size=pairs)
    new_first = moved.cumsum(0) - moved
    old_slot = first_slot[order][row_of_slot] + torch.arange(pairs, device=order.device) - new_first[row_of_slot]
    sorted_pair = plan.sorted_pair[old_slot]
    slot_of_pair = torch.empty_like(sorted_pair)
    slot_of_pair[sorted_pair.long()] = torch.arange(pairs, device=order.device, dtype=sorted_pair.dtype)
    shuffled = ct.RoutingPlan(plan.sorted_token[old_slot], sorted_pair, slot_of_pair.view_as(plan.slot_of_pair),
                              plan.tokens_per_expert, plan.offsets)
    return shuffled, Rows(rows.token[order], rows.mask[order])


def first_copy(owner: torch.Tensor, token: torch.Tensor, tokens: int, parties: int) -> torch.Tensor:
    """For each row (or pair), the index of the first one that carries the same token to the same owner."""
    key = owner * tokens + token
    index = torch.arange(key.numel(), device=key.device)
    first = torch.full((parties * tokens,), key.numel(), device=key.device, dtype=torch.int64)
    return first.scatter_reduce_(0, key, index, "amin")[key]


class _Gather(torch.autograd.Function):
    """rows[index]; backward sums each source row's gradients in fp32 (a token's rows, a row's pairs)."""

    @staticmethod
    def forward(ctx, rows, index):
        ctx.save_for_backward(index)
        ctx.num_rows = rows.shape[0]
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        summed = grad.new_zeros((ctx.num_rows, *grad.shape[1:]), dtype=torch.float32)
        return summed.index_add_(0, index, grad.float()).to(grad.dtype), None


def gather(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``rows[index]``, differentiable, its backward accumulating in fp32."""
    return _Gather.apply(rows, index)


def scatter_add(rows: torch.Tensor, index: torch.Tensor, size: int, scale: torch.Tensor | None = None
                ) -> torch.Tensor:
    """out[i] = sum of rows[r] * scale[r] over r with index[r] == i, accumulated in fp32, in the rows' dtype:
    [size, H]. Differentiable in rows and scale."""
    contrib = rows if scale is None else rows * scale.to(rows.dtype).unsqueeze(1)  # saves rows, not an fp32 copy
    out = rows.new_zeros(size, rows.shape[1], dtype=torch.float32).index_add(0, index, contrib.float())
    return out.to(rows.dtype)
