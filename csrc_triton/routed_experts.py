"""Routed SwiGLU experts over ragged expert groups, forward and backward: ``expert_mlp`` (top-k weighted, with
the combine) and ``grouped_mlp`` (one expert per row, unweighted), their autograd Function and references.

For the slots of expert e (rows ``offsets[e]:offsets[e+1]`` of the expert-sorted order, see permute.py):

    h = [x W_gate[e]^T, x W_up[e]^T]          gate-up GEMM; the token gather is fused into its A loads,
    a = silu(h_gate) * h_up                   SwiGLU fused into its epilogue (h is kept for backward)
    y = a W_down[e]^T                         down GEMM
    out[t] = residual[t] + sum_j w[t,j] y[slot(t,j)]   weighted combine (permute.combine)

Backward, with dout gathered per slot inside the loads:

    g  = dout[tok] W_down[e]                  down dgrad (a plain grouped GEMM, into dh's up half)
    dw = <g, a>,  dh = SwiGLU'(h) * (w g)     one pass over g and h: the routing-weight gradient and dh, in
                                              place (y is never stored)
    dW_down[e] = dout[tok]^T (w a)            wgrad (w a written by that same pass)
    dx_slot = dh W_gate_up[e]                 up dgrad (gate and up rows are one K range of 2I)
    dW_gate_up[e] = dh^T x[tok]               wgrad, x gathered in the loads
    dx[t] = sum_j dx_slot[slot(t,j)]          combine

Here: the gate-up GEMM, this op's own kernel (its gather and SwiGLU epilogue serve nothing else), the forward
and backward orchestration, the autograd Function, the references and the public functions. The plain grouped
GEMM, the wgrad, the K loop and the row-tile schedule are the grouped-GEMM core (_grouped_gemm.py); the SwiGLU
backward pass is shared with the shared expert (_swiglu.py). What each version of these kernels was predicted
and measured to do: notes/experts.md.
"""

import torch
import triton
import triton.language as tl

from ._grouped_gemm import Groups, dot, grouped_gemm, mma, output_tile, precision, rows_of, tma_descriptor, wgrad
from ._runtime import check, programs_per_device, use_triton
from ._swiglu import swiglu_backward, swiglu_mlp_reference
from .permute import RoutingPlan, combine, plan_routing, start_id_check

__all__ = ["expert_mlp", "expert_mlp_reference", "grouped_mlp", "grouped_mlp_reference"]


