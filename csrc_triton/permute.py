"""Dropless token permutation: per-expert histogram and offsets, the expert-contiguous order of the
(token, expert) pairs (stable: pairs of one expert keep their token order, as a stable sort would), the
gather of token rows into that order, and the inverse scatter with the top-k weighted combine.

No capacity and no padding: expert e owns slots ``offsets[e]:offsets[e+1]`` of the sorted order.
"""

from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

from ._runtime import check, next_pow2, use_triton

__all__ = ["RoutingPlan", "plan_routing", "plan_routing_reference", "permute", "unpermute",
           "permute_reference", "unpermute_reference"]


class RoutingPlan(NamedTuple):
    """Where each (token, expert) pair goes. P = T * k pairs; pair t*k + j is token t's j-th choice."""
    sorted_token: torch.Tensor  # [P] int32: token of each slot, slots grouped by expert
    sorted_pair: torch.Tensor  # [P] int32: pair index of each slot
    slot_of_pair: torch.Tensor  # [T, k] int32: slot of each pair (inverse of sorted_pair)
    tokens_per_expert: torch.Tensor  # [E] int32
    offsets: torch.Tensor  # [E + 1] int32: first slot of each expert, offsets[E] == P

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.numel()


def _check_ids(expert_ids, num_experts):
    check(expert_ids.dim() == 2, f"plan_routing: expert_ids must be [tokens, k], got {tuple(expert_ids.shape)}")
    check(not expert_ids.is_floating_point(), "plan_routing: expert_ids must be an integer tensor")
    check(num_experts >= 1, "plan_routing: num_experts must be positive")
    check(expert_ids.numel() < 2**31, "plan_routing: more than 2^31 (token, expert) pairs")


