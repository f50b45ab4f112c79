import torch

# ||out - ref|| / ||ref|| bounds per operand dtype (fp32 operands go through IEEE fp32 dots).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double().to(out.device)
    assert torch.isfinite(out).all(), "output has NaN/Inf (an unwritten or poisoned element)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def leaf(t: torch.Tensor, device, dtype=None) -> torch.Tensor:
    return t.detach().to(device=device, dtype=dtype or t.dtype).clone().requires_grad_()


def poisoned_empty(real_empty):
    """torch.empty that fills floats with NaN and integers with -1, so an unwritten element cannot pass."""

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    return empty
