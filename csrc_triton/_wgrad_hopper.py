"""The grouped weight gradient with one operand gathered by token, warp-specialised for Hopper (Gluon).

out[e] = G[token[rows of e]]^T @ P[rows of e] (or its transpose): G the gathered operand, P the plain one. A load
partition of four warps fills a ring of shared stages: P's full blocks of rows by TMA, the expert's last, partial
block by masked cp.async (a TMA box would read the next expert's rows), and G's gathered rows by cp.async, 16 bytes
a thread, the next block's tokens loaded a step ahead; each load thread arrives on the stage's barrier when its
copies land. The MMA warps wait for a stage, run async wgmma and free the stage their previous MMA read. Persistent:
a program an SM walks the experts' tiles, its load warps filling the ring with the next tile's rows while its MMA
warps store the last one. The copies and their address arithmetic stay off the MMA warps' issue slots: with every
warp both loading and multiplying, _grouped_gemm's wgrad issued 3-4x the instructions of SonicMoE's
(notes/experts.md, entries 22-24).
sm_90 and 16-bit floats only (``supports``); _grouped_gemm's Triton kernel runs the rest, the interpreter included.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                             warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ._runtime import programs_per_device

LOAD_WARPS = gl.constexpr(4)
# 192 KB of stages and, live beside them while a tile is stored, the store's layout conversion: 224 KB of the 227 KB
# an SM has (notes/experts.md, entry 24); a 128 x 256 accumulator on two warpgroups
BM, BN, BK, STAGES, MMA_WARPS = 128, 256, 64, 4, 8
LOAD_REGS = gl.constexpr(88)  # the load warps' registers a thread; the rest of MAX_REGS goes to the MMA warps
MAX_REGS = 168  # a thread, at launch: 12 warps use the whole register file


@gluon.constexpr_function
def _acc_layout(block_n, num_warps):
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, block_n, 16])


@gluon.constexpr_function
def _copy_layout(cols, warps):
    """Each thread 16 bytes of a row (8 elements), a warp's threads along the rows."""
    per_row = min(cols // 8, 32)
    return gl.BlockedLayout([1, 8], [32 // per_row, per_row], [warps, 1], [1, 0])


@gluon.constexpr_function
def _store_layout(rows, transposed, warps):
    """8 elements a thread along whichever of the tile's dimensions is contiguous in memory."""
    if transposed:
        return gl.BlockedLayout([8, 1], [rows // 8, 32 * 8 // rows], [1, warps], [0, 1])
    return gl.BlockedLayout([1, 8], [1, 32], [warps, 1], [1, 0])


@gluon.jit
def _tile(t, offsets_ptr, tiles_m, tiles_n, BM: gl.constexpr, BN: gl.constexpr):
    """Tile t's expert, its rows' range and its corner: n fastest, then m, then the expert, so that the programs at
    work at once share an expert or two and read its rows through L2."""
    expert = t // (tiles_m * tiles_n)
    m0 = (t // tiles_n) % tiles_m * BM
    n0 = t % tiles_n * BN
    return expert, gl.load(offsets_ptr + expert), gl.load(offsets_ptr + expert + 1), m0, n0


@gluon.jit
def _mma_partition(g_bufs, p_bufs, ready, empty, out_ptr, offsets_ptr, M, N, stride_oe, stride_om, stride_on,
                   tiles, tiles_m, tiles_n, TRANSPOSED: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                   BK: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    store: gl.constexpr = _store_layout(BM, TRANSPOSED, num_warps)  # dW_gate_up is stored transposed
    step = 0  # over all of this program's tiles: the ring's stage and phase
    for t in range(gl.program_id(0), tiles, gl.num_programs(0)):
        expert, row0, row_end, m0, n0 = _tile(t, offsets_ptr, tiles_m, tiles_n, BM, BN)
        acc = gl.zeros((BM, BN), gl.float32, _acc_layout(BN, num_warps))
        for i in range(gl.cdiv(row_end - row0, BK)):
            s = step % STAGES
            mbarrier.wait(ready.index(s), (step // STAGES) & 1)
            fence_async_shared()  # the rows came by cp.async, which writes through the generic proxy; wgmma: async
            acc = warpgroup_mma(g_bufs.index(s).permute((1, 0)), p_bufs.index(s), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), pred=i > 0)  # the previous MMA's stage
            step += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), pred=row_end > row0)  # the tile's last stage
        # The load warps fill the ring with the next tile's rows while these warps store this one.
        rows = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, store))
        cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, store))
        ptrs = out_ptr + expert.to(gl.int64) * stride_oe + rows[:, None] * stride_om + cols[None, :] * stride_on
        gl.store(ptrs, gl.convert_layout(acc.to(out_ptr.dtype.element_ty), store),
                 mask=(rows < M)[:, None] & (cols < N)[None, :])
    return ()


@gluon.jit
def _load_partition(g_ptr, token_ptr, p_ptr, p_desc, g_bufs, p_bufs, ready, empty, offsets_ptr, M, N, stride_g,
                    stride_p, tiles, tiles_m, tiles_n, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                    STAGES: gl.constexpr):
    g_layout: gl.constexpr = _copy_layout(BM, LOAD_WARPS)
    p_layout: gl.constexpr = _copy_layout(BN, LOAD_WARPS)
    step = 0
    for t in range(gl.program_id(0), tiles, gl.num_programs(0)):
        expert, row0, row_end, m0, n0 = _tile(t, offsets_ptr, tiles_m, tiles_n, BM, BN)
        k = row0 + gl.arange(0, BK, layout=gl.SliceLayout(1, g_layout))
        g_cols = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, g_layout))
        token = gl.load(token_ptr + k, mask=k < row_end, other=0)
        for i in range(gl.cdiv(row_end - row0, BK)):
            s = step % STAGES
            r0 = row0 + i * BK
            mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)
            if r0 + BK <= row_end:
                mbarrier.expect(ready.index(s), BK * BN * p_desc.dtype.primitive_bitwidth // 8)
                tma.async_copy_global_to_shared(p_desc, [r0, n0], ready.index(s), p_bufs.index(s))
            else:
                p_rows = r0 + gl.arange(0, BK, layout=gl.SliceLayout(1, p_layout))
                p_cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, p_layout))
                async_copy.async_copy_global_to_shared(
                    p_bufs.index(s), p_ptr + p_rows.to(gl.int64)[:, None] * stride_p + p_cols[None, :],
                    mask=(p_rows < row_end)[:, None] & (p_cols < N)[None, :])
                mbarrier.arrive(ready.index(s))  # in the TMA's place
            async_copy.async_copy_global_to_shared(
                g_bufs.index(s), g_ptr + token.to(gl.int64)[:, None] * stride_g + g_cols[None, :],
                mask=(k < row_end)[:, None] & (g_cols < M)[None, :])
            async_copy.mbarrier_arrive(ready.index(s), increment_count=False)  # once this thread's copies landed
            k += BK
            token = gl.load(token_ptr + k, mask=k < row_end, other=0)
            step += 1