def start_id_check(expert_ids: torch.Tensor, num_experts: int) -> Callable[[], None]:
    """Start the check that ``expert_ids`` lie in [0, E); the returned function finishes it (raises if not).

    Started before the kernels that read the ids and finished after they are launched: min and max travel to
    pinned host memory behind an event, and finishing waits for that event alone, so the launched kernels keep
    the GPU busy meanwhile (a ``.tolist()`` at the start would drain the stream and leave the GPU idle while the
    host launches them). The plan's kernels meanwhile count an out-of-range id as expert 0, so nothing reads out
    of bounds before the error. Skipped while a CUDA graph is captured, where nothing may wait on the device:
    ids from ``route`` are in range by construction.
    """
    if not expert_ids.numel() or (expert_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return lambda: None
    bounds = torch.stack(torch.aminmax(expert_ids))
    ready = None
    if bounds.is_cuda:
        bounds = bounds.to("cpu", non_blocking=True)  # into pinned memory, behind the event below
        ready = torch.cuda.Event()
        ready.record()

    def finish():
        if ready is not None:
            ready.synchronize()
        low, high = bounds.tolist()
        check(low >= 0 and high < num_experts,
              f"plan_routing: expert ids must lie in [0, {num_experts}), got values in [{low}, {high}]")
    return finish


def plan_routing_reference(expert_ids: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Pure-PyTorch plan: a stable sort of the pairs by expert id."""
    _check_ids(expert_ids, num_experts)
    start_id_check(expert_ids, num_experts)()
    flat = expert_ids.flatten().long()
    sorted_pair = torch.sort(flat, stable=True)[1]
    slot_of_pair = torch.empty_like(sorted_pair)
    slot_of_pair[sorted_pair] = torch.arange(flat.numel(), device=flat.device)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = counts.cumsum(0)
    k = expert_ids.shape[1]
    return RoutingPlan((sorted_pair // max(k, 1)).int(), sorted_pair.int(), slot_of_pair.view_as(expert_ids).int(),
                       counts.int(), offsets.int())


@triton.jit
def _chunk_one_hot(ids_ptr, chunk, P, E, lane, cols, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    """Pairs chunk*CHUNK + lane: (their pair index, expert id, valid mask, [CHUNK, E_PAD] one-hot of the id)."""
    pairs = chunk * CHUNK + lane
    valid = pairs < P
    ids = tl.load(ids_ptr + pairs, mask=valid, other=0)
    # An id outside [0, E) counts as expert 0 (start_id_check raises, perhaps after these kernels ran): every pair
    # still gets one slot of [0, P), so no later kernel reads out of bounds. E_PAD matches no column.
    ids = tl.where(valid, tl.where((ids >= 0) & (ids < E), ids, 0), E_PAD)
    return pairs, ids, valid, ids[:, None] == cols[None, :]


@triton.jit
def _block_histogram_kernel(ids_ptr, P, E, hist_ptr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
                            CHUNKS: tl.constexpr):
    pid = tl.program_id(0)
    lane = tl.arange(0, CHUNK)
    cols = tl.arange(0, E_PAD)
    hist = tl.zeros([E_PAD], tl.int32)
    for c in range(CHUNKS):
        _, _, _, hit = _chunk_one_hot(ids_ptr, pid * CHUNKS + c, P, E, lane, cols, CHUNK, E_PAD)
        hist += tl.sum(hit.to(tl.int32), 0)
    tl.store(hist_ptr + pid * E_PAD + cols, hist)


@triton.jit
def _place_pairs_kernel(ids_ptr, P, K, E, hist_ptr, num_blocks, counts_ptr, offsets_ptr, sorted_token_ptr,
                        sorted_pair_ptr, slot_ptr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
                        CHUNKS: tl.constexpr, HIST_ROWS: tl.constexpr):
    pid = tl.program_id(0)
    lane = tl.arange(0, CHUNK)
    cols = tl.arange(0, E_PAD)
    # Every program reads all block histograms: the experts' totals (hence offsets) and its own start within
    # each expert (the pairs of earlier blocks). Few blocks (plan_routing keeps them <= _PLAN_PROGRAMS) keep
    # this cheap, and it spares a scan between the two launches.
    total = tl.zeros([E_PAD], tl.int32)
    before = tl.zeros([E_PAD], tl.int32)
    for r0 in range(0, num_blocks, HIST_ROWS):
        rows = r0 + tl.arange(0, HIST_ROWS)
        tile = tl.load(hist_ptr + rows[:, None] * E_PAD + cols[None, :], mask=rows[:, None] < num_blocks, other=0)
        total += tl.sum(tile, 0)
        before += tl.sum(tl.where(rows[:, None] < pid, tile, 0), 0)
    first_slot = tl.cumsum(total, 0) - total
    if pid == 0:
        tl.store(counts_ptr + cols, total, mask=cols < E)
        tl.store(offsets_ptr + cols, first_slot, mask=cols < E)
        tl.store(offsets_ptr + E, tl.sum(total, 0))
    next_slot = first_slot + before  # per expert: the slot of this block's next pair
    for c in range(CHUNKS):
        pairs, ids, valid, hit = _chunk_one_hot(ids_ptr, pid * CHUNKS + c, P, E, lane, cols, CHUNK, E_PAD)
        # Rank of each pair among the earlier pairs of the same expert inside this chunk.
        rank = tl.sum(((ids[:, None] == ids[None, :]) & (lane[None, :] < lane[:, None])).to(tl.int32), 1)
        slot = tl.sum(tl.where(hit, next_slot[None, :], 0), 1) + rank
        tl.store(slot_ptr + pairs, slot, mask=valid)
        tl.store(sorted_token_ptr + slot, pairs // K, mask=valid)
        tl.store(sorted_pair_ptr + slot, pairs, mask=valid)
        next_slot += tl.sum(hit.to(tl.int32), 0)


_PLAN_PROGRAMS = 256  # at most this many blocks (each program of the placement reads all their histograms)


def plan_routing(expert_ids: torch.Tensor, num_experts: int, validate: bool = True) -> RoutingPlan:
    """Plan the dropless permutation of ``expert_ids`` ([T, k], any integer dtype, values in [0, E)).

    Two Triton launches (block histograms, then offsets and placement); the slot order equals a stable sort
    of the pairs by expert id. ``validate`` checks the id range (``start_id_check``: waits for the device
    once, after the plan's kernels are launched); pass False for ids in range by construction (``route``'s).
    """
    _check_ids(expert_ids, num_experts)
    if not use_triton(expert_ids):
        return plan_routing_reference(expert_ids, num_experts)
    finish_check = start_id_check(expert_ids, num_experts) if validate else lambda: None
    num_tokens, k = expert_ids.shape
    num_pairs = num_tokens * k
    dev = expert_ids.device
    e_pad = max(16, next_pow2(num_experts))
    chunk = max(16, min(128, 8192 // e_pad))  # [chunk, chunk] ranks and [chunk, e_pad] one-hots in registers
    chunks = next_pow2(triton.cdiv(num_pairs, chunk * _PLAN_PROGRAMS))
    num_blocks = triton.cdiv(num_pairs, chunk * chunks)
    ids = expert_ids.to(torch.int32).contiguous().view(-1)
    sorted_token = torch.empty(num_pairs, device=dev, dtype=torch.int32)
    sorted_pair = torch.empty(num_pairs, device=dev, dtype=torch.int32)
    slot_of_pair = torch.empty(num_tokens, k, device=dev, dtype=torch.int32)
    if not num_blocks:
        zeros = torch.zeros(num_experts + 1, device=dev, dtype=torch.int32)
        return RoutingPlan(sorted_token, sorted_pair, slot_of_pair, zeros[:num_experts], zeros)
    hist = torch.empty(num_blocks, e_pad, device=dev, dtype=torch.int32)
    counts = torch.empty(num_experts, device=dev, dtype=torch.int32)
    offsets = torch.empty(num_experts + 1, device=dev, dtype=torch.int32)
    _block_histogram_kernel[(num_blocks,)](ids, num_pairs, num_experts, hist, E_PAD=e_pad, CHUNK=chunk, CHUNKS=chunks)
    _place_pairs_kernel[(num_blocks,)](ids, num_pairs, k, num_experts, hist, num_blocks, counts, offsets,
                                       sorted_token, sorted_pair, slot_of_pair, E_PAD=e_pad, CHUNK=chunk,
                                       CHUNKS=chunks, HIST_ROWS=max(1, 4096 // e_pad))
    finish_check()
    return RoutingPlan(sorted_token, sorted_pair, slot_of_pair, counts, offsets)


# ----------------------------------------------------------------------------------------------------------
# Row movement: gather (with an optional per-row scale) and the top-k combine (with an optional residual).


@triton.jit
def _gather_rows_kernel(src_ptr, index_ptr, scale_ptr, out_ptr, R, H, stride_src, stride_out,
                        HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < R
    mask = rmask[:, None] & (cols[None, :] < H)
    src_rows = tl.load(index_ptr + rows, mask=rmask, other=0).to(tl.int64)
    vals = tl.load(src_ptr + src_rows[:, None] * stride_src + cols[None, :], mask=mask, other=0.0)
    if HAS_SCALE:
        vals = vals.to(tl.float32) * tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :],
             vals.to(out_ptr.dtype.element_ty), mask=mask)


def gather_rows(src: torch.Tensor, index: torch.Tensor, scale: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[r] = src[index[r]] * scale[r]  (src [N, H] with unit column stride; index, scale [R])."""
    num_rows, hidden = index.numel(), src.shape[1]
    out = torch.empty(num_rows, hidden, device=src.device, dtype=out_dtype or src.dtype)
    if src.stride(1) != 1:
        src = src.contiguous()
    if num_rows and hidden:
        block_h = min(256, next_pow2(hidden))
        grid = (triton.cdiv(num_rows, 16), triton.cdiv(hidden, block_h))
        _gather_rows_kernel[grid](src, index, scale if scale is not None else src, out, num_rows, hidden,
                                  src.stride(0), out.stride(0), HAS_SCALE=scale is not None, BLOCK_R=16,
                                  BLOCK_H=block_h)
    return out


@triton.jit
def _combine_kernel(y_ptr, slot_ptr, w_ptr, res_ptr, out_ptr, T, H, stride_y, stride_res, stride_out,
                    K: tl.constexpr, HAS_W: tl.constexpr, HAS_RES: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < T
    mask = rmask[:, None] & (cols[None, :] < H)
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    if HAS_RES:
        acc += tl.load(res_ptr + rows[:, None].to(tl.int64) * stride_res + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    for j in tl.static_range(K):
        slot = tl.load(slot_ptr + rows * K + j, mask=rmask, other=0).to(tl.int64)
        y = tl.load(y_ptr + slot[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            y *= tl.load(w_ptr + rows * K + j, mask=rmask, other=0.0).to(tl.float32)[:, None]
        acc += y
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def combine(y_sorted: torch.Tensor, slot_of_pair: torch.Tensor, weights: torch.Tensor | None = None,
            residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[t] = residual[t] + sum_j weights[t, j] * y_sorted[slot_of_pair[t, j]], accumulated in fp32."""
    num_tokens, k = slot_of_pair.shape
    hidden = y_sorted.shape[1]
    if y_sorted.stride(1) != 1:
        y_sorted = y_sorted.contiguous()
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    out = torch.empty(num_tokens, hidden, device=y_sorted.device, dtype=out_dtype or y_sorted.dtype)
    if num_tokens and hidden:
        block_h = min(256, next_pow2(hidden))
        grid = (triton.cdiv(num_tokens, 16), triton.cdiv(hidden, block_h))
        _combine_kernel[grid](y_sorted, slot_of_pair.contiguous(),
                              weights.contiguous() if weights is not None else y_sorted,
                              residual if residual is not None else y_sorted, out, num_tokens, hidden,
                              y_sorted.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
                              K=k, HAS_W=weights is not None, HAS_RES=residual is not None, BLOCK_T=16,
                              BLOCK_H=block_h)
    return out


@triton.jit
def _pair_dot_kernel(dout_ptr, y_ptr, slot_ptr, out_ptr, T, H, stride_dout, stride_y,
                     K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t, j] = <dout[t], y[slot[t, j]]>: the gradient of the combine weights."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    kcols = tl.arange(0, K_PAD)
    rmask = rows < T
    acc = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = rmask[:, None] & (cols[None, :] < H)
        d = tl.load(dout_ptr + rows[:, None].to(tl.int64) * stride_dout + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            slot = tl.load(slot_ptr + rows * K + j, mask=rmask, other=0).to(tl.int64)
            y = tl.load(y_ptr + slot[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += tl.where(kcols[None, :] == j, tl.sum(d * y, 1)[:, None], 0.0)
    tl.store(out_ptr + rows[:, None] * K + kcols[None, :], acc, mask=rmask[:, None] & (kcols[None, :] < K))


def pair_dot(dout: torch.Tensor, y_sorted: torch.Tensor, slot_of_pair: torch.Tensor) -> torch.Tensor:
    num_tokens, k = slot_of_pair.shape
    out = torch.empty(num_tokens, k, device=dout.device, dtype=torch.float32)
    dout, y_sorted = dout.contiguous(), y_sorted.contiguous()
    if num_tokens:
        _pair_dot_kernel[(triton.cdiv(num_tokens, 16),)](
            dout, y_sorted, slot_of_pair.contiguous(), out, num_tokens, dout.shape[1], dout.stride(0),
            y_sorted.stride(0), K=k, K_PAD=max(2, next_pow2(k)), BLOCK_T=16,
            BLOCK_H=min(128, next_pow2(max(dout.shape[1], 1))))
    return out


class _PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sorted_token, slot_of_pair):
        ctx.save_for_backward(slot_of_pair)
        return gather_rows(x, sorted_token)

    @staticmethod
    def backward(ctx, dx_sorted):
        (slot_of_pair,) = ctx.saved_tensors
        return combine(dx_sorted, slot_of_pair), None, None


class _UnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, weights, residual, plan_tensors):
        sorted_token, sorted_pair, slot_of_pair = plan_tensors
        ctx.save_for_backward(y_sorted, weights, sorted_token, sorted_pair, slot_of_pair)
        ctx.has_residual = residual is not None
        return combine(y_sorted, slot_of_pair, weights, residual)

    @staticmethod
    def backward(ctx, dout):
        y_sorted, weights, sorted_token, sorted_pair, slot_of_pair = ctx.saved_tensors
        dout = dout.contiguous()
        scale = weights.reshape(-1)[sorted_pair.long()] if weights is not None else None
        dy_sorted = gather_rows(dout, sorted_token, scale, out_dtype=y_sorted.dtype)
        dweights = None
        if weights is not None and ctx.needs_input_grad[1]:
            dweights = pair_dot(dout, y_sorted, slot_of_pair).to(weights.dtype)
        return dy_sorted, dweights, dout if ctx.has_residual else None, None


def permute_reference(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    return x[plan.sorted_token.long()]


def unpermute_reference(y_sorted, plan, weights=None, residual=None):
    num_tokens, k = plan.slot_of_pair.shape
    pairs = y_sorted[plan.slot_of_pair.long().flatten()].view(num_tokens, k, -1).float()
    if weights is not None:
        pairs = pairs * weights.float().unsqueeze(-1)
    out = pairs.sum(1)
    if residual is not None:
        out = out + residual.float()
    return out.to(y_sorted.dtype)


def permute(x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Gather token rows into expert-contiguous order: x [T, H] -> [T*k, H] (row s = x[plan.sorted_token[s]])."""
    check(x.dim() == 2, f"permute: x must be [tokens, hidden], got {tuple(x.shape)}")
    check(x.shape[0] == plan.slot_of_pair.shape[0],
          f"permute: x has {x.shape[0]} tokens but the plan was made for {plan.slot_of_pair.shape[0]}")
    if not use_triton(x):
        return permute_reference(x, plan)
    return _PermuteFunction.apply(x, plan.sorted_token, plan.slot_of_pair)


def unpermute(y_sorted: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of ``permute`` with the top-k weighted combine:
    out[t] = residual[t] + sum_j weights[t, j] * y_sorted[plan.slot_of_pair[t, j]]  -> [T, H] in y's dtype.
    """
    check(y_sorted.dim() == 2 and y_sorted.shape[0] == plan.sorted_token.numel(),
          f"unpermute: y_sorted must be [{plan.sorted_token.numel()}, hidden], got {tuple(y_sorted.shape)}")
    if weights is not None:
        check(weights.shape == plan.slot_of_pair.shape,
              f"unpermute: weights must be {tuple(plan.slot_of_pair.shape)}, got {tuple(weights.shape)}")
    if not use_triton(y_sorted):
        return unpermute_reference(y_sorted, plan, weights, residual)
    return _UnpermuteFunction.apply(y_sorted, weights, residual,
                                    (plan.sorted_token, plan.sorted_pair, plan.slot_of_pair))
