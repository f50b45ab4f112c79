"""A decoder-only MoE transformer, split the PC-MoE way: a party's private Backbone (embeddings, RoPE attention,
RMSNorms, each MoE layer's router and shared expert, LM head) and the routed experts, reached through an
``experts`` callable (``protocol.DistributedExperts``) so the Backbone never holds another party's experts; with
activation checkpointing, ``experts.recomputable(block)`` is what the checkpoint recomputes.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import csrc_triton as ct

from .config import ModelConfig
from .nvtx import stage

__all__ = ["Backbone", "empty_backbone", "Loss", "compute_loss", "count_parameters"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # In fp32 whatever the activations' dtype, as the HF models do.
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (the HF Llama/Qwen/OLMoE convention) on [B, heads, T, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.attention_out_bias)
        # OLMoE normalises the whole query and key projections, Qwen3-MoE each head.
        self.per_head_norm = cfg.qk_norm_per_head
        q_norm_dim, k_norm_dim = (cfg.head_dim, cfg.head_dim) if cfg.qk_norm_per_head else (q_dim, kv_dim)
        self.q_norm = RMSNorm(q_norm_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(k_norm_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, cos, sin):
        batch, seq, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.per_head_norm:
            q, k = q.view(batch, seq, -1, self.head_dim), k.view(batch, seq, -1, self.head_dim)
        q = self.q_norm(q).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_norm(k).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype, if any: the expert kernels take one dtype for x and weights."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class SwiGLU(nn.Module):
    """A SwiGLU MLP of the private backbone: an MoE layer's always-on shared expert (optionally gated, Qwen2-MoE:
    times sigmoid(gate(x))), or a dense layer's feed-forward."""

    def __init__(self, hidden: int, inter: int, gated: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.gate = nn.Linear(hidden, 1, bias=False) if gated else None

    def forward(self, x):
        shape = x.shape
        x = _kernel_input(x.reshape(-1, shape[-1]))
        gate = torch.sigmoid(self.gate(x)) if self.gate is not None else None
        out = ct.shared_expert_mlp(x, self.gate_proj.weight.to(x.dtype), self.up_proj.weight.to(x.dtype),
                                   self.down_proj.weight.to(x.dtype), gate)
        return out.view(*shape[:-1], out.shape[-1])


class MoEFeedForward(nn.Module):
    """Route with this party's router, send to the routed experts (wherever they live), add the shared expert."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.top_k, self.norm_topk_prob = layer, cfg.top_k, cfg.norm_topk_prob
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.shared = (SwiGLU(cfg.hidden_size, cfg.shared_intermediate_size, cfg.shared_expert_gate)
                       if cfg.shared_intermediate_size else None)

    def forward(self, x, experts) -> tuple[torch.Tensor, ct.RouterOutput]:
        shape = x.shape
        x = _kernel_input(x.reshape(-1, shape[-1]))
        with stage("router") as s:
            routing = ct.route(self.router(s.input(x)), self.top_k, norm_topk_prob=self.norm_topk_prob)
            routing = routing._replace(weights=s.output(routing.weights))
        out, shared_out = experts(self.layer, x, routing.weights, routing.expert_ids,
                                  concurrent=(lambda: self._shared(x)) if self.shared is not None else None)
        if shared_out is not None:
            out = out + shared_out
        return out.view(shape), routing

    def _shared(self, x):
        with stage("shared_expert") as s:
            return s.output(self.shared(s.input(x)))


class Block(nn.Module):
    """Attention, then an MoE layer, or a dense MLP in the layers ``cfg.dense_layers`` names."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        moe_layers = cfg.moe_layers
        self.moe = MoEFeedForward(cfg, moe_layers.index(layer)) if layer in moe_layers else None
        self.mlp = SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size) if self.moe is None else None

    def forward(self, x, cos, sin, experts):
        with stage("attention") as s:
            x = x + s.output(self.attn(self.attn_norm(s.input(x)), cos, sin))
        if self.moe is None:
            with stage("dense_mlp") as s:
                return x + s.output(self.mlp(self.ffn_norm(s.input(x)))), None
        moe_out, routing = self.moe(self.ffn_norm(x), experts)
        return x + moe_out, routing


class Backbone(nn.Module):
    """Everything a party keeps to itself. ``forward(tokens, experts)`` -> (logits, one RouterOutput per MoE
    layer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList([Block(cfg, layer) for layer in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, std: float = 0.02) -> None:
        """Normal(0, std) matrices, residual-output projections scaled by 1/sqrt(2 * layers) (GPT-2)."""
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.zeros_like(p))
            else:
                scale = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=generator) * scale)

    def forward(self, tokens: torch.Tensor, experts, activation_checkpointing: bool = False):
        cos, sin = rope_tables(tokens.shape[1], self.cfg.head_dim, self.cfg.rope_theta, tokens.device)
        x = self.embed(tokens)
        routings = []
        for block in self.blocks:
            if activation_checkpointing and torch.is_grad_enabled():
                # The recompute replays what the block's exchanges received (experts.recomputable): only local
                # work runs again. Without early stop it runs the whole block, so the replay is consumed in full.
                with set_checkpoint_early_stop(False):
                    x, routing = checkpoint(experts.recomputable(block), x, cos, sin, experts, use_reentrant=False)
            else:
                x, routing = block(x, cos, sin, experts)
            if routing is not None:  # a dense layer routes nothing
                routings.append(routing)
        with stage("lm_head") as s:
            return s.output(self.lm_head(self.norm(s.input(x)))), routings


def empty_backbone(cfg: ModelConfig, device) -> Backbone:
    """A Backbone whose parameters are allocated on ``device`` but not initialised, for weights about to be
    loaded: built on the meta device, so there is no random init and no host copy of a GPU model."""
    with torch.device("meta"):
        backbone = Backbone(cfg)
    backbone.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own tensor: tie them again
        backbone.lm_head.weight = backbone.embed.weight
    return backbone


class Loss(NamedTuple):
    total: torch.Tensor  # what backward runs on
    ce: torch.Tensor
    load_balancing: torch.Tensor  # mean over layers
    z: torch.Tensor  # mean over layers


def compute_loss(logits, targets, routings, aux_loss_coef: float, z_loss_coef: float) -> Loss:
    ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
    balance = torch.stack([ct.load_balancing_loss(r) for r in routings]).mean()
    z = torch.stack([ct.router_z_loss(r) for r in routings]).mean()
    return Loss(ce + aux_loss_coef * balance + z_loss_coef * z, ce, balance, z)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
