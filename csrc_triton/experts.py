"""Grouped SwiGLU expert MLPs over ragged expert groups, forward and backward.

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

Shared (always-on) experts are dense: their GEMMs go to the vendor GEMM, with the same SwiGLU passes.

Operands bf16/fp16 (fp32 for tests) with fp32 accumulation. Tiles of a group never mix experts, so empty
experts cost nothing and groups need not be block multiples. The grid is sized by an upper bound on the
number of row tiles (no device->host sync); surplus programs exit at once.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._runtime import check, interpreting, use_triton
from .permute import RoutingPlan, combine, plan_routing

__all__ = ["expert_mlp", "expert_mlp_reference", "shared_expert_mlp", "shared_expert_mlp_reference",
           "grouped_mlp", "grouped_mlp_reference"]


# ----------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _find_group(pid_m, tile_cum_ptr, offsets_ptr, E, BM: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """Map a row-tile index to (expert, first row, end row) by binary search over the cumulative tile counts.

    Returns expert == E for surplus tiles past the last group.
    """
    lo = pid_m * 0
    hi = lo + E
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        active = lo < hi
        go_right = tl.load(tile_cum_ptr + mid, mask=active, other=0) <= pid_m
        lo = tl.where(active & go_right, mid + 1, lo)
        hi = tl.where(active & ~go_right, mid, hi)
    expert = lo
    first_tile = tl.load(tile_cum_ptr + expert - 1, mask=expert > 0, other=0)
    row_start = tl.load(offsets_ptr + expert, mask=expert < E, other=0) + (pid_m - first_tile) * BM
    row_end = tl.load(offsets_ptr + expert + 1, mask=expert < E, other=0)
    return expert, row_start, row_end


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if PRECISION == "upcast":  # the triton 3.6 interpreter multiplies bf16 operands wrongly; fp32 is exact
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if PRECISION == "ieee":
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _tile(tile_cum_ptr, offsets_ptr, E, N, BM: tl.constexpr, BN: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """This program's output tile: (expert, rows, row mask, columns, column mask); expert == E: no work."""
    expert, row_start, row_end = _find_group(tl.program_id(1), tile_cum_ptr, offsets_ptr, E, BM, SEARCH_STEPS)
    rows = row_start + tl.arange(0, BM)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    return expert, rows, rows < row_end, cols, cols < N


