"""Grouped GEMMs over ragged expert groups: the core that every routed-expert GEMM (routed_experts.py) runs on.

The rows of the expert-sorted order (slots, see permute.py) come in one group per expert: rows
``offsets[e]:offsets[e+1]`` use expert e's weights. A row tile never mixes experts, so empty experts cost nothing
and groups need not be block multiples. No launch waits on the device for the number of row tiles: a grid is
sized by an upper bound on it (surplus programs exit at once), or a persistent kernel reads it on the device.

This file owns what more than one grouped kernel uses: the row-tile schedule (``Groups``, ``_find_group``,
``output_tile``), the K loop (``mma``), the plain grouped GEMM (``grouped_gemm``: the down GEMM, both dgrads;
persistent) and the per-expert weight-gradient GEMM (``wgrad``), with their tile configurations. A kernel that
fuses an op's own prologue or epilogue (the gate-up GEMM with its gather and SwiGLU) lives with that op and
calls ``output_tile`` / ``mma`` from here. A unit of its own (any grouped GEMM over a RoutingPlan), and apart
from routed_experts.py so that each reads at once. Nothing here is public API (hence the underscore, as for
_runtime.py).

Operands bf16/fp16 (fp32 for tests) with fp32 accumulation. What is never gathered (the weights, and rows read in
slot order) is read through TMA descriptors where its layout allows (16-byte aligned, K a multiple of the K
tile), else by pointer loads; gathered rows by pointer loads (Hopper's TMA cannot gather rows), which on Hopper the
weight gradient issues from warps of their own (_wgrad_hopper.py).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import _wgrad_hopper
from ._runtime import interpreting, programs_per_device
from .permute import RoutingPlan

__all__ = ["TileConfig", "tile_config", "precision", "Groups", "output_tile", "rows_of", "dot", "mma",
           "tma_descriptor", "grouped_gemm", "wgrad"]


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
def dot(a, b, acc, PRECISION: tl.constexpr):
    if PRECISION == "upcast":  # the triton 3.6 interpreter multiplies bf16 operands wrongly; fp32 is exact
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if PRECISION == "ieee":
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def output_tile(row_tile, col_tile, tile_cum_ptr, offsets_ptr, E, N, BM: tl.constexpr, BN: tl.constexpr,
                SEARCH_STEPS: tl.constexpr):
    """Output tile (row tile, column tile): (expert, first row, rows, row mask, first column, columns, column
    mask); expert == E: no work."""
    expert, row_start, row_end = _find_group(row_tile, tile_cum_ptr, offsets_ptr, E, BM, SEARCH_STEPS)
    rows = row_start + tl.arange(0, BM)
    col_start = col_tile * BN
    cols = col_start + tl.arange(0, BN)
    return expert, row_start, rows, rows < row_end, col_start, cols, cols < N


@triton.jit
def rows_of(token_ptr, rows, rmask, GATHER: tl.constexpr):
    """The operand rows that slots ``rows`` read: their tokens' rows when gathering, else the slots' own."""
    if GATHER:
        return tl.load(token_ptr + rows, mask=rmask, other=0).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def mma(acc, a_ptr, a_rows, a_mask, stride_a, b_ptr, cols, cmask, stride_bn, stride_bk, K,
        BK: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc += A[a_rows, :K] @ B[:K, cols], where B[k, n] = b_ptr[n * stride_bn + k * stride_bk].

    ``cols`` need not be contiguous: each is one row of a [N, K] weight, read along K (the gate-up GEMM
    passes gate and up rows side by side)."""
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
        acc = dot(a, b, acc, PRECISION)
        a_ptrs += BK
        b_ptrs += BK * stride_bk
    return acc


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, a_desc, token_ptr, b_ptr, b_desc, c_ptr, offsets_ptr, tile_cum_ptr,
    E, N, K, stride_a, stride_be, stride_bn, stride_bk, stride_c,
    GATHER: tl.constexpr, TMA: tl.constexpr, B_NK: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SEARCH_STEPS: tl.constexpr, PROGRAMS: tl.constexpr,
):
    """C[rows of e] = A[rows of e] @ B[e] with B[e][k, n] = b_ptr[e*stride_be + n*stride_bn + k*stride_bk];
    A's rows optionally gathered by token. The down GEMM, its dgrad and the up dgrad (K = 2I: gate and up
    rows of w_gate_up are one K range) are all this kernel.

    TMA: B is read through b_desc, rows e*N.. of an [E*N, K] descriptor (B_NK) or rows e*K.. of an [E*K, N]
    one, and A, unless gathered, through a_desc. A tile that runs past its expert's rows or columns reads the
    next expert's, which reach only masked outputs; K % BK == 0, so no K step crosses into the next expert's
    rows of an [E*K, N] descriptor.

    Persistent: PROGRAMS programs (one per SM) walk the (row tile, column tile) pairs, a row tile's column tiles
    one after another (they share its A rows in L2). The loop is flattened into the K loop (``flatten``), so the
    pipeline loads the next tile's first K steps during this tile's epilogue: the short-K GEMMs gain most (the
    7B shape's down GEMM, K = 256, 4 K steps a tile: 1.2x; notes/experts.md, version 9). The tile count is read
    on the device (tile_cum), so the launch needs no sync. PROGRAMS, compile-time, is the SM count whatever the
    rows (programs past the tiles return at once): a grid that followed the row count compiled the kernel again at
    each new count, and a host's received rows change every step (notes/experts.md, entry 17)."""
    col_tiles = tl.cdiv(N, BN)
    tiles = tl.load(tile_cum_ptr + E - 1) * col_tiles
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
        expert, row0, rows, rmask, n0, cols, cmask = output_tile(tile // col_tiles, tile % col_tiles, tile_cum_ptr,
                                                                 offsets_ptr, E, N, BM, BN, SEARCH_STEPS)
        acc = tl.zeros([BM, BN], tl.float32)
        a_rows = rows_of(token_ptr, rows, rmask, GATHER)
        if TMA:
            a_ptrs = a_ptr + a_rows[:, None] * stride_a + tl.arange(0, BK)[None, :]
            for k0 in range(0, K, BK):
                if GATHER:
                    a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
                    a_ptrs += BK
                else:
                    a = a_desc.load([row0, k0])
                if B_NK:
                    b = tl.trans(b_desc.load([expert * N + n0, k0]))
                else:
                    b = b_desc.load([expert * K + k0, n0])
                acc = dot(a, b, acc, PRECISION)
        else:
            acc = mma(acc, a_ptr, a_rows, rmask, stride_a, b_ptr + expert.to(tl.int64) * stride_be, cols, cmask,
                      stride_bn, stride_bk, K, BK, EVEN_K, PRECISION)
        tl.store(c_ptr + rows.to(tl.int64)[:, None] * stride_c + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


def _set_wgrad_blocks(nargs):
    """A config's tiles, for the TMA descriptors that wgrad made with placeholder blocks."""
    for name, cols in (("a_desc", nargs["BM"]), ("b_desc", nargs["BN"])):
        if isinstance(nargs[name], TensorDescriptor):
            nargs[name].block_shape = [nargs["BK"], cols]


def _wgrad_config(bm, bn, bk, num_warps, num_stages) -> triton.Config:
    return triton.Config(dict(BM=bm, BN=bn, BK=bk), num_warps=num_warps, num_stages=num_stages,
                         pre_hook=_set_wgrad_blocks)


def _wgrad_configs() -> list:
    """The wgrad's tiles are not tied to a row schedule, so they are tuned per (M, N) on first use. Deep pipelines
    of short K steps: a gathered operand is read by pointer loads, which need more stages in flight than TMA."""
    if interpreting():
        return [_wgrad_config(16, 16, 16, 1, 1)]
    return [_wgrad_config(*tile) for tile in [(128, 128, 32, 4, 5), (128, 256, 32, 8, 6), (128, 256, 32, 8, 7),
                                              (256, 128, 32, 8, 5), (256, 128, 32, 8, 7)]]


def _wgrad_candidates(configs, named_args, **kwargs) -> list:
    """The tiles worth tuning for this call. The wide side of a tile goes to the operand read by TMA: the same tile
    turned the other way, 256 columns of the gathered operand, ran 14-50% slower (notes/experts.md, entry 12). fp32
    operands (tests) get IEEE dots, for which the 16-bit tiles take up to a minute each to compile: they run
    tile_config's fp32 tile untuned."""
    if kwargs["PRECISION"] == "ieee":
        return [_wgrad_config(*tile_config(torch.float32))]
    return [c for c in configs if not (kwargs["A_GATHER"] and c.kwargs["BM"] > 128)
            and not (kwargs["B_GATHER"] and c.kwargs["BN"] > 128)]


@triton.jit
def _wgrad_rows(ptr, desc, token_ptr, r0, row_end, c0, C, stride, GATHER: tl.constexpr, TMA: tl.constexpr,
                FULL: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    """One operand's [BK rows from r0, BC columns from c0] tile of the wgrad: TMA for a full block of plain rows,
    else pointer loads (rows past row_end read as zeros: a descriptor would read the next expert's rows)."""
    if TMA and FULL:
        return desc.load([r0, c0])
    rows = r0 + tl.arange(0, BK)
    cols = c0 + tl.arange(0, BC)
    rmask = rows < row_end
    return tl.load(ptr + rows_of(token_ptr, rows, rmask, GATHER)[:, None] * stride + cols[None, :],
                   mask=rmask[:, None] & (cols < C)[None, :], other=0.0)


@triton.autotune(configs=_wgrad_configs(), key=["M", "N", "A_GATHER", "B_GATHER", "A_TMA", "B_TMA"],
                 prune_configs_by=dict(early_config_prune=_wgrad_candidates))
@triton.jit
def _wgrad_kernel(
    a_ptr, a_desc, a_token_ptr, b_ptr, b_desc, b_token_ptr, out_ptr, offsets_ptr,
    M, N, stride_a, stride_b, stride_oe, stride_om, stride_on,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, A_TMA: tl.constexpr, B_TMA: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """out[e] = A[rows of e]^T @ B[rows of e]: [M, N] per expert, reduced over that expert's slots; A's or
    B's rows may be gathered by token, and a plain operand is read by TMA (A_TMA / B_TMA) in the full blocks
    of rows. Both operands are plain loads, so they stream straight to the MMA."""
    m0 = tl.program_id(1) * BM
    n0 = tl.program_id(0) * BN
    expert = tl.program_id(2)
    row_start = tl.load(offsets_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)
    acc = tl.zeros([BM, BN], tl.float32)
    full_end = row_start + (row_end - row_start) // BK * BK
    for r0 in range(row_start, full_end, BK):
        a = _wgrad_rows(a_ptr, a_desc, a_token_ptr, r0, row_end, m0, M, stride_a, A_GATHER, A_TMA, True, BK, BM)
        b = _wgrad_rows(b_ptr, b_desc, b_token_ptr, r0, row_end, n0, N, stride_b, B_GATHER, B_TMA, True, BK, BN)
        acc = dot(tl.trans(a), b, acc, PRECISION)
    if full_end < row_end:
        a = _wgrad_rows(a_ptr, a_desc, a_token_ptr, full_end, row_end, m0, M, stride_a, A_GATHER, A_TMA, False, BK,
                        BM)
        b = _wgrad_rows(b_ptr, b_desc, b_token_ptr, full_end, row_end, n0, N, stride_b, B_GATHER, B_TMA, False, BK,
                        BN)
        acc = dot(tl.trans(a), b, acc, PRECISION)
    mcols = m0 + tl.arange(0, BM)
    ncols = n0 + tl.arange(0, BN)
    mmask = mcols < M
    nmask = ncols < N
    tl.store(out_ptr + expert.to(tl.int64) * stride_oe + mcols[:, None] * stride_om + ncols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


class TileConfig(NamedTuple):
    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int


def tile_config(dtype: torch.dtype) -> TileConfig:
    """Tiles of the row-scheduled grouped GEMMs (all but the wgrad). One config for all of them: BM fixes the
    row-tile schedule of a grouping, and the gate-up GEMM's BN-wide MMA covers BN/2 gate and BN/2 up columns."""
    if interpreting():
        return TileConfig(16, 16, 16, 1, 1)
    if dtype == torch.float32:
        return TileConfig(64, 64, 32, 4, 2)
    return TileConfig(128, 256, 64, 8, 3)


def precision(dtype: torch.dtype) -> str:
    """fp32 operands get IEEE dots (tests compare at fp32 tolerance); 16-bit ones the tensor cores."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if interpreting() else "native"


class Groups(NamedTuple):
    """The slots of each expert and their row-tile schedule, made once per routing and pass (forward or
    backward) and shared by every grouped GEMM of that pass: all use ``tile.bm``, so one cumsum serves them."""
    token: torch.Tensor  # [slots] int32: slot -> token
    offsets: torch.Tensor  # [E + 1] int32: first slot of each expert
    counts: torch.Tensor  # [E]: slots of each expert
    tile: TileConfig
    tile_cum: torch.Tensor  # [E] int32: row tiles of experts 0..e

    @classmethod
    def of(cls, plan: RoutingPlan, dtype: torch.dtype, tile: TileConfig | None = None) -> "Groups":
        tile = tile or tile_config(dtype)
        counts = plan.tokens_per_expert
        tile_cum = torch.cumsum((counts + (tile.bm - 1)) // tile.bm, 0, dtype=torch.int32)
        return cls(plan.sorted_token, plan.offsets, counts, tile, tile_cum)

    @property
    def num_experts(self) -> int:
        return self.counts.numel()

    @property
    def search_steps(self) -> int:
        """Binary-search steps of _find_group over the experts."""
        return max(1, self.num_experts.bit_length())


def tma_descriptor(t: torch.Tensor, shape: list[int], strides: list[int], block: list[int]):
    """A TMA descriptor over ``t`` read as ``shape`` with ``strides`` (the last 1), or None where TMA cannot read it
    (unaligned base or stride: TMA wants 16 bytes)."""
    nbytes = t.element_size()
    if t.data_ptr() % 16 or any(stride * nbytes % 16 for stride in strides[:-1]):
        return None
    return TensorDescriptor(t, shape, strides, block)


def grouped_gemm(a, groups: Groups, gather: bool, b, b_strides, out, n: int, k: int, tma: bool = True):
    """out[slot] = a[token of slot if gather else slot] @ B[expert of slot], B[e][k, n] at
    ``b[e].data_ptr() + n * b_strides[0] + k * b_strides[1]``. Read by TMA where the layout allows (``tma``)."""
    if groups.token.numel() == 0:
        return
    cfg = groups.tile
    stride_bn, stride_bk = b_strides
    b_nk = stride_bk == 1  # B[e] is [N, K], K contiguous (else [K, N], N contiguous, for TMA)
    b_desc = a_desc = None
    if tma and k % cfg.bk == 0:
        if b_nk and b.stride(0) == n * stride_bn:
            b_desc = tma_descriptor(b, [groups.num_experts * n, k], [stride_bn, 1], [cfg.bn, cfg.bk])
        elif stride_bn == 1 and b.stride(0) == k * stride_bk:
            b_desc = tma_descriptor(b, [groups.num_experts * k, n], [stride_bk, 1], [cfg.bk, cfg.bn])
        if not gather and a.stride(1) == 1:
            a_desc = tma_descriptor(a, [a.shape[0], k], [a.stride(0), 1], [cfg.bm, cfg.bk])
    use_tma = b_desc is not None and (gather or a_desc is not None)
    programs = programs_per_device(a.device)
    _grouped_gemm_kernel[(programs,)](
        a, a_desc if use_tma and not gather else a, groups.token, b, b_desc if use_tma else b, out, groups.offsets,
        groups.tile_cum, groups.num_experts, n, k, a.stride(0), b.stride(0), stride_bn, stride_bk, out.stride(0),
        GATHER=gather, TMA=use_tma, B_NK=b_nk, EVEN_K=k % cfg.bk == 0, PRECISION=precision(a.dtype), BM=cfg.bm,
        BN=cfg.bn, BK=cfg.bk, SEARCH_STEPS=groups.search_steps, PROGRAMS=programs, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)


def wgrad(a, a_token, b, b_token, out, groups: Groups, tma: bool = True):
    """out[e] = a[rows of e]^T @ b[rows of e], rows gathered through a_token / b_token where given; an expert
    with no slots gets zeros (the loop over its rows is empty). A plain operand is read by TMA where its layout
    allows (``tma``); on Hopper, bf16 or fp16, one operand gathered, the warp-specialised kernel runs it
    (_wgrad_hopper.py)."""
    gathered, token, plain = (a, a_token, b) if a_token is not None else (b, b_token, a)
    if tma and token is not None and _wgrad_hopper.supports(gathered, plain):
        return _wgrad_hopper.wgrad(gathered, token, plain, out, groups.offsets, transposed=a_token is None)
    num_experts, m, n = out.shape
    # Placeholder blocks: the tuned config sets them (_set_wgrad_blocks).
    a_desc = tma_descriptor(a, [a.shape[0], m], [a.stride(0), 1], [1, 1]) \
        if tma and a_token is None and a.stride(1) == 1 else None
    b_desc = tma_descriptor(b, [b.shape[0], n], [b.stride(0), 1], [1, 1]) \
        if tma and b_token is None and b.stride(1) == 1 else None
    _wgrad_kernel[lambda meta: (triton.cdiv(n, meta["BN"]), triton.cdiv(m, meta["BM"]), num_experts)](
        a, a_desc if a_desc is not None else a, a_token if a_token is not None else a, b,
        b_desc if b_desc is not None else b, b_token if b_token is not None else b, out, groups.offsets, m, n,
        a.stride(0), b.stride(0), out.stride(0), out.stride(1), out.stride(2), A_GATHER=a_token is not None,
        B_GATHER=b_token is not None, A_TMA=a_desc is not None, B_TMA=b_desc is not None,
        PRECISION=precision(a.dtype))
