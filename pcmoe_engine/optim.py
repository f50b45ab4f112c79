"""A party's optimizer: AdamW over its own parameters (backbone and expert shard), and the memory options of
TrainConfig: the fused CUDA kernel, 8-bit moments (bitsandbytes), and stepping each parameter during backward.

Most of a party's peak at 6.9 B parameters is state, not activations: fp32 parameters (4 bytes each), their fp32
gradients (4), AdamW's two moments (8) and the foreach step's parameter-sized temporaries. ``fused`` removes
the temporaries; ``optimizer_8bit`` cuts the moments to 2 bytes; ``optimizer_in_backward`` never holds more
than one parameter's gradient (``StepInBackward``).
"""

import math

import torch

from .config import Config

__all__ = ["build_optimizer", "StepInBackward"]


def _adamw(groups: list[dict], cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer_8bit:
        import bitsandbytes as bnb  # optional: config.validate checked it is installed

        return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=(t.beta1, t.beta2))
    fused = t.fused_optimizer and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True if fused else None)


def build_optimizer(cfg: Config, modules, device: torch.device | str = "cpu"):
    """AdamW over this party's own parameters; no weight decay on norms and biases."""
    device = torch.device(device)
    params = [p for m in modules for p in m.parameters()]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.train.optimizer_in_backward:
        return StepInBackward(groups, lambda group: _adamw(group, cfg, device), cfg.train.grad_clip)
    return _adamw(groups, cfg, device)


class StepInBackward:
    """One optimizer per parameter, stepped by a hook as soon as backward has accumulated that parameter's
    gradient, which is then freed: a party never holds all its gradients at once.

    Clipping by the global gradient norm needs every gradient before the first step, so each gradient g of n
    elements is clipped to ``clip * sqrt(n / N)`` (N: all parameters' elements), which bounds the global norm by
    ``clip`` as well; ``grad_norm()`` is the step's global norm before clipping. ``step`` and ``zero_grad`` do
    nothing (backward did both); ``param_groups``, ``state`` and the state dict are the per-parameter ones'.
    """

    def __init__(self, groups: list[dict], make, clip: float):
        self.optimizers: dict[torch.nn.Parameter, torch.optim.Optimizer] = {}
        self.clip = clip
        self._total = sum(p.numel() for group in groups for p in group["params"])
        self._squares: list[torch.Tensor] = []
        self._hooks = []
        for group in groups:
            for p in group["params"]:
                self.optimizers[p] = make([{**group, "params": [p]}])
                self._hooks.append(p.register_post_accumulate_grad_hook(self._step))

    def close(self) -> None:
        """Stop stepping in backward (e.g. before another optimizer takes over these parameters)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _step(self, p: torch.nn.Parameter) -> None:
        norm = p.grad.float().norm()
        self._squares.append(norm.square())
        if self.clip > 0:
            limit = self.clip * math.sqrt(p.numel() / self._total)
            p.grad.mul_((limit / (norm + 1e-6)).clamp(max=1.0).to(p.grad.dtype))
        self.optimizers[p].step()
        p.grad = None

    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm of the backward passes since the last call (before clipping)."""
        squares, self._squares = self._squares, []
        return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers.values() for p, s in opt.state.items()}

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict:
        return {"per_parameter": [opt.state_dict() for opt in self.optimizers.values()]}

    def load_state_dict(self, state: dict) -> None:
        for opt, opt_state in zip(self.optimizers.values(), state["per_parameter"], strict=True):
            opt.load_state_dict(opt_state)
