"""Triton kernels for Mixture-of-Experts layers: fused routing, dropless token permutation and grouped
SwiGLU expert GEMMs (routed and shared experts), forward and backward.

CUDA tensors run the Triton kernels; CPU tensors run the pure-PyTorch references, unless TRITON_INTERPRET=1
is set, in which case the kernels run under Triton's interpreter.
"""

from .experts import expert_mlp, grouped_mlp, shared_expert_mlp
from .moe import SUPPORTED_BLOCKS, FusedMoE, MoESpec, patch_hf_model
from .permute import RoutingPlan, permute, plan_routing, unpermute
from .router import RouterOutput, load_balancing_loss, route, router_z_loss

__all__ = [
    "RouterOutput", "route", "load_balancing_loss", "router_z_loss",
    "RoutingPlan", "plan_routing", "permute", "unpermute",
    "expert_mlp", "shared_expert_mlp", "grouped_mlp",
    "FusedMoE", "MoESpec", "patch_hf_model", "SUPPORTED_BLOCKS",
]
