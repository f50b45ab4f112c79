"""Every option of a run, in one place: a TOML file and ``--set section.key=value`` overrides into dataclasses.

A run is ``Config(parties, model, data, train, privacy)``. ``model.preset`` picks the model's sizes; any size set
explicitly (in the TOML's [model] table or with --set) wins over the preset. ``validate`` rejects nonsense
with a one-line ValueError that says what was wrong and what to do.
"""

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ModelConfig", "DataConfig", "TrainConfig", "PrivacyConfig", "Config", "PRESETS", "FAMILIES", "load_config",
           "validate", "BUILTIN_CORPORA", "DEFAULT_CONFIG", "corpus_path"]

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny.toml"
# transformers model_types the engine reproduces exactly (pcmoe_engine/hf.py maps their checkpoints).
FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral")
BUILTIN_CORPORA = {"tinyshakespeare": Path(__file__).parent / "data" / "tinyshakespeare.txt.gz"}


@dataclass
class ModelConfig:
    """A decoder-only MoE transformer. The defaults are the `tiny` preset."""
    preset: str = "tiny"
    family: str = ""  # the transformers model_type (one of FAMILIES) its weights map to; "": the engine's own
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_intermediate_size: int = 256
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert's output times sigmoid(gate(x))
    norm_topk_prob: bool = True  # renormalise the k routing weights to sum to 1
    qk_norm: bool = False  # OLMoE: RMSNorm on the query and key projections
    qk_norm_per_head: bool = False  # Qwen3-MoE: that RMSNorm over each head rather than the whole projection
    attention_bias: bool = False  # Qwen: biases on the q, k, v projections
    attention_out_bias: bool = False  # a bias on the output projection too (OLMoE, Qwen3-MoE: attention_bias)
    attention_head_dim: int = 0  # 0: hidden_size // num_heads (Qwen3-MoE and Mixtral checkpoints may set it)
    rope_theta: float = 10000.0  # the default (unscaled) RoPE
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False  # the LM head is the embedding matrix
    # Layers with a dense SwiGLU MLP of dense_intermediate_size instead of an MoE (Qwen's mlp_only_layers and
    # decoder_sparse_step); they have no router and no experts.
    dense_layers: list[int] = field(default_factory=list)
    dense_intermediate_size: int = 0

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_heads

    @property
    def moe_layers(self) -> list[int]:
        """The layers with routed experts, in order; an expert shard and the wire index MoE layers by position
        in this list."""
        return [layer for layer in range(self.num_layers) if layer not in self.dense_layers]


# Sizes per preset, over ModelConfig's defaults. The two big ones are random-init shapes of the named models.
PRESETS: dict[str, dict] = {
    "tiny": {},
    "small": dict(vocab_size=16384, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                  num_experts=16, top_k=2, expert_intermediate_size=384, shared_intermediate_size=768),
    "olmoe-1b-7b": dict(vocab_size=50304, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16,
                        num_experts=64, top_k=8, expert_intermediate_size=1024, norm_topk_prob=False,
                        qk_norm=True, norm_eps=1e-5),
    "qwen1.5-moe-a2.7b": dict(vocab_size=151936, hidden_size=2048, num_layers=24, num_heads=16,
                              num_kv_heads=16, num_experts=60, top_k=4, expert_intermediate_size=1408,
                              shared_intermediate_size=5632, shared_expert_gate=True, norm_topk_prob=False,
                              attention_bias=True, rope_theta=1e6),
}


@dataclass
class DataConfig:
    corpus: str = "tinyshakespeare"  # a built-in corpus, or a text file or directory, split across the parties
    party_paths: list[str] = field(default_factory=list)  # one file or directory per party: its private data
    split: str = "iid"  # iid: speaker blocks dealt at random; noniid: contiguous stretches (different plays)
    eval_fraction: float = 0.05  # held out from each party's shard
    seq_len: int = 128
    # The shared byte-level BPE is trained on public text, so no party's private text shapes it.
    tokenizer_corpus: str = "tinyshakespeare"
    cache_dir: str = ""  # tokenizer cache; default $PCMOE_CACHE or ~/.cache/pcmoe


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8  # sequences per micro-batch, per party
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr: float = 3e-4  # the cosine schedule's floor
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # on the norm of this party's own gradients (backbone + expert shard); 0: off
    aux_loss_coef: float = 0.01  # load-balancing loss
    z_loss_coef: float = 0.001  # router z-loss
    activation_checkpointing: bool = False  # recompute each block (exchanges included) in backward
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    eval_batches: int = 4
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    checkpoints: bool = True  # false: write none (benchmarks, profiling)
    resume: bool = False  # continue from the latest checkpoint every party holds intact
    overwrite: bool = False  # replace a run already in the run directory (else starting there is refused)
    nonfinite: str = "skip"  # a step with a non-finite loss or gradient at any party: skip it everywhere, or stop
    nonfinite_patience: int = 5  # with skip: stop (the run diverged) after this many such steps in a row
    peer_timeout_s: float = 60.0  # a party silent this long (killed, hung, cut off) stops every other party
    # auto: one GPU per party when there are enough, else CPU; cuda: GPUs, which the parties share round-robin
    # (over gloo) when there are fewer GPUs than parties; cpu
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; or bf16 / fp32
    out_dir: str = "runs"
    name: str = ""  # run directory under out_dir; default <preset>-<parties>p
    wire_log: bool = False  # write every cross-party transfer to party<i>/wire.jsonl