@gluon.jit
def _wgrad_kernel(g_ptr, token_ptr, p_ptr, p_desc, out_ptr, offsets_ptr, M, N, stride_g, stride_p, stride_oe,
                  stride_om, stride_on, tiles, tiles_m, tiles_n, TRANSPOSED: gl.constexpr, BM: gl.constexpr,
                  BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """out[e] at [m, n] (strides stride_om, stride_on) = sum over e's rows r of G[token[r], m] * P[r, n]; each
    program walks tiles pid, pid + programs, ... of the experts' tiles_m x tiles_n tiles."""
    g_bufs = gl.allocate_shared_memory(g_ptr.dtype.element_ty, [STAGES, BK, BM], p_desc.layout)  # both swizzled
    p_bufs = gl.allocate_shared_memory(p_ptr.dtype.element_ty, [STAGES, BK, BN], p_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(STAGES):
        mbarrier.init(ready.index(j), count=1 + LOAD_WARPS * 32)  # P's arrival, then one a load thread (noinc)
        mbarrier.init(empty.index(j), count=1)
    gl.warp_specialize([
        (_mma_partition, (g_bufs, p_bufs, ready, empty, out_ptr, offsets_ptr, M, N, stride_oe, stride_om, stride_on,
                          tiles, tiles_m, tiles_n, TRANSPOSED, BM, BN, BK, STAGES, num_warps)),
        (_load_partition, (g_ptr, token_ptr, p_ptr, p_desc, g_bufs, p_bufs, ready, empty, offsets_ptr, M, N,
                           stride_g, stride_p, tiles, tiles_m, tiles_n, BM, BN, BK, STAGES)),
    ], [LOAD_WARPS], [LOAD_REGS])


def supports(gathered: torch.Tensor, plain: torch.Tensor) -> bool:
    """Hopper, bf16 or fp16 rows in 16-byte-aligned memory (cp.async and TMA copy 16 bytes at a time), and widths
    that Triton's launch takes as multiples of 16 (what lets the copies at a row's masked end be 16 bytes too)."""
    return (gathered.is_cuda and torch.cuda.get_device_capability(gathered.device) == (9, 0)
            and gathered.dtype == plain.dtype and gathered.dtype in (torch.bfloat16, torch.float16)
            and all(t.stride(1) == 1 and t.shape[1] % 16 == 0 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0
                    for t in (gathered, plain)))


def wgrad(gathered, token, plain, out, offsets, transposed: bool):
    """out[e] = gathered[token[rows of e]]^T @ plain[rows of e]: [M, N] for M gathered columns and N plain ones, or
    its transpose [N, M] (``transposed``); an expert with no rows gets zeros."""
    num_experts = out.shape[0]
    m, n = gathered.shape[1], plain.shape[1]
    stride_om, stride_on = (out.stride(2), out.stride(1)) if transposed else (out.stride(1), out.stride(2))
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    p_desc = TensorDescriptor(plain, list(plain.shape), list(plain.stride()), [BK, BN], layout)
    tiles_m, tiles_n = (m + BM - 1) // BM, (n + BN - 1) // BN
    tiles = num_experts * tiles_m * tiles_n
    _wgrad_kernel[(min(tiles, programs_per_device(out.device)), )](
        gathered, token, plain, p_desc, out, offsets, m, n, gathered.stride(0), plain.stride(0), out.stride(0),
        stride_om, stride_on, tiles, tiles_m, tiles_n, transposed, BM, BN, BK, STAGES, num_warps=MMA_WARPS,
        maxnreg=MAX_REGS)