@triton.jit
def _rows_of(token_ptr, rows, rmask, GATHER: tl.constexpr):
    if GATHER:
        return tl.load(token_ptr + rows, mask=rmask, other=0).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def _mma(acc, a_ptr, a_rows, a_mask, stride_a, b_ptr, cols, cmask, stride_bn, stride_bk, K,
         BK: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc += A[a_rows, :K] @ B[:K, cols], where B[k, n] = b_ptr[n * stride_bn + k * stride_bk]."""
    ks = tl.arange(0, BK)
    a_ptrs = a_ptr + a_rows[:, None] * stride_a + ks[None, :]
    b_ptrs = b_ptr + cols[None, :] * stride_bn + ks[:, None] * stride_bk
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=a_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=cmask[None, :], other=0.0)
        else:
            kmask = ks < K - k0
            a = tl.load(a_ptrs, mask=a_mask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = _dot(a, b, acc, PRECISION)
        a_ptrs += BK
        b_ptrs += BK * stride_bk
    return acc


@triton.jit
def _gate_up_fwd_kernel(
    x_ptr, token_ptr, wg_ptr, wu_ptr, h_ptr, act_ptr, offsets_ptr, tile_cum_ptr,
    E, H, I, stride_x, stride_we, stride_wn, stride_wk, stride_h, stride_act,
    SAVE_H: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    expert, rows, rmask, cols, cmask = _tile(tile_cum_ptr, offsets_ptr, E, I, BM, BN, SEARCH_STEPS)
    if expert >= E:
        return
    x_rows = _rows_of(token_ptr, rows, rmask, True)
    ks = tl.arange(0, BK)
    a_ptrs = x_ptr + x_rows[:, None] * stride_x + ks[None, :]
    w_off = expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk
    bg_ptrs = wg_ptr + w_off
    bu_ptrs = wu_ptr + w_off
    acc_g = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, H, BK):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
            bg = tl.load(bg_ptrs, mask=cmask[None, :], other=0.0)
            bu = tl.load(bu_ptrs, mask=cmask[None, :], other=0.0)
        else:
            kmask = ks < H - k0
            a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            bg = tl.load(bg_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            bu = tl.load(bu_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc_g = _dot(a, bg, acc_g, PRECISION)
        acc_u = _dot(a, bu, acc_u, PRECISION)
        a_ptrs += BK
        bg_ptrs += BK * stride_wk
        bu_ptrs += BK * stride_wk
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    if SAVE_H:
        h_ptrs = h_ptr + rows64[:, None] * stride_h + cols[None, :]
        tl.store(h_ptrs, acc_g.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptrs + I, acc_u.to(h_ptr.dtype.element_ty), mask=mask)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(act_ptr + rows64[:, None] * stride_act + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, token_ptr, b_ptr, c_ptr, offsets_ptr, tile_cum_ptr,
    E, N, K, stride_a, stride_be, stride_bn, stride_bk, stride_c,
    GATHER: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    """C[rows of e] = A[rows of e] @ B[e] with B[e][k, n] = b_ptr[e*stride_be + n*stride_bn + k*stride_bk];
    A's rows optionally gathered by token. The down GEMM, its dgrad and the up dgrad (K = 2I: gate and up
    rows of w_gate_up are one K range) are all this kernel."""
    expert, rows, rmask, cols, cmask = _tile(tile_cum_ptr, offsets_ptr, E, N, BM, BN, SEARCH_STEPS)
    if expert >= E:
        return
    acc = tl.zeros([BM, BN], tl.float32)
    acc = _mma(acc, a_ptr, _rows_of(token_ptr, rows, rmask, GATHER), rmask, stride_a,
               b_ptr + expert.to(tl.int64) * stride_be, cols, cmask, stride_bn, stride_bk, K, BK, EVEN_K, PRECISION)
    tl.store(c_ptr + rows.to(tl.int64)[:, None] * stride_c + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _swiglu_fwd_kernel(
    hg_ptr, hu_ptr, scale_ptr, act_ptr, R, I, stride_hg, stride_hu, stride_act,
    ROW_SCALE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):
    """act = scale[r] * silu(h_gate) * h_up (the shared expert's gate folded into the down GEMM's operand)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    if ROW_SCALE:
        scale = tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    for c0 in range(0, I, BC):
        cols = c0 + tl.arange(0, BC)
        mask = rmask[:, None] & (cols < I)[None, :]
        hg = tl.load(hg_ptr + rows64[:, None] * stride_hg + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        hu = tl.load(hu_ptr + rows64[:, None] * stride_hu + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        act = hg * tl.sigmoid(hg) * hu
        if ROW_SCALE:
            act *= scale[:, None]
        tl.store(act_ptr + rows64[:, None] * stride_act + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    g_ptr, hg_ptr, hu_ptr, scale_ptr, dg_ptr, du_ptr, act_ptr, dscale_ptr,
    R, I, stride_g, stride_hg, stride_hu, stride_dg, stride_du, stride_act,
    ROW_SCALE: tl.constexpr, NEED_DSCALE: tl.constexpr, SAVE_ACT: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr,
):
    """Backward of y = (scale[r] * silu(h_gate) * h_up) @ W^T from g = dy W, per row:

        dscale = <g, silu(h_gate) h_up>,  d_up = scale g silu(h_gate),  d_gate = scale g h_up silu'(h_gate)

    and optionally act = scale silu(h_gate) h_up for W's gradient. Each element is read, then written, by
    the same program, so either d_up or act may overwrite g in place.
    """
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    if ROW_SCALE:
        scale = tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    dscale = tl.zeros([BR], tl.float32)
    for c0 in range(0, I, BC):
        cols = c0 + tl.arange(0, BC)
        mask = rmask[:, None] & (cols < I)[None, :]
        g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        hg = tl.load(hg_ptr + rows64[:, None] * stride_hg + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        hu = tl.load(hu_ptr + rows64[:, None] * stride_hu + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(hg)
        silu = hg * sig
        if NEED_DSCALE:
            dscale += tl.sum(g * silu * hu, 1)
        if ROW_SCALE:
            g *= scale[:, None]
        tl.store(dg_ptr + rows64[:, None] * stride_dg + cols[None, :],
                 (g * hu * sig * (1.0 + hg * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + rows64[:, None] * stride_du + cols[None, :], (g * silu).to(du_ptr.dtype.element_ty),
                 mask=mask)
        if SAVE_ACT:
            act = silu * hu
            if ROW_SCALE:
                act *= scale[:, None]
            tl.store(act_ptr + rows64[:, None] * stride_act + cols[None, :], act.to(act_ptr.dtype.element_ty),
                     mask=mask)
    if NEED_DSCALE:
        tl.store(dscale_ptr + rows, dscale, mask=rmask)


def _wgrad_configs() -> list:
    """The wgrad's tiles are not tied to a row schedule, so they are tuned per (M, N) on first use."""
    if interpreting():
        return [triton.Config(dict(BM=16, BN=16, BK=16), num_warps=1, num_stages=1)]
    return [triton.Config(dict(BM=bm, BN=bn, BK=bk), num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 256, 64, 8, 3),
                                      (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)]]


@triton.autotune(configs=_wgrad_configs(), key=["M", "N", "A_GATHER", "B_GATHER"])
@triton.jit
def _wgrad_kernel(
    a_ptr, a_token_ptr, b_ptr, b_token_ptr, out_ptr, offsets_ptr,
    M, N, stride_a, stride_b, stride_oe, stride_om, stride_on,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """out[e] = A[rows of e]^T @ B[rows of e]: [M, N] per expert, reduced over that expert's slots; A's or
    B's rows may be gathered by token. Both operands are plain loads, so they stream straight to the MMA."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    expert = tl.program_id(2)
    row_start = tl.load(offsets_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)
    mcols = pid_m * BM + tl.arange(0, BM)
    ncols = pid_n * BN + tl.arange(0, BN)
    mmask = mcols < M
    nmask = ncols < N
    acc = tl.zeros([BM, BN], tl.float32)
    for r0 in range(row_start, row_end, BK):
        rows = r0 + tl.arange(0, BK)
        rmask = rows < row_end
        a_rows = _rows_of(a_token_ptr, rows, rmask, A_GATHER)
        a = tl.load(a_ptr + a_rows[:, None] * stride_a + mcols[None, :], mask=rmask[:, None] & mmask[None, :],
                    other=0.0)
        b_rows = _rows_of(b_token_ptr, rows, rmask, B_GATHER)
        b = tl.load(b_ptr + b_rows[:, None] * stride_b + ncols[None, :], mask=rmask[:, None] & nmask[None, :],
                    other=0.0)
        acc = _dot(tl.trans(a), b, acc, PRECISION)
    tl.store(out_ptr + expert.to(tl.int64) * stride_oe + mcols[:, None] * stride_om + ncols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launch configuration


class _Config(NamedTuple):
    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int


def _config(dtype: torch.dtype, fused_pair: bool = False) -> _Config:
    """Tile shapes. The gate-up forward (``fused_pair``) keeps two [BM, BN] fp32 accumulators live, so it
    gets half the columns. BM must be the same for every kernel of one grouping (the row-tile schedule
    depends on it)."""
    if interpreting():
        return _Config(16, 16, 16, 1, 1)
    if dtype == torch.float32:
        return _Config(64, 32 if fused_pair else 64, 32, 4, 2)
    return _Config(128, 64 if fused_pair else 128, 64, 8, 3)


def _precision(dtype: torch.dtype) -> str:
    """fp32 operands get IEEE dots (tests compare at fp32 tolerance); 16-bit ones the tensor cores."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if interpreting() else "native"


class _Groups(NamedTuple):
    """Slots of each expert: token [slots] (slot -> token), offsets [E+1] int32, counts [E]."""
    token: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def of(cls, plan: RoutingPlan) -> "_Groups":
        return cls(plan.sorted_token, plan.offsets, plan.tokens_per_expert)

    def tile_grid(self, bm: int) -> tuple[torch.Tensor, int]:
        tile_cum = torch.cumsum((self.counts + (bm - 1)) // bm, 0, dtype=torch.int32)
        return tile_cum, triton.cdiv(self.token.numel(), bm) + self.counts.numel()


def _search_steps(num_experts: int) -> int:
    return max(1, num_experts.bit_length())


def _grouped_gemm(a, groups: _Groups, gather: bool, b, b_strides, out, n: int, k: int):
    """out[slot] = a[token of slot if gather else slot] @ B[expert of slot], B[e][k, n] at
    ``b[e].data_ptr() + n * b_strides[0] + k * b_strides[1]``."""
    if groups.token.numel() == 0:
        return
    cfg = _config(a.dtype)
    tile_cum, m_tiles = groups.tile_grid(cfg.bm)
    _grouped_gemm_kernel[(triton.cdiv(n, cfg.bn), m_tiles)](
        a, groups.token, b, out, groups.offsets, tile_cum, groups.counts.numel(), n, k, a.stride(0), b.stride(0),
        *b_strides, out.stride(0), GATHER=gather, EVEN_K=k % cfg.bk == 0, PRECISION=_precision(a.dtype), BM=cfg.bm,
        BN=cfg.bn, BK=cfg.bk, SEARCH_STEPS=_search_steps(groups.counts.numel()), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)


_SWIGLU_ROWS, _SWIGLU_COLS = 8, 256  # memory-bound elementwise tiles: 16 elements per thread at 4 warps


def _rows_grid(rows: int) -> tuple[int]:
    return (triton.cdiv(rows, _SWIGLU_ROWS),)


def _swiglu_backward_rows(g, h_gate, h_up, scale, d_gate, d_up, act=None, need_dscale=False):
    """Run _swiglu_bwd_kernel over all rows; returns dscale [rows] fp32 if asked for."""
    rows, inter = g.shape
    dscale = torch.empty(rows, device=g.device, dtype=torch.float32) if need_dscale else None
    if rows:
        _swiglu_bwd_kernel[_rows_grid(rows)](
            g, h_gate, h_up, scale if scale is not None else g, d_gate, d_up, act if act is not None else g,
            dscale if need_dscale else g, rows, inter, g.stride(0), h_gate.stride(0), h_up.stride(0),
            d_gate.stride(0), d_up.stride(0), act.stride(0) if act is not None else 0, ROW_SCALE=scale is not None,
            NEED_DSCALE=need_dscale, SAVE_ACT=act is not None, BR=_SWIGLU_ROWS, BC=_SWIGLU_COLS, num_warps=4)
    return dscale


def _wgrad(a, a_token, b, b_token, out, groups: _Groups):
    """out[e] = a[rows of e]^T @ b[rows of e], rows gathered through a_token / b_token where given."""
    num_experts, m, n = out.shape
    _wgrad_kernel[lambda meta: (triton.cdiv(n, meta["BN"]), triton.cdiv(m, meta["BM"]), num_experts)](
        a, a_token if a_token is not None else a, b, b_token if b_token is not None else b, out, groups.offsets,
        m, n, a.stride(0), b.stride(0), out.stride(0), out.stride(1), out.stride(2), A_GATHER=a_token is not None,
        B_GATHER=b_token is not None, PRECISION=_precision(a.dtype))


def _routed_forward(x, groups: _Groups, w_gate_up, w_down, save_h):
    """Gate-up GEMM (gather + SwiGLU epilogue), then the down GEMM: returns (y [slots, H], h [slots, 2I] or None)."""
    num_experts, hidden, inter = w_down.shape
    slots = groups.token.numel()
    dev, dtype = x.device, x.dtype
    h = torch.empty(slots, 2 * inter, device=dev, dtype=dtype) if save_h else None
    act = torch.empty(slots, inter, device=dev, dtype=dtype)
    y = torch.empty(slots, hidden, device=dev, dtype=dtype)
    if slots == 0:
        return y, h
    cfg = _config(dtype, fused_pair=True)
    tile_cum, m_tiles = groups.tile_grid(cfg.bm)
    w_gate, w_up = w_gate_up[:, :inter], w_gate_up[:, inter:]
    _gate_up_fwd_kernel[(triton.cdiv(inter, cfg.bn), m_tiles)](
        x, groups.token, w_gate, w_up, h if save_h else act, act, groups.offsets, tile_cum, num_experts, hidden,
        inter, x.stride(0), w_gate.stride(0), w_gate.stride(1), w_gate.stride(2), h.stride(0) if save_h else 0,
        act.stride(0), SAVE_H=save_h, EVEN_K=hidden % cfg.bk == 0, PRECISION=_precision(dtype), BM=cfg.bm,
        BN=cfg.bn, BK=cfg.bk, SEARCH_STEPS=_search_steps(num_experts), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    _grouped_gemm(act, groups, False, w_down, (w_down.stride(1), w_down.stride(2)), y, hidden, inter)
    return y, h


def _routed_backward(dout, x, groups: _Groups, w_gate_up, w_down, h, slot_weight, need_dw):
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
    # inside the wgrad's loads, the two wgrads took 1.5x as long: notes/experts.md, version 6).
    d_gate, d_up = dh[:, :inter], dh[:, inter:]
    act = torch.empty(slots, inter, device=dev, dtype=dtype)
    _grouped_gemm(dout, groups, True, w_down, (w_down.stride(2), w_down.stride(1)), d_up, inter, hidden)
    dw_slot = _swiglu_backward_rows(d_up, h[:, :inter], h[:, inter:], slot_weight, d_gate, d_up, act=act,
                                    need_dscale=need_dw)
    # Weight gradients; an expert with no slots gets zeros (the loop over its rows is empty).
    _wgrad(dout, groups.token, act, None, dw_down, groups)
    del act
    dx_slot = torch.empty(slots, hidden, device=dev, dtype=dtype)
    dw_gate_up = torch.empty(num_experts, 2 * inter, hidden, device=dev, dtype=w_down.dtype)
    _grouped_gemm(dh, groups, False, w_gate_up, (w_gate_up.stride(2), w_gate_up.stride(1)), dx_slot, hidden,
                  2 * inter)
    _wgrad(dh, None, x, groups.token, dw_gate_up, groups)
    return dx_slot, dw_gate_up, dw_down, dw_slot


# ----------------------------------------------------------------------------------------------------------
# Autograd


class _RoutedExperts(torch.autograd.Function):
    """out = residual + combine_w(grouped SwiGLU(x[sorted_token])), weights applied in the combine."""

    @staticmethod
    def forward(ctx, x, weights, w_gate_up, w_down, residual, plan: RoutingPlan):
        y, h = _routed_forward(x, _Groups.of(plan), w_gate_up, w_down, save_h=any(ctx.needs_input_grad[:4]))
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
            dout, x, _Groups.of(plan), w_gate_up, w_down, h, slot_weight, need_dw=ctx.needs_input_grad[1])
        dx = combine(dx_slot, plan.slot_of_pair)
        dweights = dw_slot[plan.slot_of_pair.long()].to(weights.dtype) if dw_slot is not None else None
        return dx, dweights, dw_gate_up, dw_down, dout if ctx.has_residual else None, None


class _SharedExpert(torch.autograd.Function):
    """out[t] = gate[t] * SwiGLU(x[t]) for an always-on expert.

    Its GEMMs are dense, so they go to the vendor GEMM (cuBLAS on GPUs), which runs them faster than a
    grouped kernel with one group; the SwiGLU, the gate and their backward are fused into one pass each
    (the gate is folded into the down GEMM's operand), so no [T, S] intermediate beyond h is kept.
    """

    @staticmethod
    def forward(ctx, x, gate, w_gate, w_up, w_down):
        with torch.autocast(x.device.type, enabled=False):  # one dtype throughout, as in the grouped kernels
            h_gate, h_up = x @ w_gate.t(), x @ w_up.t()
            act = torch.empty_like(h_gate)
            if x.shape[0]:
                _swiglu_fwd_kernel[_rows_grid(x.shape[0])](
                    h_gate, h_up, gate if gate is not None else h_gate, act, x.shape[0], h_gate.shape[1],
                    h_gate.stride(0), h_up.stride(0), act.stride(0), ROW_SCALE=gate is not None, BR=_SWIGLU_ROWS,
                    BC=_SWIGLU_COLS, num_warps=4)
            out = act @ w_down.t()
        ctx.save_for_backward(x, gate, w_gate, w_up, w_down, h_gate, h_up)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, gate, w_gate, w_up, w_down, h_gate, h_up = ctx.saved_tensors
        need_x, need_gate, need_wg, need_wu, need_wd = ctx.needs_input_grad
        g = dout @ w_down
        d_gate, d_up = torch.empty_like(g), torch.empty_like(g)
        # act (gate-scaled, for dW_down) overwrites g in place: g is read first, element by element.
        dgate = _swiglu_backward_rows(g, h_gate, h_up, gate, d_gate, d_up, act=g, need_dscale=need_gate)
        dx = torch.addmm(d_gate @ w_gate, d_up, w_up) if need_x else None
        return (dx, dgate, d_gate.t() @ x if need_wg else None,
                d_up.t() @ x if need_wu else None, dout.t() @ g if need_wd else None)


# ----------------------------------------------------------------------------------------------------------
# References (the oracles and the CPU path): the transformers experts loop, line for line


def _swiglu(x, w_gate, w_up, w_down):
    return torch.nn.functional.linear(
        torch.nn.functional.silu(torch.nn.functional.linear(x, w_gate)) * torch.nn.functional.linear(x, w_up),
        w_down)


def expert_mlp_reference(x, weights, expert_ids, w_gate_up, w_down, residual=None):
    """transformers' eager experts: per hit expert, SwiGLU MLP of its tokens times their weights, index_add."""
    out = torch.zeros_like(x) if residual is None else residual.clone()
    inter = w_down.shape[2]
    for expert in torch.unique(expert_ids).tolist():
        token, pos = torch.where(expert_ids == expert)
        y = _swiglu(x[token], w_gate_up[expert, :inter], w_gate_up[expert, inter:], w_down[expert])
        out.index_add_(0, token, (y * weights[token, pos, None]).to(out.dtype))
    return out


def shared_expert_mlp_reference(x, w_gate, w_up, w_down, gate=None):
    y = _swiglu(x, w_gate, w_up, w_down)
    return y if gate is None else gate * y


def grouped_mlp_reference(x, expert_of_row, w_gate_up, w_down):
    out = torch.zeros_like(x)
    inter = w_down.shape[2]
    for expert in torch.unique(expert_of_row).tolist():
        rows = torch.where(expert_of_row == expert)[0]
        out[rows] = _swiglu(x[rows], w_gate_up[expert, :inter], w_gate_up[expert, inter:], w_down[expert])
    return out


# ----------------------------------------------------------------------------------------------------------
# Public API


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
    if plan is None:
        plan = plan_routing(expert_ids, w_down.shape[0])
    return _RoutedExperts.apply(_rowmajor(x), weights, w_gate_up, w_down, residual, plan)


def shared_expert_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                      gate: torch.Tensor | None = None) -> torch.Tensor:
    """Shared (always-on) SwiGLU expert: dense GEMMs (cuBLAS on GPUs) around fused SwiGLU/gate passes.

    Args: x [T, H]; w_gate, w_up [S, H]; w_down [H, S] (nn.Linear layouts); gate: optional [T, 1] per-token
    factor (e.g. Qwen2-MoE's sigmoid(shared_expert_gate(x))). Returns [T, H] = gate * MLP(x).
    """
    check(w_gate.dim() == 2 and w_gate.shape == w_up.shape and w_down.shape == w_gate.shape[::-1],
          f"shared_expert_mlp: w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} must be [S, H] and "
          f"w_down {tuple(w_down.shape)} [H, S]")
    check(x.dim() == 2 and x.shape[1] == w_gate.shape[1],
          f"shared_expert_mlp: x {tuple(x.shape)} must be [tokens, {w_gate.shape[1]}]")
    check(x.dtype == w_gate.dtype == w_up.dtype == w_down.dtype,
          "shared_expert_mlp: x and the weights must share a dtype; cast them or run under torch.autocast")
    if gate is not None:
        check(gate.shape == (x.shape[0], 1), f"shared_expert_mlp: gate must be [T, 1], got {tuple(gate.shape)}")
    if not use_triton(x):
        return shared_expert_mlp_reference(x, w_gate, w_up, w_down, gate)
    if gate is not None:
        gate = gate.float().contiguous().view(-1)
    return _SharedExpert.apply(x, gate, w_gate, w_up, w_down)


def grouped_mlp(x: torch.Tensor, expert_of_row: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor) -> torch.Tensor:
    """One expert per row, unweighted: y[r] = MLP_{expert_of_row[r]}(x[r]) -> [R, H].

    This is what an expert owner runs on the hidden states it received from all parties.
    """
    _check_experts("grouped_mlp", x, w_gate_up, w_down)
    check(expert_of_row.shape == (x.shape[0],),
          f"grouped_mlp: expert_of_row must be [{x.shape[0]}], got {tuple(expert_of_row.shape)}")
    if not use_triton(x):
        return grouped_mlp_reference(x, expert_of_row, w_gate_up, w_down)
    plan = plan_routing(expert_of_row.view(-1, 1), w_down.shape[0])
    return _RoutedExperts.apply(_rowmajor(x), None, w_gate_up, w_down, None, plan)
