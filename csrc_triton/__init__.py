"""Triton kernels for Mixture-of-Experts layers: fused routing, dropless token permutation and grouped
SwiGLU expert GEMMs (routed and shared experts), forward and backward.

CUDA tensors run the Triton kernels; CPU tensors run the pure-PyTorch references, unless TRITON_INTERPRET=1
is set, in which case the kernels run under Triton's interpreter.

One op family per file, each with its kernels, their launch, its autograd Function, its PyTorch reference and
its public functions: router.py (route and the router losses), permute.py (routing plan, permute, unpermute),
routed_experts.py (expert_mlp, grouped_mlp), shared_expert.py (shared_expert_mlp); moe.py assembles them into
a transformers-compatible MoE block. Building blocks, with no public API: _grouped_gemm.py (the grouped-GEMM
core under the routed experts), _swiglu.py (the SwiGLU passes of both expert files), _runtime.py. notes/ says
what each kernel tried, predicted and measured.
"""

from .moe import SUPPORTED_BLOCKS, FusedMoE, MoESpec, patch_hf_model
from .permute import RoutingPlan, permute, plan_routing, unpermute
from .routed_experts import expert_mlp, grouped_mlp
from .router import RouterOutput, load_balancing_loss, route, router_z_loss
from .shared_expert import shared_expert_mlp

__all__ = [
    "RouterOutput", "route", "load_balancing_loss", "router_z_loss",
    "RoutingPlan", "plan_routing", "permute", "unpermute",
    "expert_mlp", "shared_expert_mlp", "grouped_mlp",
    "FusedMoE", "MoESpec", "patch_hf_model", "SUPPORTED_BLOCKS",
]
