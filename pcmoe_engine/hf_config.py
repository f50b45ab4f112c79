"""transformers config.json <-> the engine's ModelConfig, for the families the engine reproduces exactly.

| model_type | routed experts         | attention                                    | other                          |
|------------|------------------------|----------------------------------------------|--------------------------------|
| olmoe      | intermediate_size      | RMSNorm over the whole q and k projections   |                                |
| qwen2_moe  | moe_intermediate_size  | q, k, v biases (qkv_bias)                    | shared expert, sigmoid gate;   |
|            |                        |                                              | dense layers                   |
| qwen3_moe  | moe_intermediate_size  | RMSNorm over each q and k head; head_dim     | dense layers                   |
| mixtral    | intermediate_size      | head_dim                                     | top-k always renormalised      |

All four: SwiGLU experts, softmax routing in fp32, RMSNorm, default RoPE (rotate-half), causal attention.
The config.json is parsed by transformers' own config class (legacy keys such as a top-level ``rope_theta``
are normalised there); whatever the engine cannot reproduce exactly is refused with one line: other RoPE
types, sliding-window attention, clip_qkv, router jitter, attention dropout, activations other than SiLU.
"Exactly" is the forward in fp32. Under bf16 the engine keeps its own precision policy (autocast over fp32
master weights, routing weights in fp32 where OLMoE and Qwen cast them to bf16), and in training the
embedding row of pad_token_id gets gradients (transformers' padding_idx freezes it).

DeepSeek-V3 is refused: its multi-head latent attention (queries and keys/values through low-rank projections
with their own RMSNorms, heads split into a RoPE part and a no-RoPE part whose sizes differ from the value
heads, interleaved RoPE and YaRN scaling of the softmax) is a different attention than the engine's, which
every party runs in its private backbone.
"""

import json
from pathlib import Path

from .config import FAMILIES, Config, ModelConfig
from .validate import validate

__all__ = ["ARCHITECTURES", "read_config", "config_from_hf", "hf_config"]

