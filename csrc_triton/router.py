"""Fused MoE router: logits -> scores -> (group-limited) top-k -> renormalise/scale, plus the statistics
for the load-balancing loss and the router z-loss, in one pass over the logits; backward in one pass too.

Scoring follows the transformers 5.x routers:
- ``"softmax"`` (Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral): softmax in fp32, top-k, optional renormalisation.
- ``"sigmoid"`` (DeepSeek-V3): sigmoid scores; ``score_bias`` (``e_score_correction_bias``) is added for the
  choice only; group-limited top-k (``n_group``/``topk_group``, a group scored by its two best experts);
  the chosen raw scores, optionally renormalised (+1e-20), times ``scaling`` (``routed_scaling_factor``).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._runtime import check, next_pow2, use_triton

__all__ = ["RouterOutput", "route", "route_reference", "load_balancing_loss", "router_z_loss"]


class RouterOutput(NamedTuple):
    weights: torch.Tensor  # [T, k] routing weights (out_dtype), differentiable
    expert_ids: torch.Tensor  # [T, k] int32, best first
    tokens_per_expert: torch.Tensor  # [E] int64: how many tokens chose each expert
    score_sums: torch.Tensor  # [E] fp32: sum over tokens of each expert's score, differentiable
    logsumexp: torch.Tensor  # [T] fp32: logsumexp of each token's logits, differentiable (z-loss)


def load_balancing_loss(out: RouterOutput) -> torch.Tensor:
    """Switch-Transformer auxiliary loss E * sum_e f_e * P_e (f: fraction of routed pairs, P: mean score).

    Equals 1 for perfectly uniform routing; gradients flow through the scores only.
    """
    num_tokens, top_k = out.expert_ids.shape
    num_experts = out.tokens_per_expert.numel()
    fraction = out.tokens_per_expert.float() / max(num_tokens * top_k, 1)
    mean_score = out.score_sums / max(num_tokens, 1)
    return num_experts * (fraction * mean_score).sum()


def router_z_loss(out: RouterOutput) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return out.logsumexp.square().mean()


def _check_args(logits, top_k, scoring, score_bias, n_group, topk_group):
    check(logits.dim() == 2, f"route: logits must be [tokens, experts], got shape {tuple(logits.shape)}")
    num_experts = logits.shape[1]
    check(scoring in ("softmax", "sigmoid"), f"route: scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    check(1 <= top_k <= num_experts, f"route: top_k={top_k} must be between 1 and the {num_experts} experts")
    check(num_experts <= 1024, f"route: at most 1024 experts are supported, got {num_experts}")
    check(n_group >= 1 and num_experts % n_group == 0,
          f"route: n_group={n_group} must divide the {num_experts} experts")
    if n_group > 1:
        check(num_experts // n_group >= 2, "route: group-limited routing needs at least 2 experts per group")
        check(1 <= topk_group <= n_group, f"route: topk_group={topk_group} must be in 1..n_group={n_group}")
        check(top_k <= topk_group * (num_experts // n_group),
              f"route: top_k={top_k} exceeds the {topk_group} groups x {num_experts // n_group} experts kept")
    if score_bias is not None:
        check(score_bias.shape == (num_experts,), f"route: score_bias must have shape ({num_experts},)")


def route_reference(logits, top_k, *, scoring="softmax", norm_topk_prob=True, score_bias=None, n_group=1,
                    topk_group=1, scaling=1.0, out_dtype=torch.float32) -> RouterOutput:
    """Pure-PyTorch router, line for line the transformers routers (the oracle and the CPU path)."""
    _check_args(logits, top_k, scoring, score_bias, n_group, topk_group)
    num_tokens, num_experts = logits.shape
    logits32 = logits.float()
    scores = torch.softmax(logits32, dim=-1) if scoring == "softmax" else logits32.sigmoid()
    choice = scores if score_bias is None else scores + score_bias.float()
    if n_group > 1:
        group_scores = choice.view(num_tokens, n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(num_tokens, -1)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    expert_ids = torch.topk(choice, top_k, dim=-1)[1]
    weights = scores.gather(1, expert_ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if scoring == "sigmoid" else 0.0))
    weights = (weights * scaling).to(out_dtype)
    counts = torch.bincount(expert_ids.flatten(), minlength=num_experts)
    return RouterOutput(weights, expert_ids.to(torch.int32), counts, scores.sum(0),
                        torch.logsumexp(logits32, dim=-1))


@triton.jit
def _scores(logits_ptr, rows, cols, T, E, stride_t, stride_e, SOFTMAX: tl.constexpr):
    """Load a [BLOCK_T, E_PAD] tile of logits; return (scores, softmax, logsumexp), padding scored 0."""
    cmask = cols < E
    mask = (rows[:, None] < T) & cmask[None, :]
    logit = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :] * stride_e,
                    mask=mask, other=0.0).to(tl.float32)
    logit = tl.where(cmask[None, :], logit, float("-inf"))
    row_max = tl.max(logit, 1)
    exps = tl.exp(logit - row_max[:, None])
    denom = tl.sum(exps, 1)
    softmax = exps / denom[:, None]
    lse = row_max + tl.log(denom)
    if SOFTMAX:
        scores = softmax
    else:
        scores = tl.where(cmask[None, :], tl.sigmoid(logit), 0.0)
    return scores, softmax, lse


@triton.jit
def _pick(values, avail, cols, E_PAD: tl.constexpr):
    """Per row, the column of the largest value among the ``avail`` ones, ranked as torch.topk ranks them: NaN
    above every number (the lowest such column first), ties to the lower column. Always an available column when
    the row has one, so NaN or inf logits never make an expert id out of range."""
    nan = avail & (values != values)
    nan_col = tl.min(tl.where(nan, cols[None, :], E_PAD), 1)
    key = tl.where(avail & (values == values), values, float("-inf"))
    best = tl.max(key, 1)
    best_col = tl.min(tl.where(avail & (key == best[:, None]), cols[None, :], E_PAD), 1)
    return tl.where(nan_col < E_PAD, nan_col, best_col)


@triton.jit
def _at(values, col, cols):
    """Per row, the value in column ``col`` (NaN stays NaN)."""
    return tl.sum(tl.where(cols[None, :] == col[:, None], values, 0.0), 1)


@triton.jit
def _router_fwd_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, count_part_ptr, score_part_ptr, lse_ptr,
    T, E, stride_t, stride_e, scaling, renorm_eps,
    K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SOFTMAX: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    cmask = cols < E
    rmask = rows < T
    scores, softmax, lse = _scores(logits_ptr, rows, cols, T, E, stride_t, stride_e, SOFTMAX)

    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(cmask[None, :], choice, float("-inf"))

    if N_GROUP > 1:
        # Each expert carries its group's score (sum of the group's two best choices); keep TOPK_GROUP groups.
        group = cols // GROUP_SIZE
        group_score = tl.full([BLOCK_T, E_PAD], float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUP):
            in_group = (group == g)[None, :] & cmask[None, :]
            best_col = _pick(choice, in_group, cols, E_PAD)
            second_col = _pick(choice, in_group & (cols[None, :] != best_col[:, None]), cols, E_PAD)
            score = _at(choice, best_col, cols) + _at(choice, second_col, cols)
            group_score = tl.where(in_group, score[:, None], group_score)
        keep = tl.zeros([BLOCK_T, E_PAD], tl.int1)
        for _ in tl.static_range(TOPK_GROUP):  # a group's score fills its columns: its lowest one stands for it
            best_group = _pick(group_score, cmask[None, :] & ~keep, cols, E_PAD) // GROUP_SIZE
            keep = keep | (group[None, :] == best_group[:, None])
        choice = tl.where(keep, choice, float("-inf"))

    # Top-k by K rounds of arg-max (NaN first, ties to the lower expert id), best first.
    kcols = tl.arange(0, K_PAD)
    top_w = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    top_id = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    chosen = tl.zeros([BLOCK_T, E_PAD], tl.int32)
    for j in tl.static_range(K):
        best_col = _pick(choice, cmask[None, :] & (chosen == 0), cols, E_PAD)
        hit = cols[None, :] == best_col[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), 1)
        top_w = tl.where(kcols[None, :] == j, w[:, None], top_w)
        top_id = tl.where(kcols[None, :] == j, best_col[:, None], top_id)
        chosen += hit.to(tl.int32)
    if RENORM:
        top_w = top_w / (tl.sum(top_w, 1)[:, None] + renorm_eps)
    top_w = top_w * scaling

    kmask = rmask[:, None] & (kcols[None, :] < K)
    out_offs = rows[:, None] * K + kcols[None, :]
    tl.store(weights_ptr + out_offs, top_w.to(weights_ptr.dtype.element_ty), mask=kmask)
    tl.store(ids_ptr + out_offs, top_id, mask=kmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    # Per-block partial statistics, summed on the host side of the launch (deterministic, no atomics).
    chosen = tl.where(rmask[:, None], chosen, 0)
    tl.store(count_part_ptr + pid * E_PAD + cols, tl.sum(chosen, 0))
    tl.store(score_part_ptr + pid * E_PAD + cols, tl.sum(tl.where(rmask[:, None], scores, 0.0), 0))


@triton.jit
def _router_bwd_kernel(
    logits_ptr, ids_ptr, dweights_ptr, dscore_sums_ptr, dlse_ptr, dlogits_ptr,
    T, E, stride_t, stride_e, scaling, renorm_eps,
    K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SOFTMAX: tl.constexpr, RENORM: tl.constexpr, HAS_DSCORE_SUMS: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    kcols = tl.arange(0, K_PAD)
    rmask = rows < T
    cmask = cols < E
    scores, softmax, lse = _scores(logits_ptr, rows, cols, T, E, stride_t, stride_e, SOFTMAX)

    kmask = rmask[:, None] & (kcols[None, :] < K)
    ids = tl.load(ids_ptr + rows[:, None] * K + kcols[None, :], mask=kmask, other=E_PAD)
    dw = tl.load(dweights_ptr + rows[:, None] * K + kcols[None, :], mask=kmask, other=0.0).to(tl.float32)
    raw = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    for j in tl.static_range(K):
        id_j = tl.sum(tl.where(kcols[None, :] == j, ids, 0), 1)
        raw_j = tl.sum(tl.where(cols[None, :] == id_j[:, None], scores, 0.0), 1)
        raw = tl.where(kcols[None, :] == j, raw_j[:, None], raw)
    if RENORM:
        denom = tl.sum(raw, 1) + renorm_eps
        draw = scaling * (dw / denom[:, None] - (tl.sum(dw * raw, 1) / (denom * denom))[:, None])
    else:
        draw = scaling * dw
    dscores = tl.zeros([BLOCK_T, E_PAD], tl.float32)
    for j in tl.static_range(K):
        id_j = tl.sum(tl.where(kcols[None, :] == j, ids, 0), 1)
        draw_j = tl.sum(tl.where(kcols[None, :] == j, draw, 0.0), 1)
        dscores += tl.where(cols[None, :] == id_j[:, None], draw_j[:, None], 0.0)
    if HAS_DSCORE_SUMS:
        dscores += tl.load(dscore_sums_ptr + cols, mask=cmask, other=0.0)[None, :]
    if SOFTMAX:
        dlogits = scores * (dscores - tl.sum(scores * dscores, 1)[:, None])
    else:
        dlogits = dscores * scores * (1.0 - scores)
    if HAS_DLSE:
        dlogits += tl.load(dlse_ptr + rows, mask=rmask, other=0.0)[:, None] * softmax
    tl.store(dlogits_ptr + rows[:, None] * E + cols[None, :], dlogits.to(dlogits_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


def _block_t(num_experts_pad: int) -> int:
    # Keep a [BLOCK_T, E_PAD] fp32 tile near 8K elements per program.
    return max(1, min(64, 8192 // num_experts_pad))


class _RouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, score_bias, top_k, softmax, renorm, n_group, topk_group, scaling, out_dtype):
        num_tokens, num_experts = logits.shape
        e_pad = max(16, next_pow2(num_experts))
        block_t = _block_t(e_pad)
        num_blocks = triton.cdiv(num_tokens, block_t)
        dev = logits.device
        weights = torch.empty(num_tokens, top_k, device=dev, dtype=out_dtype)
        ids = torch.empty(num_tokens, top_k, device=dev, dtype=torch.int32)
        count_part = torch.empty(num_blocks, e_pad, device=dev, dtype=torch.int32)
        score_part = torch.empty(num_blocks, e_pad, device=dev, dtype=torch.float32)
        lse = torch.empty(num_tokens, device=dev, dtype=torch.float32)
        renorm_eps = 0.0 if softmax else 1e-20
        if num_blocks:
            _router_fwd_kernel[(num_blocks,)](
                logits, score_bias if score_bias is not None else logits, weights, ids, count_part, score_part,
                lse, num_tokens, num_experts, logits.stride(0), logits.stride(1), scaling, renorm_eps,
                K=top_k, K_PAD=max(2, next_pow2(top_k)), E_PAD=e_pad, BLOCK_T=block_t, SOFTMAX=softmax,
                RENORM=renorm, HAS_BIAS=score_bias is not None, N_GROUP=n_group, TOPK_GROUP=topk_group,
                GROUP_SIZE=num_experts // n_group)
        counts = count_part.sum(0, dtype=torch.int64)[:num_experts]
        score_sums = score_part.sum(0)[:num_experts]
        ctx.save_for_backward(logits, ids)
        ctx.config = (top_k, softmax, renorm, scaling, renorm_eps)
        ctx.mark_non_differentiable(ids, counts)
        return weights, ids, counts, score_sums, lse

    @staticmethod
    def backward(ctx, dweights, _dids, _dcounts, dscore_sums, dlse):
        logits, ids = ctx.saved_tensors
        top_k, softmax, renorm, scaling, renorm_eps = ctx.config
        num_tokens, num_experts = logits.shape
        e_pad = max(16, next_pow2(num_experts))
        block_t = _block_t(e_pad)
        if dweights is None:
            dweights = torch.zeros(num_tokens, top_k, device=logits.device, dtype=torch.float32)
        dlogits = torch.empty(num_tokens, num_experts, device=logits.device, dtype=logits.dtype)
        if num_tokens:
            _router_bwd_kernel[(triton.cdiv(num_tokens, block_t),)](
                logits, ids, dweights.contiguous(),
                dscore_sums.float().contiguous() if dscore_sums is not None else dlogits,
                dlse.float().contiguous() if dlse is not None else dlogits, dlogits,
                num_tokens, num_experts, logits.stride(0), logits.stride(1), scaling, renorm_eps,
                K=top_k, K_PAD=max(2, next_pow2(top_k)), E_PAD=e_pad, BLOCK_T=block_t, SOFTMAX=softmax,
                RENORM=renorm, HAS_DSCORE_SUMS=dscore_sums is not None, HAS_DLSE=dlse is not None)
        return dlogits, None, None, None, None, None, None, None, None


def route(logits: torch.Tensor, top_k: int, *, scoring: str = "softmax", norm_topk_prob: bool = True,
          score_bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1, scaling: float = 1.0,
          out_dtype: torch.dtype = torch.float32) -> RouterOutput:
    """Route tokens to experts.

    Args:
        logits: [T, E] router logits (fp32/bf16/fp16, any strides).
        top_k: experts per token, 1 <= top_k <= E.
        scoring: "softmax" or "sigmoid" (see module docstring).
        norm_topk_prob: renormalise the k chosen weights to sum to 1.
        score_bias: [E] added to the scores for the choice only (DeepSeek-V3's e_score_correction_bias).
        n_group, topk_group: group-limited routing (DeepSeek-V3); n_group=1 turns it off.
        scaling: factor on the final weights (routed_scaling_factor).
        out_dtype: dtype of the returned weights.

    Returns:
        RouterOutput(weights [T,k] out_dtype, expert_ids [T,k] int32, tokens_per_expert [E] int64,
        score_sums [E] fp32, logsumexp [T] fp32). weights, score_sums and logsumexp carry gradients to logits.
    """
    _check_args(logits, top_k, scoring, score_bias, n_group, topk_group)
    if not use_triton(logits):
        return route_reference(logits, top_k, scoring=scoring, norm_topk_prob=norm_topk_prob,
                               score_bias=score_bias, n_group=n_group, topk_group=topk_group, scaling=scaling,
                               out_dtype=out_dtype)
    bias = score_bias.detach().float().contiguous() if score_bias is not None else None
    return RouterOutput(*_RouteFunction.apply(logits, bias, top_k, scoring == "softmax", norm_topk_prob,
                                              n_group, topk_group, float(scaling), out_dtype))
