"""The implementations each stage is timed with: ours (csrc_triton) and the peers, on the same inputs.

Peers: PyTorch eager (our reference: what transformers' "eager" experts do), ``torch._grouped_mm``
(PyTorch's native grouped GEMM), transformers' MoE blocks with experts_implementation "eager" and
"grouped_mm", megablocks (its permutation ops, and dMoE with whichever back end can run), and two fused MoE
kernels given the routing: Liger-Kernel's (Triton) and SonicMoE's (quack's CuTe DSL GEMMs, Triton for the
rest). Those two also run inside transformers' blocks as an experts implementation, as Liger's own patch
(LigerExperts) and transformers' "sonicmoe" integration put them there. A peer that cannot run raises
Unavailable with the reason, which the results keep.

Both fused peers autotune their GEMMs by default (Liger: minutes per shape; SonicMoE: every quack GEMM over
its tile and cluster configurations, each compiled with CuTe DSL). Here they run pinned: Liger with
LIGER_FUSED_MOE_AUTOTUNE=0 (one config per kernel, its own switch) and quack's GEMMs with quack's default
config (what its ``tuned=False`` runs), unless PCMOE_PEER_AUTOTUNE=1; ``settings()`` records which.
"""

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import csrc_triton as ct

from .shapes import Shape


