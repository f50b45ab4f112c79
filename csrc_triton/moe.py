"""FusedMoE: a whole sparse MoE block (router, routed experts, shared experts) on the fused kernels, and
``from_hf`` / ``patch_hf_model`` to run transformers' MoE blocks on it with their own parameters.

Families (transformers 5.x), and what differs between them:

| block                  | scores  | top-k              | weights            | shared experts                 |
|------------------------|---------|--------------------|--------------------|--------------------------------|
| Qwen2MoeSparseMoeBlock | softmax | plain              | renorm optional    | one, times sigmoid(gate(x))    |
| Qwen3MoeSparseMoeBlock | softmax | plain              | renorm optional    | none                           |
| OlmoeSparseMoeBlock    | softmax | plain              | renorm optional    | none                           |
| MixtralSparseMoeBlock  | softmax | plain              | always renorm, fp32| none                           |
| DeepseekV3MoE          | sigmoid | + bias, by groups  | renorm, x scaling  | n_shared merged into one MLP   |
"""

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._runtime import check, use_triton
from .permute import plan_routing
from .routed_experts import expert_mlp
from .router import RouterOutput, route
from .shared_expert import shared_expert_mlp

__all__ = ["MoESpec", "FusedMoE", "patch_hf_model", "SUPPORTED_BLOCKS"]


@dataclass(frozen=True)
class MoESpec:
    hidden_size: int
    intermediate_size: int  # per routed expert
    num_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    score_bias: bool = False  # DeepSeek-V3's e_score_correction_bias buffer
    router_fp32: bool = False  # logits computed in fp32 (DeepSeek-V3)
    weights_in_logits_dtype: bool = True  # Qwen/OLMoE cast the top-k weights back to the logits' dtype
    shared_intermediate_size: int = 0  # 0: no shared experts
    shared_expert_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert
    jitter_noise: float = 0.0  # Mixtral's multiplicative input jitter in training


# Holders of transformers-named parameters (``gate.weight``, ``experts.gate_up_proj``, ``shared_expert.up_proj``,
# ...), so that FusedMoE's state dict loads into and from transformers' blocks; the compute is in forward.


class _RouterWeights(nn.Module):
    def __init__(self, spec: MoESpec):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(spec.num_experts, spec.hidden_size))
        if spec.score_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(spec.num_experts))


class _RoutedExpertsWeights(nn.Module):
    def __init__(self, spec: MoESpec):
        super().__init__()
        e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))


class _SharedExpertWeights(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)


