"""A party's optimizer: AdamW over its own parameters (backbone and expert shard), its gradient clipping, and the
memory options of TrainConfig: the fused CUDA kernel, 8-bit moments (bitsandbytes), and stepping each parameter
during backward.

Clipping bounds two norms separately (``grad_bound``): the backbone's gradient by train.grad_clip, and the expert
shard's by grad_clip x sqrt(its share of the experts). A party's shard holds 1/n of the experts, whose gradient is the
mean over every party's tokens (protocol.py), so the shards' bounds add up (in squares) to grad_clip over the whole
expert set, as in a centralized run, without a global norm, which would take an exchange; one norm over backbone and
shard together would clip the backbone harder at larger n, where the shard is a smaller part of the experts.

Most of a party's peak at 6.9 B parameters is state, not activations: fp32 parameters (4 bytes each), their fp32
gradients (4), AdamW's two moments (8) and the foreach step's parameter-sized temporaries. ``fused`` removes
the temporaries; ``optimizer_8bit`` cuts the moments to 2 bytes; ``optimizer_in_backward`` never holds more
than one parameter's gradient (``StepInBackward``).
"""

import math

import torch

from .config import Config
from .protocol import ExpertShard

__all__ = ["build_optimizer", "grad_bound", "grad_norms", "clip_grad_norms", "StepInBackward"]


def grad_bound(cfg: Config, module: torch.nn.Module) -> float:
    """The bound on ``module``'s gradient norm (the module docstring): train.grad_clip, times sqrt(the share of the
    experts) for an ExpertShard; inf with train.grad_clip = 0 (off)."""
    clip = cfg.train.grad_clip
    if clip <= 0:
        return math.inf
    if isinstance(module, ExpertShard):
        return clip * math.sqrt(len(module.expert_ids) / module.num_experts)
    return clip


def grad_norms(param_sets: list[list[torch.nn.Parameter]]) -> torch.Tensor:
    """Each set of parameters' gradient norm (fp32, one each)."""
    return torch.stack([torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).float()
                        for params in param_sets])


def clip_grad_norms(param_sets: list[tuple[list[torch.nn.Parameter], float]], norms: torch.Tensor) -> None:
    """Clip each set of parameters' gradients to its own bound, given their ``norms`` (``grad_norms``)."""
    for (params, bound), norm in zip(param_sets, norms, strict=True):
        if bound < math.inf:
            torch.nn.utils.clip_grads_with_norm_(params, bound, norm)


def _adamw(groups: list[dict], cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer_8bit:
        import bitsandbytes as bnb  # optional: config.validate checked it is installed

        return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=(t.beta1, t.beta2))
    fused = t.fused_optimizer and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True if fused else None)


def build_optimizer(cfg: Config, modules, device: torch.device | str = "cpu"):
    """AdamW over this party's own parameters; no weight decay on norms and biases. With
    train.optimizer_in_backward each module's gradient is clipped to its own ``grad_bound``."""
    device = torch.device(device)
    params = [p for m in modules for p in m.parameters()]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.train.optimizer_in_backward:
        clips = [(list(m.parameters()), grad_bound(cfg, m)) for m in modules]
        return StepInBackward(groups, lambda group: _adamw(group, cfg, device), clips)
    return _adamw(groups, cfg, device)


class StepInBackward:
    """One optimizer per parameter, stepped by a hook as soon as backward has accumulated that parameter's
    gradient, which is then freed: a party never holds all its gradients at once.

    ``clips`` lists sets of parameters, each with a bound on its gradient norm. Clipping by a set's norm needs all
    its gradients before the first step, so each gradient g of n elements is clipped to ``bound * sqrt(n / N)``
    (N: its set's elements), which bounds the set's norm by ``bound`` as well; ``grad_norms()`` are the step's norms
    of the sets before clipping. ``step`` and ``zero_grad`` do nothing (backward did both); ``param_groups``,
    ``state`` and the state dict are the per-parameter ones'.
    """

    def __init__(self, groups: list[dict], make, clips: list[tuple[list[torch.nn.Parameter], float]]):
        self.optimizers: dict[torch.nn.Parameter, torch.optim.Optimizer] = {}
        self._limits = {p: (s, bound * math.sqrt(p.numel() / sum(q.numel() for q in params)))
                        for s, (params, bound) in enumerate(clips) for p in params}
        self._squares: list[list[torch.Tensor]] = [[] for _ in clips]
        self._device = next(iter(self._limits)).device if self._limits else torch.device("cpu")
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
        which, limit = self._limits[p]
        self._squares[which].append(norm.square())
        if limit < math.inf:
            p.grad.mul_((limit / (norm + 1e-6)).clamp(max=1.0).to(p.grad.dtype))
        self.optimizers[p].step()
        p.grad = None

    def grad_norms(self) -> torch.Tensor:
        """Each set's gradient norm over the backward passes since the last call (before clipping)."""
        squares, self._squares = self._squares, [[] for _ in self._squares]
        return torch.stack([torch.stack(s).sum().sqrt() if s else torch.zeros((), device=self._device)
                            for s in squares])

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
