"""What the benchmarks run on: the one shape table, the published numbers measured at some of its shapes
(ANCHORS), the routings, the work each stage must do (FLOPs and the fewest bytes it must move), and the
transformers MoE block of a shape."""

import argparse
from typing import NamedTuple

import torch


class Shape(NamedTuple):
    family: str  # the transformers block that implements it
    hidden: int
    experts: int
    top_k: int
    inter: int  # per routed expert
    shared: int = 0  # shared-expert intermediate size (all shared experts merged), 0: none
    norm_topk_prob: bool = False
    scoring: str = "softmax"


# The models' MoE layers. DeepSeek-V2-Lite runs on transformers' DeepseekV3MoE block (the one DeepSeek block
# FusedMoE.from_hf takes): same sizes, V3's sigmoid scoring, one expert group. The last two are SonicMoE's
# published 7B and 30B configurations (T, H, I, E, k = 24576, 1536, 256, 128, 8 and 32768, 4096, 512, 128, 8:
# the K=8 rows of the 7B and 30B groups of Dao-AILab/sonic-moe benchmarks/benchmark_megatron_te.py, whose
# groups keep E x I fixed; 30B and not 120B because its E x I is the smaller of the two H=4096 groups). Their
# router is a softmax over the top-k logits, which is Qwen3's block with the top-k probabilities renormalised.
SHAPES = {
    "olmoe-1b-7b": Shape("olmoe", 2048, 64, 8, 1024),
    "qwen1.5-moe-a2.7b": Shape("qwen2", 2048, 60, 4, 1408, shared=5632),
    "qwen3-30b-a3b": Shape("qwen3", 2048, 128, 8, 768, norm_topk_prob=True),
    "deepseek-v2-lite": Shape("deepseek_v3", 2048, 64, 6, 1408, shared=2 * 1408, norm_topk_prob=True,
                              scoring="sigmoid"),
    "sonicmoe-7b": Shape("qwen3", 1536, 128, 8, 256, norm_topk_prob=True),
    "sonicmoe-30b": Shape("qwen3", 4096, 128, 8, 512, norm_topk_prob=True),
}
README_SHAPES = ("olmoe-1b-7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "deepseek-v2-lite")  # the suites' default
# The same families, tiny: for checking the harness on a CPU (pytest bench/ --bench-cpu), never for numbers.
SMOKE_SHAPES = {f"tiny-{name}": s._replace(hidden=64, experts=16, inter=32, shared=2 * 32 if s.shared else 0)
                for name, s in SHAPES.items()}
TOKENS = (4096, 16384, 65536)
ROUTINGS = ("balanced", "skewed")
ZIPF_EXPONENT = 1.0  # skewed routing: expert e (by rank) is preferred with weight 1 / (e + 1)^s
# bf16 on the GPU. On the CPU (--bench-cpu, Triton's interpreter) fp32: the interpreter has no bf16 atomics,
# which Liger's backward uses.
DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32


class Anchor(NamedTuple):
    """A number someone published for a routed-experts shape, and how they counted it. TFLOP/s count the
    routed experts' SwiGLU GEMMs only, 6 T k H I forward (routed_flops); what each timed differs."""
    name: str
    shape: str  # a SHAPES name
    tokens: int
    source: str
    timed: str  # what the published time covers
    tflops: dict  # pass ("fwd", "bwd", "fwd_bwd") -> published TFLOP/s on an H100; {} where no per-shape number
    convention: str


SONICMOE_CONVENTION = ("forward 6 T k H I / forward time; backward 12 T k H I / (forward+backward time - "
                       "forward time) (benchmarks/moe-cute.py)")
ANCHORS = (
    Anchor("SonicMoE 7B", "sonicmoe-7b", 24576, "SonicMoE (Dao-AILab, arXiv 2512.14080), H100, as issue 16 quotes "
           "it (about)", "router GEMM, top-k and experts (moe_TC_softmax_topk_layer)", {"fwd": 365, "bwd": 405},
           SONICMOE_CONVENTION),
    Anchor("SonicMoE 30B", "sonicmoe-30b", 32768, "SonicMoE (arXiv 2512.14080), H100: per-configuration numbers "
           "are in its figures; issue 16 quotes 430-595 TFLOP/s over its larger configurations",
           "router GEMM, top-k and experts (moe_TC_softmax_topk_layer)", {}, SONICMOE_CONVENTION),
    Anchor("Liger PR 1294", "qwen3-30b-a3b", 32768, "Liger-Kernel PR #1294 (open, not in liger-kernel 0.8.5), H100, "
           "its peak sustained numbers", "the fused experts, routing given (LigerFusedMoEFunction)",
           {"fwd": 501, "fwd_bwd": 413}, "forward 6 T k H I, forward+backward 18 T k H I (issue 16)"),
)


# The shapes the profiling scripts (profiling/ab_trees.py, expert_kernels.py, idle_gaps.py) run by default: the
# published anchors of issue 16 that the kernels were tuned against
PROFILED_CASES = (("sonicmoe-7b", 24576), ("qwen3-30b-a3b", 32768))


def add_case_option(parser: argparse.ArgumentParser) -> None:
    """A profiling script's ``--case shape:tokens`` (repeatable; parsed to (shape, tokens); default
    PROFILED_CASES)."""
    def shape_tokens(spec: str) -> tuple[str, int]:
        shape, _, tokens = spec.partition(":")
        if shape not in SHAPES or not tokens.isdigit():
            raise argparse.ArgumentTypeError(f"{spec!r}: give shape:tokens, shape one of {', '.join(SHAPES)}")
        return shape, int(tokens)

    default = ", ".join(f"{shape}:{tokens}" for shape, tokens in PROFILED_CASES)
    parser.add_argument("--case", action="append", type=shape_tokens, help=f"shape:tokens (default {default})")


class Case(NamedTuple):
    shape: str
    tokens: int
    routing: str

    @property
    def spec(self) -> Shape:
        return SHAPES.get(self.shape) or SMOKE_SHAPES[self.shape]

    def __str__(self) -> str:
        return f"{self.shape}-{self.tokens}-{self.routing}"


def routing_bias(experts: int, routing: str) -> torch.Tensor:
    """Added to N(0, 1) logits: zero (balanced), or log Zipf probabilities over a fixed random expert order, so
    top-k of the logits draws experts roughly as sampling without replacement from Zipf would."""
    if routing == "balanced":
        return torch.zeros(experts)
    if routing != "skewed":
        raise ValueError(f"unknown routing {routing!r}: choose one of {', '.join(ROUTINGS)}")
    rank = torch.randperm(experts, generator=torch.Generator().manual_seed(experts))
    return -ZIPF_EXPONENT * torch.log1p(rank.float())


def router_logits(tokens: int, experts: int, routing: str, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(tokens, experts, generator=generator) + routing_bias(experts, routing)


def topk_routing(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager reference router (softmax, top-k, optional renormalisation): (weights fp32, ids int64)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def imbalance(expert_ids: torch.Tensor, experts: int) -> float:
    """Tokens of the busiest expert over the mean: 1.0 is perfectly balanced."""
    counts = torch.bincount(expert_ids.flatten(), minlength=experts).float()
    return (counts.max() / counts.mean()).item()


# ---------------------------------------------------------------------------------------------------------
# Work per stage. FLOPs count multiply-adds as 2; bytes are the fewest each stage must move (inputs read
# once, outputs written once), in the dtypes the stage takes: bf16 activations, int32 ids and slots.

BF16, FP32, INDEX = 2, 4, 4


def expert_flops(rows: int, hidden: int, inter: int) -> int:
    """SwiGLU MLP on ``rows`` rows: gate and up (2 x H->I) and down (I->H) GEMMs. Its dgrad and its wgrad
    are each the same count again."""
    return 6 * rows * hidden * inter


def routed_flops(tokens: int, s: Shape) -> int:
    """Forward FLOPs of the routed experts, 6 T k H I: the count issue 16 and the published anchors use."""
    return expert_flops(tokens * s.top_k, s.hidden, s.inter)


def layer_flops(tokens: int, s: Shape) -> int:
    """Forward FLOPs of a whole MoE layer: router GEMM, routed experts, shared expert (and its gate)."""
    return 2 * tokens * s.hidden * s.experts + routed_flops(tokens, s) + (
        expert_flops(tokens, s.hidden, s.shared) + 2 * tokens * s.hidden if s.shared else 0)


def router_bytes(tokens: int, s: Shape) -> int:
    """Read the logits, write the top-k weights (fp32) and ids."""
    return tokens * s.experts * BF16 + tokens * s.top_k * (FP32 + INDEX)


def permute_bytes(tokens: int, s: Shape) -> int:
    """Read the ids and each token's row once; write the plan (slot -> token, slot -> pair, pair -> slot)
    and the k copies of each row in expert order."""
    pairs = tokens * s.top_k
    return pairs * INDEX + tokens * s.hidden * BF16 + 3 * pairs * INDEX + pairs * s.hidden * BF16


def unpermute_bytes(tokens: int, s: Shape) -> int:
    """Read the k expert outputs of each token, its weights and slots; write the combined row."""
    pairs = tokens * s.top_k
    return pairs * s.hidden * BF16 + pairs * (BF16 + INDEX) + tokens * s.hidden * BF16


def make_hf_block(s: Shape, device="cpu", dtype=torch.float32) -> torch.nn.Module:
    """transformers' own MoE block of this shape (experts_implementation "eager"), weights N(0, 0.02) drawn
    on ``device``."""
    if s.family == "olmoe":
        from transformers.models.olmoe.configuration_olmoe import OlmoeConfig as Config
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block

        cfg = Config(hidden_size=s.hidden, intermediate_size=s.inter, num_experts=s.experts,
                     num_experts_per_tok=s.top_k, norm_topk_prob=s.norm_topk_prob)
    elif s.family == "qwen2":
        from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig as Config
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block

        cfg = Config(hidden_size=s.hidden, moe_intermediate_size=s.inter, num_experts=s.experts,
                     num_experts_per_tok=s.top_k, norm_topk_prob=s.norm_topk_prob,
                     shared_expert_intermediate_size=s.shared)
    elif s.family == "qwen3":
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig as Config
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block

        cfg = Config(hidden_size=s.hidden, moe_intermediate_size=s.inter, num_experts=s.experts,
                     num_experts_per_tok=s.top_k, norm_topk_prob=s.norm_topk_prob)
    elif s.family == "deepseek_v3":
        from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config as Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block

        cfg = Config(hidden_size=s.hidden, moe_intermediate_size=s.inter, n_routed_experts=s.experts,
                     num_experts_per_tok=s.top_k, n_group=1, topk_group=1,
                     n_shared_experts=s.shared // s.inter, norm_topk_prob=s.norm_topk_prob)
    else:
        raise ValueError(f"unknown block family {s.family!r}")
    cfg._experts_implementation = "eager"
    block = Block(cfg).to(device, dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block


def skewing_input(gate_weight: torch.Tensor, routing: str) -> torch.Tensor:
    """A [hidden] vector u with u @ gate_weight.T == routing_bias: added to N(0, 1) inputs, it skews the
    block's own router the way ``router_logits`` does (least squares, so exact when hidden >= experts)."""
    bias = routing_bias(gate_weight.shape[0], routing)
    return torch.linalg.lstsq(gate_weight.float().cpu(), bias[:, None]).solution[:, 0]