# The transformers class of each family (config.FAMILIES, in its order).
ARCHITECTURES = dict(zip(FAMILIES, ("OlmoeForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                                    "MixtralForCausalLM")))

_SUPPORTED = f"the engine reproduces {', '.join(ARCHITECTURES.values())}"
_DEEPSEEK = ("DeepSeek-V3 is not supported: its multi-head latent attention (low-rank query and key/value "
             "projections, a separate RoPE part of each head, YaRN) is not the engine's attention; " + _SUPPORTED)


def _config_class(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # transformers loads lazily

    return CONFIG_MAPPING[model_type]


def read_config(directory) -> ModelConfig:
    """The ModelConfig of a local transformers checkpoint folder (its config.json)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ValueError(f"checkpoint folder {str(directory)!r} does not exist: give a local transformers "
                         "checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} has no config.json: give the folder that save_pretrained wrote")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}): restore the checkpoint's config.json") from None
    return config_from_hf(raw, where=str(path))


def _refuse(bad: bool, where: str, message: str) -> None:
    if bad:
        raise ValueError(f"{where}: {message}")


def config_from_hf(raw: dict, where: str = "config.json") -> ModelConfig:
    """Map a transformers config (the dict of a config.json) to the ModelConfig that reproduces it exactly."""
    model_type = raw.get("model_type")
    _refuse(model_type == "deepseek_v3", where, _DEEPSEEK)
    _refuse(model_type not in ARCHITECTURES, where, f"model_type {model_type!r} is not supported; {_SUPPORTED}")
    architectures = raw.get("architectures") or [ARCHITECTURES[model_type]]
    _refuse(architectures != [ARCHITECTURES[model_type]], where,
            f"architectures {architectures} is not a causal LM the engine loads; {_SUPPORTED}")
    try:
        hf = _config_class(model_type).from_dict(dict(raw))
    except Exception as e:  # transformers' strict config validation: one line of it is enough
        raise ValueError(f"{where} is not a valid {model_type} config: {str(e).splitlines()[0]}") from None

    rope = hf.rope_parameters or {}
    rope_type = rope.get("rope_type", "default")
    _refuse(rope_type != "default", where, f"RoPE type {rope_type!r} is not implemented by the engine (only the "
            "default RoPE); use a checkpoint without rope scaling")
    _refuse(hf.hidden_act != "silu", where, f"hidden_act={hf.hidden_act!r}: the engine's experts are SwiGLU (silu)")
    _refuse(bool(hf.attention_dropout), where, f"attention_dropout={hf.attention_dropout}: the engine has no "
            "dropout; set it to 0.0")
    sliding = (any(t == "sliding_attention" for t in hf.layer_types) if model_type == "qwen2_moe"
               else getattr(hf, "sliding_window", None) is not None)
    _refuse(sliding, where, "sliding-window attention is not implemented by the engine (its attention is full "
            "causal); use a config without a sliding window (sliding_window null / use_sliding_window false)")
    _refuse(getattr(hf, "clip_qkv", None) is not None, where,
            f"clip_qkv={getattr(hf, 'clip_qkv', None)} is not implemented by the engine")
    _refuse(bool(getattr(hf, "router_jitter_noise", 0.0)), where, "router_jitter_noise is not implemented by the "
            "engine; set it to 0.0")

    head_dim = getattr(hf, "head_dim", None) or 0
    if head_dim * hf.num_attention_heads == hf.hidden_size:
        head_dim = 0  # the derived size
    m = dict(preset=model_type, family=model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
             num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
             num_kv_heads=hf.num_key_value_heads, top_k=hf.num_experts_per_tok, attention_head_dim=head_dim,
             rope_theta=float(rope["rope_theta"]), norm_eps=float(hf.rms_norm_eps),
             tie_word_embeddings=bool(hf.tie_word_embeddings))
    if model_type == "olmoe":
        m.update(num_experts=hf.num_experts, expert_intermediate_size=hf.intermediate_size,
                 norm_topk_prob=hf.norm_topk_prob, qk_norm=True, attention_bias=hf.attention_bias,
                 attention_out_bias=hf.attention_bias)
    elif model_type == "mixtral":
        m.update(num_experts=hf.num_local_experts, expert_intermediate_size=hf.intermediate_size,
                 norm_topk_prob=True)
    else:
        # Qwen: layer l is an MoE layer unless listed in mlp_only_layers or off the decoder_sparse_step grid.
        dense = [layer for layer in range(hf.num_hidden_layers) if layer in hf.mlp_only_layers
                 or not (hf.num_experts > 0 and (layer + 1) % hf.decoder_sparse_step == 0)]
        m.update(num_experts=hf.num_experts, expert_intermediate_size=hf.moe_intermediate_size,
                 norm_topk_prob=hf.norm_topk_prob, dense_layers=dense,
                 dense_intermediate_size=hf.intermediate_size if dense else 0)
        if model_type == "qwen2_moe":
            m.update(shared_intermediate_size=hf.shared_expert_intermediate_size, shared_expert_gate=True,
                     attention_bias=hf.qkv_bias)
        else:
            m.update(qk_norm=True, qk_norm_per_head=True, attention_bias=hf.attention_bias,
                     attention_out_bias=hf.attention_bias)
    cfg = ModelConfig(**m)
    try:
        validate(Config(parties=1, model=cfg))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return cfg


def _family_mismatch(cfg: ModelConfig) -> str | None:
    """Why ``cfg`` is not exactly its family's architecture, or None."""
    family = cfg.family
    wanted = {  # the features each family has, as ModelConfig fields
        "olmoe": dict(qk_norm=True, qk_norm_per_head=False, shared_intermediate_size=0, dense_layers=[],
                      attention_out_bias=cfg.attention_bias),
        "qwen2_moe": dict(qk_norm=False, shared_expert_gate=True, attention_out_bias=False, attention_head_dim=0),
        "qwen3_moe": dict(qk_norm=True, qk_norm_per_head=True, shared_intermediate_size=0,
                          attention_out_bias=cfg.attention_bias),
        "mixtral": dict(qk_norm=False, shared_intermediate_size=0, dense_layers=[], attention_bias=False,
                        attention_out_bias=False, norm_topk_prob=True),
    }
    if family not in wanted:
        return f"model.family={family!r} names no transformers architecture; {_SUPPORTED}"
    if family in ("olmoe", "qwen2_moe") and cfg.attention_head_dim:
        return f"a {family} model's head size is hidden_size // num_heads (model.attention_head_dim=0)"
    for name, value in wanted[family].items():
        if getattr(cfg, name) != value:
            return f"a {family} model has model.{name}={value!r}, this one {getattr(cfg, name)!r}"
    return None


def hf_config(cfg: ModelConfig, base: dict | None = None) -> dict:
    """The config.json (as a dict) of a transformers model with ``cfg``'s architecture. ``base`` (e.g. the
    config.json a run started from) supplies what the engine does not model: token ids, max_position_embeddings,
    router_aux_loss_coef, ..."""
    problem = _family_mismatch(cfg)
    if problem:
        raise ValueError(f"cannot write a transformers config: {problem}")
    family = cfg.family
    m = dict(model_type=family, architectures=[ARCHITECTURES[family]], vocab_size=cfg.vocab_size,
             hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
             num_key_value_heads=cfg.num_kv_heads, num_experts_per_tok=cfg.top_k, hidden_act="silu",
             rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_word_embeddings, attention_dropout=0.0,
             rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    if cfg.attention_head_dim:
        m["head_dim"] = cfg.attention_head_dim
    if family == "olmoe":
        m.update(num_experts=cfg.num_experts, intermediate_size=cfg.expert_intermediate_size,
                 norm_topk_prob=cfg.norm_topk_prob, attention_bias=cfg.attention_bias, clip_qkv=None)
    elif family == "mixtral":
        m.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.expert_intermediate_size,
                 sliding_window=None, router_jitter_noise=0.0)
    else:
        m.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.expert_intermediate_size,
                 norm_topk_prob=cfg.norm_topk_prob, mlp_only_layers=list(cfg.dense_layers), decoder_sparse_step=1,
                 use_sliding_window=False)
        if cfg.dense_layers:
            m["intermediate_size"] = cfg.dense_intermediate_size
        if family == "qwen2_moe":
            m.update(shared_expert_intermediate_size=cfg.shared_intermediate_size, qkv_bias=cfg.attention_bias,
                     layer_types=["full_attention"] * cfg.num_layers)
        else:
            m.update(attention_bias=cfg.attention_bias)
    given = {k: v for k, v in (base or {}).items() if k not in ("rope_scaling", "rope_theta", "layer_types")}
    return _config_class(family).from_dict({**given, **m}).to_dict()