@dataclass
class PrivacyConfig:
    """Defences on what a party sends to the hosts of its routed experts (docs/privacy.md). Each row is scaled
    to L2 norm <= clip, then N(0, (noise * clip)^2) is added to every coordinate; clip = 0 sends rows as
    they are. Rows a party keeps for its own experts never cross and are left alone."""
    hidden_clip: float = 0.0  # dispatched hidden states ("hidden")
    hidden_noise: float = 0.0
    grad_clip: float = 0.0  # gradients of the expert outputs sent back to the hosts ("output_grad")
    grad_noise: float = 0.0


@dataclass
class Config:
    parties: int = 2
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out_dir) / (self.train.name or f"{self.model.preset}-{self.parties}p")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "privacy": PrivacyConfig}


def _parse_value(text: str):
    """A --set value as TOML (numbers, booleans, lists, quoted strings), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(where: str, value, default, item: type = str):
    """Check a value against the type of the field's default (and a list's items against ``item``); ints are
    accepted for floats."""
    kind = type(default)
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        raise ValueError(f"{where} must be a {kind.__name__}, got {value!r}")
    if kind is list and not all(type(v) is item for v in value):
        raise ValueError(f"{where} must be a list of {'strings' if item is str else item.__name__ + 's'}, "
                         f"got {value!r}")
    return value


def _known(section: str) -> str:
    return ", ".join(f.name for f in dataclasses.fields(_SECTIONS[section]))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (), parties: int | None = None
                ) -> Config:
    """Read a TOML file (default: configs/tiny.toml), apply ``section.key=value`` overrides and validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} not found: pass an existing TOML file to --config")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=1e-3")
        section, dot, name = key.strip().partition(".")
        if not dot:
            if key.strip() != "parties":
                raise ValueError(f"--set {item!r}: expected section.key=value with a section among "
                                 f"{', '.join(_SECTIONS)}, or parties=N")
            raw["parties"] = _parse_value(text.strip())
            continue
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"--set {item!r}: {section} is not a section")
        raw[section][name] = _parse_value(text.strip())
    if parties is not None:
        raw["parties"] = parties
    return validate(_build(raw))


def _build(raw: dict) -> Config:
    unknown = set(raw) - {"parties", *_SECTIONS}
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}: the top level has parties and the sections "
                         f"{', '.join(_SECTIONS)}")
    sections = {}
    for section, cls in _SECTIONS.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise ValueError(f"{section} must be a table ([{section}] in TOML)")
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(cls)}
        items = {f.name: (typing.get_args(f.type) or (str,))[0] for f in dataclasses.fields(cls)}
        for name in given:
            if name not in defaults:
                raise ValueError(f"unknown option {section}.{name}; {section} has: {_known(section)}")
        if section == "model":
            preset = given.get("preset", defaults["preset"])
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
            given = {**PRESETS[preset], **given}
        sections[section] = cls(**{name: _coerce(f"{section}.{name}", value, defaults[name], items[name])
                                   for name, value in given.items()})
    parties = raw.get("parties", Config.parties)
    if type(parties) is not int:
        raise ValueError(f"parties must be an integer, got {parties!r}")
    return Config(parties=parties, **sections)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def corpus_path(name: str) -> Path:
    """A built-in corpus name or a path to a text file or directory."""
    return BUILTIN_CORPORA.get(name, Path(name).expanduser())


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

    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches", "keep_checkpoints",
                 "nonfinite_patience"):
        _require(getattr(t, name) >= 1, f"train.{name}={getattr(t, name)} must be at least 1")
    for name in ("warmup_steps", "eval_every", "checkpoint_every", "weight_decay", "grad_clip", "aux_loss_coef",
                 "z_loss_coef"):
        _require(getattr(t, name) >= 0, f"train.{name}={getattr(t, name)} must not be negative")
    _require(t.lr > 0 and 0 <= t.min_lr <= t.lr, f"train.lr={t.lr} must be positive and min_lr={t.min_lr} "
             "between 0 and lr")
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
        _require(clip >= 0 and noise >= 0, f"privacy.{what}_clip and privacy.{what}_noise must not be negative")
        _require(noise == 0 or clip > 0, f"privacy.{what}_noise={noise} needs privacy.{what}_clip > 0: the noise "
                 f"std is noise * clip")
    if t.device == "cuda":
        import torch

        _require(torch.cuda.is_available(), "train.device=cuda, but torch sees no GPU here; use train.device=auto "
                 "or cpu")
    return cfg
