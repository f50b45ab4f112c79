"""The rules a run's configuration must satisfy (``load_config`` applies them): ``validate(cfg)`` returns ``cfg``,
or raises a one-line ValueError naming the option, what was wrong with it and what to do."""

import importlib.util
from pathlib import Path

from .config import BUILTIN_CORPORA, FAMILIES, Config, corpus_path, parse_address

__all__ = ["validate"]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate(cfg: Config) -> Config:
    m, d, t = cfg.model, cfg.data, cfg.train
    _require(cfg.parties >= 1, f"parties={cfg.parties}: need at least 1 party")
    _require(cfg.parties <= m.num_experts,
             f"parties={cfg.parties} exceeds model.num_experts={m.num_experts}: every party must own at least "
             "one expert; use fewer parties or more experts")
    _require(1 <= m.top_k <= m.num_experts,
             f"model.top_k={m.top_k} must be between 1 and model.num_experts={m.num_experts}")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "expert_intermediate_size"):
        _require(getattr(m, name) >= 1, f"model.{name}={getattr(m, name)} must be positive")
    _require(m.shared_intermediate_size >= 0, "model.shared_intermediate_size must be >= 0 (0: none)")
    _require(not m.shared_expert_gate or m.shared_intermediate_size > 0,
             "model.shared_expert_gate needs a shared expert: set model.shared_intermediate_size > 0")
    if m.attention_head_dim:
        _require(m.attention_head_dim > 0 and m.head_dim % 2 == 0,
                 f"model.attention_head_dim={m.attention_head_dim} must be a positive even number (0: derived)")
    else:
        _require(m.hidden_size % m.num_heads == 0 and m.head_dim % 2 == 0,
                 f"model.hidden_size={m.hidden_size} must split into num_heads={m.num_heads} heads of even size")
    _require(m.family in ("", *FAMILIES), f"model.family={m.family!r}: choose one of {', '.join(FAMILIES)}, or \"\"")
    _require(not m.qk_norm_per_head or m.qk_norm, "model.qk_norm_per_head needs model.qk_norm = true")
    _require(all(0 <= layer < m.num_layers for layer in m.dense_layers) and len(m.moe_layers) >= 1,
             f"model.dense_layers={m.dense_layers} must name layers in 0..{m.num_layers - 1} and leave at least one "
             "MoE layer")
    _require(not m.dense_layers or m.dense_intermediate_size >= 1,
             "model.dense_layers needs model.dense_intermediate_size >= 1")
    _require(m.num_heads % m.num_kv_heads == 0,
             f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}")
    if m.init_from:  # before any party starts: every shard there and whole (headers only), a tokenizer that fits
        from .hf import CheckpointReader, load_hf_tokenizer

        CheckpointReader(m.init_from)
        load_hf_tokenizer(m.init_from, m.vocab_size)
        _require(not d.tokenizer, f"data.tokenizer={d.tokenizer!r} and model.init_from both name the tokenizer: a run "
                 "that starts from a checkpoint uses the checkpoint's; drop data.tokenizer")
    else:
        _require(m.vocab_size >= 260, f"model.vocab_size={m.vocab_size}: a byte-level BPE needs at least 260")

    _require(d.split in ("iid", "noniid"), f"data.split={d.split!r}: choose 'iid' or 'noniid'")
    _require(0.0 < d.eval_fraction < 0.5, f"data.eval_fraction={d.eval_fraction} must be in (0, 0.5)")
    _require(d.seq_len >= 8, f"data.seq_len={d.seq_len} must be at least 8")
    if d.party_paths:
        _require(len(d.party_paths) == cfg.parties,
                 f"data.party_paths lists {len(d.party_paths)} paths for {cfg.parties} parties: give one per party")
        for p in d.party_paths:
            _require(Path(p).expanduser().exists(), f"data.party_paths: {p!r} does not exist")
    else:
        _require(corpus_path(d.corpus).exists(),
                 f"data.corpus={d.corpus!r} is neither a built-in corpus ({', '.join(BUILTIN_CORPORA)}) nor an "
                 "existing file or directory")
    _require(corpus_path(d.tokenizer_corpus).exists(),
             f"data.tokenizer_corpus={d.tokenizer_corpus!r} is neither a built-in corpus nor an existing path")
    _require(not d.tokenizer or Path(d.tokenizer).expanduser().is_file(),
             f"data.tokenizer={d.tokenizer!r} is not a file: give a tokenizers tokenizer.json, or \"\" for the "
             "bundled BPE")

    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches", "keep_checkpoints",
                 "nonfinite_patience"):
        _require(getattr(t, name) >= 1, f"train.{name}={getattr(t, name)} must be at least 1")
    for name in ("warmup_steps", "eval_every", "checkpoint_every", "weight_decay", "grad_clip", "aux_loss_coef",
                 "z_loss_coef"):
        _require(getattr(t, name) >= 0, f"train.{name}={getattr(t, name)} must not be negative")
    _require(t.lr > 0 and 0 <= t.lr_floor <= t.lr, f"train.lr={t.lr} must be positive and min_lr={t.lr_floor} "
             "between 0 and lr: lower train.min_lr, or leave it unset (lr / 10)")
    _require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must lie in [0, 1)")
    _require(t.device in ("auto", "cpu", "cuda"), f"train.device={t.device!r}: choose auto, cpu or cuda")
    _require(t.precision in ("auto", "bf16", "fp32"), f"train.precision={t.precision!r}: choose auto, bf16 or fp32")
    _require(t.nonfinite in ("skip", "stop"), f"train.nonfinite={t.nonfinite!r}: choose skip or stop")
    _require(t.peer_timeout_s > 0, f"train.peer_timeout_s={t.peer_timeout_s} must be positive (seconds)")
    _require(t.name not in (".", "..") and not any(c in t.name for c in "/\\\0"),
             f"train.name={t.name!r} must be a plain folder name (no '/', '\\' or '..'): the run's folder under "
             "train.out_dir")
    _require(not (t.resume and t.overwrite), "train.resume and train.overwrite are both true: resume the run in "
             "the run directory, or replace it, not both")
    for what in ("hidden", "grad"):
        clip, noise = getattr(cfg.privacy, f"{what}_clip"), getattr(cfg.privacy, f"{what}_noise")
        _require(clip >= 0 and (noise or 0) >= 0,
                 f"privacy.{what}_clip and privacy.{what}_noise must not be negative")
    _validate_transport(cfg)
    w = cfg.wire
    _require(w.dispatch in ("token", "pair"), f"wire.dispatch={w.dispatch!r}: choose token or pair")
    _require(w.combine in ("origin", "host"), f"wire.combine={w.combine!r}: choose origin or host")
    _require(not cfg.privacy.public_correction or (m.init_from and w.dispatch == "token" and w.combine == "origin"),
             "privacy.public_correction corrects with the experts of the public checkpoint every party starts from: "
             "it needs model.init_from, wire.dispatch=token and wire.combine=origin")
    for name in ("hidden_dtype", "grad_dtype"):
        _require(getattr(w, name) in ("auto", "fp8"), f"wire.{name}={getattr(w, name)!r}: choose auto or fp8")
    _require(not t.optimizer_in_backward or t.grad_accum == 1,
             f"train.optimizer_in_backward steps each parameter during backward, so it needs train.grad_accum=1 "
             f"(got {t.grad_accum}): raise train.batch_size instead")
    _require(not t.optimizer_8bit or importlib.util.find_spec("bitsandbytes") is not None,
             "train.optimizer_8bit needs bitsandbytes: pip install 'pcmoe[memory]' (or set it to false)")
    _require(not t.tensorboard or importlib.util.find_spec("tensorboard") is not None,
             "train.tensorboard=true needs the tensorboard package: pip install 'pcmoe[tensorboard]'")
    if t.device == "cuda":
        import torch

        _require(torch.cuda.is_available(), "train.device=cuda, but torch sees no GPU here; use train.device=auto "
                 "or cpu")
    return cfg


def _validate_transport(cfg: Config) -> None:
    tr = cfg.transport
    _require(tr.kind in ("torch", "tls"), f"transport.kind={tr.kind!r}: choose torch or tls")
    tls_options = ("tls_cert", "tls_key", "tls_ca")
    if tr.kind == "torch":
        given = [f"transport.{name}" for name in ("peers", *tls_options, "run_id") if getattr(tr, name)]
        _require(not given, f"{', '.join(given)} only apply to transport.kind = \"tls\": set it, or leave them out")
        return
    _require(len(tr.peers) == cfg.parties, f"transport.peers lists {len(tr.peers)} addresses for {cfg.parties} "
             "parties: give every party's host:port, in rank order")
    for i, peer in enumerate(tr.peers):
        try:
            parse_address(peer)
        except ValueError as e:
            raise ValueError(f"transport.peers[{i}]: {e}") from None
    for name in tls_options:
        path = getattr(tr, name)
        _require(bool(path), f"transport.kind = \"tls\" needs transport.{name} (docs/multihost.md says how to make "
                 "the certificates)")
        _require(Path(path).expanduser().is_file(), f"transport.{name}={path!r} does not exist")
