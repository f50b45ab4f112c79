"""Shared (always-on) SwiGLU expert, forward and backward: ``shared_expert_mlp``, its autograd Function and
its reference.

    out[t] = gate[t] * (silu(x W_gate^T) * x W_up^T) W_down^T        gate: optional per-token factor

Its GEMMs are dense, so they go to the vendor GEMM (cuBLAS on GPUs), which runs them faster than a grouped
kernel with one group (notes/experts.md, version 5); the SwiGLU, the gate and their backward are one fused
pass each way (_swiglu.py), the gate folded into the down GEMM's operand, so no [T, S] intermediate beyond h
is kept.
"""

import torch

from ._runtime import check, use_triton
from ._swiglu import swiglu_backward, swiglu_forward, swiglu_mlp_reference

__all__ = ["shared_expert_mlp", "shared_expert_mlp_reference"]


class _SharedExpertFunction(torch.autograd.Function):
    """out[t] = gate[t] * SwiGLU(x[t]) for an always-on expert; gate None or [T] fp32."""

    @staticmethod
    def forward(ctx, x, gate, w_gate, w_up, w_down):
        with torch.autocast(x.device.type, enabled=False):  # one dtype throughout, as in the grouped kernels
            h_gate, h_up = x @ w_gate.t(), x @ w_up.t()
            out = swiglu_forward(h_gate, h_up, gate) @ w_down.t()
        ctx.save_for_backward(x, gate, w_gate, w_up, w_down, h_gate, h_up)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, gate, w_gate, w_up, w_down, h_gate, h_up = ctx.saved_tensors
        need_x, need_gate, need_wg, need_wu, need_wd = ctx.needs_input_grad
        g = dout @ w_down
        d_gate, d_up = torch.empty_like(g), torch.empty_like(g)
        # act (gate-scaled, for dW_down) overwrites g in place: g is read first, element by element.
        dgate = swiglu_backward(g, h_gate, h_up, gate, d_gate, d_up, act=g, need_dscale=need_gate)
        dx = torch.addmm(d_gate @ w_gate, d_up, w_up) if need_x else None
        return (dx, dgate, d_gate.t() @ x if need_wg else None,
                d_up.t() @ x if need_wu else None, dout.t() @ g if need_wd else None)


def shared_expert_mlp_reference(x, w_gate, w_up, w_down, gate=None):
    y = swiglu_mlp_reference(x, w_gate, w_up, w_down)
    return y if gate is None else gate * y


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
    return _SharedExpertFunction.apply(x, gate, w_gate, w_up, w_down)