class FusedMoE(nn.Module):
    """A sparse MoE block on the fused kernels: [batch, seq, hidden] -> [batch, seq, hidden].

    Submodules carry transformers' names (``gate``, ``experts``, ``shared_expert``/``shared_experts``,
    ``shared_expert_gate``), so state dicts load either way. After each forward, ``router_output`` holds the
    RouterOutput of that call (for ``load_balancing_loss`` / ``router_z_loss``). Inside a transformers model it
    also hands its router logits to transformers (``output_router_logits``, the model's ``aux_loss``).
    """

    def __init__(self, spec: MoESpec, shared_name: str = "shared_expert", _build: bool = True):
        super().__init__()
        check(spec.scoring in ("softmax", "sigmoid"), f"FusedMoE: unknown scoring {spec.scoring!r}")
        check(1 <= spec.top_k <= spec.num_experts,
              f"FusedMoE: top_k={spec.top_k} must be between 1 and num_experts={spec.num_experts}")
        self.spec = spec
        self.shared_name = shared_name if spec.shared_intermediate_size else None
        self.router_output: RouterOutput | None = None
        if not _build:
            return
        self.gate = _RouterWeights(spec)
        self.experts = _RoutedExpertsWeights(spec)
        if spec.shared_intermediate_size:
            self.add_module(shared_name, _SharedExpertWeights(spec.hidden_size, spec.shared_intermediate_size))
            if spec.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(spec.hidden_size, 1, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        for p in self.parameters():
            nn.init.normal_(p, std=std)

    # -- transformers interop ------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, block: nn.Module) -> "FusedMoE":
        """Wrap a transformers sparse MoE block, reusing its Parameter objects (no copies)."""
        name = type(block).__name__
        check(name in SUPPORTED_BLOCKS,
              f"FusedMoE.from_hf: {name} is not supported; supported blocks: {', '.join(SUPPORTED_BLOCKS)}")
        experts, gate = block.experts, block.gate
        config = experts.config
        check(getattr(config, "hidden_act", "silu") == "silu",
              f"FusedMoE.from_hf: {name} uses activation {config.hidden_act!r}; the fused kernels implement SwiGLU")
        check(not getattr(experts, "has_bias", False) and not getattr(experts, "is_transposed", False)
              and getattr(experts, "is_concatenated", True) and getattr(experts, "has_gate", True),
              f"FusedMoE.from_hf: {name}'s experts use a weight layout other than [E, 2I, H] gate;up without bias")
        num_experts, two_inter, hidden = experts.gate_up_proj.shape
        spec = dict(hidden_size=hidden, intermediate_size=two_inter // 2, num_experts=num_experts,
                    top_k=gate.top_k)
        shared_name = "shared_expert"
        if name == "DeepseekV3MoE":
            spec.update(scoring="sigmoid", norm_topk_prob=gate.norm_topk_prob, n_group=gate.num_group,
                        topk_group=gate.topk_group, routed_scaling_factor=gate.routed_scaling_factor,
                        score_bias=True, router_fp32=True, weights_in_logits_dtype=False,
                        shared_intermediate_size=block.shared_experts.down_proj.in_features)
            shared_name = "shared_experts"
        elif name == "MixtralSparseMoeBlock":
            spec.update(norm_topk_prob=True, weights_in_logits_dtype=False, jitter_noise=block.jitter_noise)
        else:
            spec.update(norm_topk_prob=gate.norm_topk_prob)
            if name == "Qwen2MoeSparseMoeBlock":
                spec.update(shared_intermediate_size=block.shared_expert.down_proj.in_features,
                            shared_expert_gate=True)
        module = cls(MoESpec(**spec), shared_name=shared_name, _build=False)
        module.gate, module.experts = gate, experts
        if module.shared_name:
            module.add_module(shared_name, getattr(block, shared_name))
            if module.spec.shared_expert_gate:
                module.shared_expert_gate = block.shared_expert_gate
        return module

    # -- forward ---------------------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        check(hidden_states.dim() == 3 and hidden_states.shape[-1] == spec.hidden_size,
              f"FusedMoE: input must be [batch, seq, {spec.hidden_size}], got {tuple(hidden_states.shape)}")
        batch, seq, hidden = hidden_states.shape
        if self.training and spec.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - spec.jitter_noise, 1.0 + spec.jitter_noise)
        x = hidden_states.reshape(-1, hidden)
        dtype = x.dtype
        if spec.router_fp32:
            logits = F.linear(x.float(), self.gate.weight.float())
        else:
            logits = F.linear(x, self.gate.weight.to(dtype))
        routing = route(logits, spec.top_k, scoring=spec.scoring, norm_topk_prob=spec.norm_topk_prob,
                        score_bias=getattr(self.gate, "e_score_correction_bias", None), n_group=spec.n_group,
                        topk_group=spec.topk_group, scaling=spec.routed_scaling_factor,
                        out_dtype=logits.dtype if spec.weights_in_logits_dtype else torch.float32)
        self.router_output = routing
        _report_router_logits(logits)

        shared = None
        if self.shared_name:
            mlp = getattr(self, self.shared_name)
            gate = None
            if spec.shared_expert_gate:
                gate = torch.sigmoid(F.linear(x, self.shared_expert_gate.weight.to(dtype)))
            shared = shared_expert_mlp(x, mlp.gate_proj.weight.to(dtype), mlp.up_proj.weight.to(dtype),
                                       mlp.down_proj.weight.to(dtype), gate)
        plan = plan_routing(routing.expert_ids, spec.num_experts, validate=False) if use_triton(x) else None
        out = expert_mlp(x, routing.weights, routing.expert_ids, self.experts.gate_up_proj.to(dtype),
                         self.experts.down_proj.to(dtype), residual=shared, plan=plan)
        return out.view(batch, seq, hidden)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"experts={s.num_experts}, top_k={s.top_k}, hidden={s.hidden_size}, "
                f"intermediate={s.intermediate_size}, scoring={s.scoring}, shared={s.shared_intermediate_size}")


def _report_router_logits(logits: torch.Tensor) -> None:
    """transformers collects router logits (``output_router_logits=True``, from which its models compute
    ``aux_loss``) with a forward hook on the router module, which FusedMoE uses for its weight but does not call
    (that would route twice); so the logits go to the same collector, in layer order, as the hook would."""
    capturing = sys.modules.get("transformers.utils.output_capturing")
    if capturing is None:  # no transformers model is running
        return
    collected = capturing._active_collector.get()
    if collected is not None and "router_logits" in collected:
        collected["router_logits"].append(logits)


SUPPORTED_BLOCKS = ("Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock",
                    "MixtralSparseMoeBlock", "DeepseekV3MoE")


def patch_hf_model(model: nn.Module) -> int:
    """Replace every supported transformers MoE block of ``model`` in place by ``FusedMoE.from_hf(block)``.

    Parameters are shared, not copied, so an optimizer built on the model before keeps working.
    Returns the number of blocks replaced.
    """
    targets = [(name, module) for name, module in model.named_modules() if type(module).__name__ in SUPPORTED_BLOCKS]
    for name, block in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, FusedMoE.from_hf(block))
    return len(targets)