class Unavailable(Exception):
    """This peer cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------------------
# Router


def eager_route(logits: torch.Tensor, s: Shape):
    """The block's own routing, in PyTorch ops: softmax (or DeepSeek-V3's sigmoid) scores, top-k, renorm."""
    scores = torch.softmax(logits.float(), -1) if s.scoring == "softmax" else torch.sigmoid(logits.float())
    weights, ids = torch.topk(scores, s.top_k, dim=-1)
    if s.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if s.scoring == "sigmoid" else 0))
    return weights, ids


def ours_route(logits: torch.Tensor, s: Shape):
    return ct.route(logits, s.top_k, scoring=s.scoring, norm_topk_prob=s.norm_topk_prob)


# ---------------------------------------------------------------------------------------------------------
# Permutation (plan + gather into expert order) and un-permutation (weighted top-k combine)


def ours_permute(x, ids, num_experts):
    plan = ct.plan_routing(ids, num_experts, validate=False)
    return ct.permute(x, plan), plan


def eager_permute(x, ids, num_experts):
    """What transformers' grouped_mm experts do: a stable argsort of the pairs, counts, an index_select."""
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return x.index_select(0, order // ids.shape[1]), counts


def ours_unpermute(y_sorted, plan, weights):
    return ct.unpermute(y_sorted, plan, weights)


def eager_unpermute(y_sorted, plan, weights):
    tokens, k = weights.shape
    rows = y_sorted.index_select(0, plan.slot_of_pair.flatten().long()).view(tokens, k, -1)
    return (rows * weights[..., None]).sum(1)


def megablocks_ops():
    """megablocks.ops, which needs megablocks' compiled extension (megablocks_ops)."""
    try:
        from megablocks import ops
    except Exception as e:  # ImportError, or the extension failing to load
        raise Unavailable(f"megablocks does not import: {type(e).__name__}: {e}"[:300]) from None
    probe("megablocks ops")
    return ops


# Small runs of a peer's pieces, each in a child process first: a CUDA fault there (megablocks' extension,
# stk's Triton kernels or SonicMoE's CuTe DSL kernels on a triton / CUDA they were not written for) is sticky
# and would fail every later case here.
_PROBES = {
    "megablocks ops": """
import torch
from bench.peers import megablocks_plan
from megablocks import ops
ids = torch.randint(0, 64, (4096, 8), device="cuda")
x = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16)
ops.gather(x, *megablocks_plan(ops, ids, 64), 8)
torch.cuda.synchronize()
""",
    "megablocks dmoe": """
import torch
from bench.peers import megablocks_dmoe
from bench.shapes import SHAPES
s = SHAPES["olmoe-1b-7b"]
module, _ = megablocks_dmoe(s, torch.bfloat16)
x = torch.randn(2048, 1, s.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
module(x).backward(torch.randn_like(x))
torch.cuda.synchronize()
""",
    "sonicmoe": """
import torch
from bench.peers import sonicmoe_experts
from bench.shapes import SHAPES
s, dev = SHAPES["sonicmoe-7b"], dict(device="cuda", dtype=torch.bfloat16)
x = torch.randn(2048, s.hidden, **dev, requires_grad=True)
w_gate_up = (0.02 * torch.randn(s.experts, 2 * s.inter, s.hidden, **dev)).requires_grad_()
w_down = (0.02 * torch.randn(s.experts, s.hidden, s.inter, **dev)).requires_grad_()
weights, ids = torch.rand(2048, s.experts, device="cuda").softmax(-1).topk(s.top_k, -1)
sonicmoe_experts(x, ids, weights.to(x.dtype).requires_grad_(), w_gate_up, w_down).backward(torch.randn_like(x))
torch.cuda.synchronize()
""",
}
_probed: dict[str, str | None] = {}
PROBE_TIMEOUT_S = 300  # SonicMoE's probe includes compiling its CuTe DSL kernels


def probe(part: str) -> None:
    """Raise Unavailable (with the child's first error line) if ``part`` (a _PROBES name) fails in a child
    process; its outcome is kept for the rest of the session."""
    if part not in _probed:
        try:
            run = subprocess.run([sys.executable, "-c", _PROBES[part]], capture_output=True, text=True,
                                 timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _probed[part] = f"{part} did not finish its probe in {PROBE_TIMEOUT_S} s (compilation included)"
        else:
            lines = [line.strip() for line in run.stderr.splitlines() if line.strip()]
            errors = [line for line in lines if "Error" in line] or lines or ["no message"]
            _probed[part] = None if run.returncode == 0 else (
                f"{part} fails on this machine (probe exit {run.returncode}): {errors[0]}"[:300])
    if _probed[part]:
        raise Unavailable(_probed[part])


def megablocks_plan(ops, ids, num_experts):
    """megablocks' own routing plan (MoE.indices_and_bins): radix sort, histogram, inclusive cumsum."""
    flat = ids.flatten().int()
    bin_ids, indices = ops.sort(flat, max(1, (num_experts - 1).bit_length()))
    tokens_per_expert = ops.histogram(flat, num_experts)
    return indices, bin_ids, ops.inclusive_cumsum(tokens_per_expert, 0)


# ---------------------------------------------------------------------------------------------------------
# Grouped SwiGLU GEMMs on rows already in expert order: forward, dgrad (input gradient), wgrad (weights)


@torch.no_grad()
def ours_gemm_forward(x, expert_of_row, w_gate_up, w_down):
    """csrc_triton.grouped_mlp on rows already in expert order (its routing plan over them included)."""
    return ct.grouped_mlp(x, expert_of_row, w_gate_up, w_down)


def ours_gemm_backward(x, expert_of_row, w_gate_up, w_down, dy):
    """(callable, leaves): grouped_mlp's backward, replayed on one retained graph. One call computes dgrad and
    wgrad (the public API has no dgrad-only entry point), hence OURS_BACKWARD_KERNELS."""
    leaves = [t.detach().requires_grad_() for t in (x, w_gate_up, w_down)]
    y = ct.grouped_mlp(leaves[0], expert_of_row, leaves[1], leaves[2])
    return (lambda: y.backward(dy, retain_graph=True)), leaves


# Which of our backward's kernels (by name) make the dgrad and the wgrad, for the per-kernel split.
OURS_BACKWARD_KERNELS = {"gemm_dgrad": ("_grouped_gemm_kernel", "_swiglu_bwd_kernel", "_combine_kernel"),
                         "gemm_wgrad": ("_wgrad_kernel",)}


def swiglu_backward_act(h, dact):
    """dh = d[silu(gate) * up] / d[gate, up] times dact, with h = [gate, up]."""
    gate, up = h.float().chunk(2, -1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    dgate = dact.float() * up * (sig * (1 + gate * (1 - sig)))
    return torch.cat([dgate, dact.float() * silu], -1).to(h.dtype)


def grouped_mm_forward(x, ends, w_gate_up, w_down):
    h = torch._grouped_mm(x, w_gate_up.transpose(1, 2), offs=ends)
    gate, up = h.chunk(2, -1)
    return torch._grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=ends), h


def grouped_mm_dgrad(dy, h, ends, w_gate_up, w_down):
    dh = swiglu_backward_act(h, torch._grouped_mm(dy, w_down, offs=ends))
    return torch._grouped_mm(dh, w_gate_up, offs=ends)


def grouped_mm_wgrad(dy, act, dh, x, ends):
    return torch._grouped_mm(dy.t(), act, offs=ends), torch._grouped_mm(dh.t(), x, offs=ends)


def eager_forward(x, bounds, w_gate_up, w_down):
    """transformers' eager experts on sorted rows: one pair of GEMMs per expert (``bounds``: host ints)."""
    y = torch.empty_like(x)
    inter = w_down.shape[2]
    for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            h = x[lo:hi] @ w_gate_up[e].t()
            y[lo:hi] = (F.silu(h[:, :inter]) * h[:, inter:]) @ w_down[e].t()
    return y


def eager_dgrad(dy, h, bounds, w_gate_up, w_down):
    dx = torch.empty_like(dy)
    for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            dx[lo:hi] = swiglu_backward_act(h[lo:hi], dy[lo:hi] @ w_down[e]) @ w_gate_up[e]
    return dx


def eager_wgrad(dy, act, dh, x, bounds, w_gate_up, w_down):
    dw_down, dw_gate_up = torch.zeros_like(w_down), torch.zeros_like(w_gate_up)
    for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            torch.mm(dy[lo:hi].t(), act[lo:hi], out=dw_down[e])
            torch.mm(dh[lo:hi].t(), x[lo:hi], out=dw_gate_up[e])
    return dw_down, dw_gate_up


# ---------------------------------------------------------------------------------------------------------
# Routed experts with the weighted combine, routing given: x [T, H], ids and weights [T, k] -> [T, H]


PEER_AUTOTUNE = os.environ.get("PCMOE_PEER_AUTOTUNE") == "1"


def ours_experts(x, ids, weights, w_gate_up, w_down):
    """csrc_triton.expert_mlp (its routing plan included)."""
    return ct.expert_mlp(x, weights, ids, w_gate_up, w_down)


@functools.cache
def liger_fused_moe():
    """Liger-Kernel's fused MoE autograd Function; its kernels read LIGER_FUSED_MOE_AUTOTUNE when first imported."""
    os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "1" if PEER_AUTOTUNE else "0")
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except Exception as e:  # ImportError, or its import-time device detection failing
        raise Unavailable(f"liger-kernel does not import: {type(e).__name__}: {e}"[:300]) from None
    return LigerFusedMoEFunction


def liger_experts(x, ids, weights, w_gate_up, w_down):
    """LigerFusedMoEFunction.apply(x [T, H], gate_up_proj [E, 2I, H], down_proj [E, H, I], top_k_index int32
    [T, k], top_k_weights [T, k]): transformers' weight layout, as its LigerExperts calls it."""
    return liger_fused_moe().apply(x, w_gate_up, w_down, ids.int(), weights)


@functools.cache
def sonicmoe_functional():
    """sonicmoe.functional, quack's autotuned GEMMs pinned to quack's default config unless PEER_AUTOTUNE."""
    try:
        import quack.autotuner
        import quack.gemm_interface
        import sonicmoe.functional as functional
    except Exception as e:  # ImportError, or the CUTLASS DSL's libraries / cuda-bindings failing to load
        raise Unavailable(f"sonic-moe does not import: {type(e).__name__}: {e}"[:300]) from None
    if not PEER_AUTOTUNE:
        for tuner in vars(quack.gemm_interface).values():
            if isinstance(tuner, quack.autotuner.Autotuner):
                tuner.configs = [quack.autotuner.AutotuneConfig(config=None)]  # None: quack's default config
    return functional


def sonicmoe_experts(x, ids, weights, w_gate_up, w_down):
    """SonicMoE given the routing: the expert part of its moe_TC_softmax_topk_layer (its top-k routing metadata,
    the gathered up-projection with SwiGLU, the down-projection and the weighted combine). Weights [E, 2I, H]
    and [E, H, I] are passed as its (2I, H, E) and (H, I, E) views with concat_layout (rows [gate; up]), as
    transformers' sonicmoe integration passes them; its scores are fp32."""
    functional = sonicmoe_functional()
    tokens, k = ids.shape
    experts, pairs = w_down.shape[0], ids.numel()
    index = [torch.empty(n, dtype=torch.int32, device=x.device) for n in (experts, experts + 1, pairs, pairs, pairs)]
    frequency, offsets, gather, scatter, reverse = index
    functional.TC_topk_router_metadata_triton(ids.int().contiguous(), experts, frequency, offsets, gather, scatter,
                                              reverse)
    swiglu = functional.ActivationType.SWIGLU
    a, h = functional._UpProjection.apply(x, w_gate_up.permute(1, 2, 0), None, offsets, pairs, k, gather, scatter,
                                          reverse, None, False, swiglu, not torch.is_grad_enabled(), True)
    return functional._DownProjection.apply(a, h, w_down.permute(1, 2, 0), None, weights.float(), offsets, tokens, k,
                                            gather, scatter, reverse, None, False, swiglu)


def require(impl: str) -> None:
    """Raise Unavailable if a fused peer cannot run here: its import, and SonicMoE's run in a child process."""
    if impl == "liger":
        liger_fused_moe()
    elif impl == "sonicmoe":
        sonicmoe_functional()
        probe("sonicmoe")


def settings() -> dict:
    """How the fused peers that were loaded ran (for the results); None: not loaded."""
    liger = sys.modules.get("liger_kernel.ops.fused_moe_kernels")
    return {
        "liger": None if liger is None else "autotuned" if not liger._AUTOTUNE_DISABLED else
        "one config per kernel (LIGER_FUSED_MOE_AUTOTUNE=0)",
        "sonicmoe": None if "sonicmoe.functional" not in sys.modules else "quack GEMMs autotuned" if PEER_AUTOTUNE
        else "quack GEMMs at quack's default config (what its tuned=False runs)",
    }


def _hf_experts(fn):
    """``fn`` as a transformers experts implementation: forward(self, hidden_states, top_k_index, top_k_weights)
    on the experts module's own weights."""
    def forward(self, hidden_states, top_k_index, top_k_weights):
        return fn(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)
    return forward


# Each peer's name for transformers' experts implementation (the fused peers registered under these names).
EXPERTS_IMPLEMENTATIONS = {"hf_grouped_mm": "grouped_mm", "hf_eager": "eager", "liger": "bench_liger",
                           "sonicmoe": "bench_sonicmoe"}
ALL_EXPERTS_FUNCTIONS["bench_liger"] = _hf_experts(liger_experts)
ALL_EXPERTS_FUNCTIONS["bench_sonicmoe"] = _hf_experts(sonicmoe_experts)
EXPERTS_IMPLS = ("pcmoe", "hf_grouped_mm", "liger", "sonicmoe")


def experts_fn(impl: str, experts: torch.nn.Module):
    """(x, ids, weights) -> [T, H] for ``impl`` on transformers' experts module ``experts`` (its weights): ours,
    or the module itself with its experts implementation switched to ``impl``'s."""
    require(impl)
    if impl == "pcmoe":
        return lambda x, ids, weights: ours_experts(x, ids, weights, experts.gate_up_proj, experts.down_proj)
    experts.config._experts_implementation = EXPERTS_IMPLEMENTATIONS[impl]
    return experts


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def outputs_and_grads(fn, leaves: list, grad: torch.Tensor) -> list:
    """fn()'s output and the gradients it gives ``leaves`` for the upstream gradient ``grad``."""
    for t in leaves:
        t.grad = None
    out = fn()
    out.backward(grad)
    result = [out.detach()] + [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    return result


def agreement(results: list, reference: list, against: str) -> dict:
    """A row's ``check``: relative error of the output and the largest of the gradients' against ``against``."""
    return dict(against=against, out_rel_err=rel_err(results[0], reference[0]),
                max_grad_rel_err=max(rel_err(a, b) for a, b in zip(results[1:], reference[1:])))


# ---------------------------------------------------------------------------------------------------------
# The whole layer


LAYER_IMPLS = ("pcmoe", "hf_grouped_mm", "hf_eager", "liger", "sonicmoe", "megablocks")


def layer_module(impl: str, block, fused):
    """The module that runs ``impl``: FusedMoE.from_hf(block) shares the block's weights; for the others the
    block's experts implementation is switched in place (the fused peers' experts inside transformers' block,
    its router and shared experts in PyTorch)."""
    if impl == "pcmoe":
        return fused
    require(impl)
    block.experts.config._experts_implementation = EXPERTS_IMPLEMENTATIONS[impl]
    return block


def megablocks_dmoe(s: Shape, dtype) -> tuple[torch.nn.Module, str]:
    """megablocks' dropless MoE of this shape (its own router and weights), and the back end it runs on:
    "grouped" (grouped_gemm's CUTLASS kernels) if grouped_gemm imports, else "sparse" (stk's Triton
    block-sparse kernels), for which megablocks' own refusal of triton >= 3.2 is lifted and recorded."""
    megablocks_ops()
    from megablocks.layers import arguments, dmoe

    grouped = importlib.util.find_spec("grouped_gemm") is not None
    backend = "grouped" if grouped else "sparse"
    args = dict(hidden_size=s.hidden, ffn_hidden_size=s.inter, moe_num_experts=s.experts, moe_top_k=s.top_k,
                mlp_type="glu", mlp_impl=backend, activation_fn=F.silu, bias=False, return_bias=False,
                bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, device=torch.cuda.current_device(),
                moe_normalize_expert_weights=1 if s.norm_topk_prob else None, shared_expert=bool(s.shared),
                shared_expert_hidden_size=s.shared or None, moe_loss_weight=0)
    with _triton_guard_lifted(arguments, backend == "sparse"):
        module = dmoe.dMoE(arguments.Arguments(**args))
    label = "grouped (grouped_gemm)" if grouped else (
        f"sparse (stanford-stk {importlib.metadata.version('stanford-stk')} Triton; megablocks refuses "
        "triton >= 3.2 for it, refusal lifted)")
    return module, label


@contextlib.contextmanager
def _triton_guard_lifted(arguments, lift: bool):
    """megablocks 0.10 rejects mlp_impl="sparse" when triton >= 3.2 (a version check in Arguments); whether
    stk's kernels actually run on this triton is what the benchmark then finds out."""
    original = arguments.Arguments.__post_init__
    if lift:
        def post_init(self):
            if self.shared_expert_hidden_size is None:
                self.shared_expert_hidden_size = self.ffn_hidden_size
        arguments.Arguments.__post_init__ = post_init
    try:
        yield
    finally:
        arguments.Arguments.__post_init__ = original
