"""SwiGLU passes: the memory-bound elementwise kernels between an expert MLP's GEMMs, forward and backward,
and the SwiGLU MLP reference that the experts' references are written with.

    act = scale[r] * silu(h_gate) * h_up                                    forward
    dscale = <g, silu(h_gate) h_up>,  d_up = scale g silu(h_gate),
    d_gate = scale g h_up silu'(h_gate)                                     backward, from g = dy W_down

The shared expert runs both passes around cuBLAS GEMMs (shared_expert.py); the routed experts fuse the
forward into their gate-up GEMM's epilogue and run the backward pass between their down dgrad and up dgrad
(routed_experts.py). Kept apart from both because both use it; nothing here is public API.
"""

import torch
import triton
import triton.language as tl

__all__ = ["swiglu_forward", "swiglu_backward", "swiglu_mlp_reference"]

_ROWS, _COLS = 8, 256  # memory-bound elementwise tiles: 16 elements per thread at 4 warps


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


def _grid(rows: int) -> tuple[int]:
    return (triton.cdiv(rows, _ROWS),)


def swiglu_forward(h_gate, h_up, scale=None):
    """act [rows, I] = scale[r] * silu(h_gate) * h_up, in h_gate's dtype; scale: optional [rows] fp32."""
    rows, inter = h_gate.shape
    act = torch.empty_like(h_gate)
    if rows:
        _swiglu_fwd_kernel[_grid(rows)](
            h_gate, h_up, scale if scale is not None else h_gate, act, rows, inter, h_gate.stride(0),
            h_up.stride(0), act.stride(0), ROW_SCALE=scale is not None, BR=_ROWS, BC=_COLS, num_warps=4)
    return act


def swiglu_backward(g, h_gate, h_up, scale, d_gate, d_up, act=None, need_dscale=False):
    """Run _swiglu_bwd_kernel over all rows into d_gate, d_up (and act if given; either may be g itself);
    returns dscale [rows] fp32 if asked for."""
    rows, inter = g.shape
    dscale = torch.empty(rows, device=g.device, dtype=torch.float32) if need_dscale else None
    if rows:
        _swiglu_bwd_kernel[_grid(rows)](
            g, h_gate, h_up, scale if scale is not None else g, d_gate, d_up, act if act is not None else g,
            dscale if need_dscale else g, rows, inter, g.stride(0), h_gate.stride(0), h_up.stride(0),
            d_gate.stride(0), d_up.stride(0), act.stride(0) if act is not None else 0, ROW_SCALE=scale is not None,
            NEED_DSCALE=need_dscale, SAVE_ACT=act is not None, BR=_ROWS, BC=_COLS, num_warps=4)
    return dscale


def swiglu_mlp_reference(x, w_gate, w_up, w_down):
    """down(silu(gate(x)) * up(x)) in PyTorch ops, nn.Linear layouts: transformers' expert MLP, line for line."""
    return torch.nn.functional.linear(
        torch.nn.functional.silu(torch.nn.functional.linear(x, w_gate)) * torch.nn.functional.linear(x, w_up),
        w_down)