@triton.jit
def _gate_up_fwd_kernel(
    x_ptr, token_ptr, w_ptr, w_desc, h_ptr, act_ptr, offsets_ptr, tile_cum_ptr,
    E, H, I, stride_x, stride_we, stride_wn, stride_wk, stride_h, stride_act,
    SAVE_H: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SEARCH_STEPS: tl.constexpr, PROGRAMS: tl.constexpr,
):
    """h = x[token] @ W_gate_up[e]^T and act = silu(h_gate) * h_up, a [BM, BN/2] tile of act at a time: one
    BN-wide MMA whose first BN/2 columns are gate columns c0.., its last BN/2 the same up columns, fed from the
    same A loads. The epilogue splits it; the halves differ in a register index of the MMA layout, so the split
    moves no data.

    TMA: the B tile is one load of w_desc, w_gate_up viewed as [2E, I, H] (gate of e at 2e, up at 2e + 1), block
    [2, BN/2, BK]: gate rows c0.. then up rows c0.., rows past I zero-filled. This form, persistent and flattened,
    ran 1.02x-1.12x the speed of two 2-D loads into two [BM, BN/2] accumulators one tile a program, which, made
    persistent, had lost 12-18% (notes/experts.md, versions 14 and 10).
    Else (pointer loads) the BN columns are the matching rows of w_gate_up (c and I + c). h is stored from the
    halves, not from the accumulator through w_rows: that kept w_rows live across the K loop (version 7).

    Persistent and flattened as the plain grouped GEMM (_grouped_gemm_kernel): PROGRAMS programs, one per SM
    whatever the rows, walk the (row tile, column tile) pairs, loading the next tile's first K steps during this
    one's epilogue.
    """
    HALF: tl.constexpr = BN // 2
    col_tiles = tl.cdiv(I, HALF)
    tiles = tl.load(tile_cum_ptr + E - 1) * col_tiles
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
        expert, _, rows, rmask, c0, cols, cmask = output_tile(tile // col_tiles, tile % col_tiles, tile_cum_ptr,
                                                              offsets_ptr, E, I, BM, HALF, SEARCH_STEPS)
        x_rows = rows_of(token_ptr, rows, rmask, True)
        if TMA:
            acc = tl.zeros([BM, BN], tl.float32)
            x_ptrs = x_ptr + x_rows[:, None] * stride_x + tl.arange(0, BK)[None, :]
            for k0 in range(0, H, BK):
                a = tl.load(x_ptrs, mask=rmask[:, None], other=0.0)
                w = tl.reshape(w_desc.load([2 * expert, c0, k0]), [BN, BK])
                acc = dot(a, tl.trans(w), acc, PRECISION)
                x_ptrs += BK
        else:
            j = tl.arange(0, BN)
            w_cols = c0 + j % HALF  # the act column each MMA column feeds
            w_rows = w_cols + (j // HALF) * I  # its row of w_gate_up: gate rows, then up rows
            acc = mma(tl.zeros([BM, BN], tl.float32), x_ptr, x_rows, rmask, stride_x,
                      w_ptr + expert.to(tl.int64) * stride_we, w_rows, w_cols < I, stride_wn, stride_wk, H, BK,
                      EVEN_K, PRECISION)
        gate, up = tl.split(tl.permute(tl.reshape(acc, [BM, 2, HALF]), [0, 2, 1]))
        rows64 = rows.to(tl.int64)
        mask = rmask[:, None] & cmask[None, :]
        if SAVE_H:
            h_ptrs = h_ptr + rows64[:, None] * stride_h + cols[None, :]
            tl.store(h_ptrs, gate.to(h_ptr.dtype.element_ty), mask=mask)
            tl.store(h_ptrs + I, up.to(h_ptr.dtype.element_ty), mask=mask)
        act = gate * tl.sigmoid(gate) * up
        tl.store(act_ptr + rows64[:, None] * stride_act + cols[None, :], act.to(act_ptr.dtype.element_ty),
                 mask=mask)


def gate_up(x, groups: Groups, w_gate_up, h, act, tma: bool = True):
    """act = SwiGLU(x[token] @ W_gate_up[e]^T) per slot, h (the GEMM's output, for backward) saved if given;
    the weights read by TMA where their layout allows (``tma``)."""
    num_experts, inter, hidden = w_gate_up.shape[0], w_gate_up.shape[1] // 2, w_gate_up.shape[2]
    cfg = groups.tile
    w_desc = None  # w_gate_up viewed as [2E, I, H]: H a multiple of BK, an expert's up rows right after its gate rows
    row_stride = w_gate_up.stride(1)
    if tma and hidden % cfg.bk == 0 and w_gate_up.stride(2) == 1 and w_gate_up.stride(0) == 2 * inter * row_stride:
        w_desc = tma_descriptor(w_gate_up, [2 * num_experts, inter, hidden], [inter * row_stride, row_stride, 1],
                                [2, cfg.bn // 2, cfg.bk])
    programs = programs_per_device(x.device)
    _gate_up_fwd_kernel[(programs,)](
        x, groups.token, w_gate_up, w_desc if w_desc is not None else w_gate_up, h if h is not None else act, act,
        groups.offsets, groups.tile_cum, num_experts, hidden, inter, x.stride(0), w_gate_up.stride(0),
        row_stride, w_gate_up.stride(2), h.stride(0) if h is not None else 0, act.stride(0),
        SAVE_H=h is not None, TMA=w_desc is not None, EVEN_K=hidden % cfg.bk == 0, PRECISION=precision(x.dtype),
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, SEARCH_STEPS=groups.search_steps, PROGRAMS=programs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _routed_forward(x, groups: Groups, w_gate_up, w_down, save_h):
    """Gate-up GEMM (gather + SwiGLU epilogue), then the down GEMM: returns (y [slots, H], h [slots, 2I] or None)."""
    num_experts, hidden, inter = w_down.shape
    slots = groups.token.numel()
    dev, dtype = x.device, x.dtype
    h = torch.empty(slots, 2 * inter, device=dev, dtype=dtype) if save_h else None
    act = torch.empty(slots, inter, device=dev, dtype=dtype)
    y = torch.empty(slots, hidden, device=dev, dtype=dtype)
    if slots == 0:
        return y, h
    gate_up(x, groups, w_gate_up, h, act)
    grouped_gemm(act, groups, False, w_down, (w_down.stride(1), w_down.stride(2)), y, hidden, inter)
    return y, h


def _routed_backward(dout, x, groups: Groups, w_gate_up, w_down, h, slot_weight, need_dw):
    """Gradients of the grouped SwiGLU MLP with respect to the slots' inputs, weights and slot weights.

    dout: [T, H], gathered per slot through groups.token. Returns (dx_slot [slots, H], dW_gate_up [E, 2I, H],
    dW_down, dslot_weight [slots] fp32 or None).
    """
    num_experts, hidden, inter = w_down.shape
    dev, dtype = x.device, x.dtype
    slots = groups.token.numel()
    dh = torch.empty(slots, 2 * inter, device=dev, dtype=dtype)
    dw_down = torch.empty_like(w_down, memory_format=torch.contiguous_format)
    # g = dout[token] W_down[e] lands in dh's up half, which the SwiGLU backward then overwrites with d_up;
    # the same pass writes w * a for W_down's gradient (a plain operand streams to the MMA; with a recomputed
    # inside the wgrad's loads, the two wgrads took 1.5x as long: notes/experts.md, version 6). With the SwiGLU
    # backward in the down dgrad's epilogue instead, the two took longer (spills: notes/experts.md, version 9).
    d_gate, d_up = dh[:, :inter], dh[:, inter:]
    act = torch.empty(slots, inter, device=dev, dtype=dtype)
    grouped_gemm(dout, groups, True, w_down, (w_down.stride(2), w_down.stride(1)), d_up, inter, hidden)
    dw_slot = swiglu_backward(d_up, h[:, :inter], h[:, inter:], slot_weight, d_gate, d_up, act=act,
                              need_dscale=need_dw)
    wgrad(dout, groups.token, act, None, dw_down, groups)
    del act
    dx_slot = torch.empty(slots, hidden, device=dev, dtype=dtype)
    dw_gate_up = torch.empty(num_experts, 2 * inter, hidden, device=dev, dtype=w_down.dtype)
    grouped_gemm(dh, groups, False, w_gate_up, (w_gate_up.stride(2), w_gate_up.stride(1)), dx_slot, hidden,
                 2 * inter)
    wgrad(dh, None, x, groups.token, dw_gate_up, groups)
    return dx_slot, dw_gate_up, dw_down, dw_slot


class _RoutedExpertsFunction(torch.autograd.Function):
    """out = residual + combine_w(grouped SwiGLU(x[sorted_token])), weights applied in the combine (weights None,
    for grouped_mlp: k = 1 and unweighted, so the combine only puts the rows back in their order)."""

    @staticmethod
    def forward(ctx, x, weights, w_gate_up, w_down, residual, plan: RoutingPlan):
        y, h = _routed_forward(x, Groups.of(plan, x.dtype), w_gate_up, w_down, save_h=any(ctx.needs_input_grad[:4]))
        out = combine(y, plan.slot_of_pair, weights, residual)
        ctx.save_for_backward(x, weights, w_gate_up, w_down, h, *plan)
        ctx.has_residual = residual is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weights, w_gate_up, w_down, h, *plan_tensors = ctx.saved_tensors
        plan = RoutingPlan(*plan_tensors)
        dout = dout.contiguous()
        slot_weight = None
        if weights is not None:
            slot_weight = weights.reshape(-1)[plan.sorted_pair.long()].float().contiguous()
        dx_slot, dw_gate_up, dw_down, dw_slot = _routed_backward(
            dout, x, Groups.of(plan, x.dtype), w_gate_up, w_down, h, slot_weight, need_dw=ctx.needs_input_grad[1])
        dx = combine(dx_slot, plan.slot_of_pair)
        dweights = dw_slot[plan.slot_of_pair.long()].to(weights.dtype) if dw_slot is not None else None
        return dx, dweights, dw_gate_up, dw_down, dout if ctx.has_residual else None, None


# References (the oracles and the CPU path): the transformers experts loop, line for line.


def expert_mlp_reference(x, weights, expert_ids, w_gate_up, w_down, residual=None):
    """transformers' eager experts: per hit expert, SwiGLU MLP of its tokens times their weights, index_add."""
    out = torch.zeros_like(x) if residual is None else residual.clone()
    inter = w_down.shape[2]
    for expert in torch.unique(expert_ids).tolist():
        token, pos = torch.where(expert_ids == expert)
        y = swiglu_mlp_reference(x[token], w_gate_up[expert, :inter], w_gate_up[expert, inter:], w_down[expert])
        out.index_add_(0, token, (y * weights[token, pos, None]).to(out.dtype))
    return out


def grouped_mlp_reference(x, expert_of_row, w_gate_up, w_down):
    out = torch.zeros_like(x)
    inter = w_down.shape[2]
    for expert in torch.unique(expert_of_row).tolist():
        rows = torch.where(expert_of_row == expert)[0]
        out[rows] = swiglu_mlp_reference(x[rows], w_gate_up[expert, :inter], w_gate_up[expert, inter:],
                                         w_down[expert])
    return out


def _check_experts(name, x, w_gate_up, w_down):
    check(x.dim() == 2, f"{name}: x must be [tokens, hidden], got {tuple(x.shape)}")
    check(w_gate_up.dim() == 3 and w_down.dim() == 3,
          f"{name}: w_gate_up must be [E, 2I, H] and w_down [E, H, I], got {tuple(w_gate_up.shape)} and "
          f"{tuple(w_down.shape)}")
    num_experts, hidden, inter = w_down.shape
    check(w_gate_up.shape == (num_experts, 2 * inter, hidden),
          f"{name}: w_gate_up {tuple(w_gate_up.shape)} does not match w_down {tuple(w_down.shape)}: expected "
          f"{(num_experts, 2 * inter, hidden)}")
    check(x.shape[1] == hidden, f"{name}: x has hidden size {x.shape[1]}, the experts expect {hidden}")
    check(x.dtype == w_gate_up.dtype == w_down.dtype,
          f"{name}: x ({x.dtype}) and expert weights ({w_gate_up.dtype}, {w_down.dtype}) must share a dtype; "
          "cast them or run under torch.autocast")


def _rowmajor(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _routed_experts(x, weights, expert_ids, w_gate_up, w_down, residual, plan, check_ids):
    """_RoutedExpertsFunction on ``plan``, or on one made here; ``check_ids``: the ids' range, checked without
    stalling the experts' kernels (start_id_check starts before them and finishes once they are launched)."""
    finish_check = start_id_check(expert_ids, w_down.shape[0]) if check_ids else lambda: None
    if plan is None:
        plan = plan_routing(expert_ids, w_down.shape[0], validate=False)
    out = _RoutedExpertsFunction.apply(_rowmajor(x), weights, w_gate_up, w_down, residual, plan)
    finish_check()
    return out


def expert_mlp(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, w_gate_up: torch.Tensor,
               w_down: torch.Tensor, residual: torch.Tensor | None = None,
               plan: RoutingPlan | None = None) -> torch.Tensor:
    """Routed SwiGLU experts with the top-k weighted combine.

    Args:
        x: [T, H] tokens (bf16/fp16/fp32).
        weights: [T, k] routing weights (any float dtype; applied in fp32).
        expert_ids: [T, k] integer expert ids in [0, E).
        w_gate_up: [E, 2I, H] (gate rows first, as transformers stores ``gate_up_proj``); w_down: [E, H, I].
        residual: optional [T, H] added to the output (e.g. the shared experts' output).
        plan: ``plan_routing(expert_ids, E)`` if already made (the router's ids need no range check).

    Returns:
        [T, H] in x's dtype: residual[t] + sum_j weights[t, j] * MLP_{expert_ids[t, j]}(x[t]).
    """
    _check_experts("expert_mlp", x, w_gate_up, w_down)
    check(weights.shape == expert_ids.shape == (x.shape[0], expert_ids.shape[-1]),
          f"expert_mlp: weights {tuple(weights.shape)} and expert_ids {tuple(expert_ids.shape)} must both be "
          f"[{x.shape[0]}, k]")
    if not use_triton(x):
        return expert_mlp_reference(x, weights, expert_ids, w_gate_up, w_down, residual)
    return _routed_experts(x, weights, expert_ids, w_gate_up, w_down, residual, plan, check_ids=plan is None)


def grouped_mlp(x: torch.Tensor, expert_of_row: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """One expert per row, unweighted: y[r] = MLP_{expert_of_row[r]}(x[r]) -> [R, H].

    This is what an expert owner runs on the hidden states it received from all parties. ``validate`` checks
    the ids' range (``start_id_check``: one wait for the device, after the experts' kernels are launched); pass
    False for ids in range by construction.
    """
    _check_experts("grouped_mlp", x, w_gate_up, w_down)
    check(expert_of_row.shape == (x.shape[0],),
          f"grouped_mlp: expert_of_row must be [{x.shape[0]}], got {tuple(expert_of_row.shape)}")
    if not use_triton(x):
        return grouped_mlp_reference(x, expert_of_row, w_gate_up, w_down)
    return _routed_experts(x, None, expert_of_row.view(-1, 1), w_gate_up, w_down, None, None, check_ids=validate)
