"""Every option of a run, in one place: a TOML file and ``--set section.key=value`` overrides into dataclasses.

A run is ``Config(parties, model, data, train, privacy, transport, wire)``. ``model.preset`` picks the model's
sizes; any size set explicitly (in the TOML's [model] table or with --set) wins over the preset. ``model.init_from``
(a local transformers checkpoint folder) instead takes the whole model section from the folder's config.json: the
preset is bypassed, and a size set explicitly must agree with it. A run preset (``--preset NAME``) is a packaged
configs/NAME.toml, or the default run with that model preset. ``load_config`` ends in ``validate.validate``,
which rejects nonsense with a one-line ValueError that says what was wrong and what to do.

An option's documentation is the comment on its line (or the comment lines right above it): `pcmoe train --help`
and `pcmoe config show` print it (config_text.py), and a test checks that every option has one.
"""

import argparse
import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ModelConfig", "DataConfig", "TrainConfig", "PrivacyConfig", "TransportConfig", "WireConfig", "Config",
           "SHARED_START_NOISE", "PRESETS", "FAMILIES", "load_config", "BUILTIN_CORPORA", "CONFIGS", "DEFAULT_CONFIG",
           "SECTIONS", "corpus_path", "preset_config", "add_config_arguments", "parse_address"]

CONFIGS = Path(__file__).parent / "configs"  # the packaged run presets, installed with the package
DEFAULT_CONFIG = CONFIGS / "tiny.toml"
# transformers model_types the engine reproduces exactly (pcmoe_engine/hf.py maps their checkpoints).
FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral")
BUILTIN_CORPORA = {"tinyshakespeare": Path(__file__).parent / "data" / "tinyshakespeare.txt.gz"}
# The noise multiplier on hidden states and output gradients when the parties start from a public checkpoint
# (model.init_from) and privacy.*_noise is unset: the setting bench/results/privacy/report.md measures.
SHARED_START_NOISE = 0.5


@dataclass
class ModelConfig:
    """A decoder-only MoE transformer. The defaults are the `tiny` preset."""
    preset: str = "tiny"  # the sizes to start from (PRESETS below: tiny, small, olmoe-1b-7b, qwen1.5-moe-a2.7b)
    family: str = ""  # the transformers model_type its weights map to (FAMILIES: olmoe, qwen2_moe, qwen3_moe, mixtral)
    vocab_size: int = 2048  # token ids 0 .. vocab_size - 1 (at least the tokenizer's vocabulary)
    hidden_size: int = 128  # width of the residual stream
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # attention (query) heads
    num_kv_heads: int = 4  # key/value heads (grouped-query attention when fewer than num_heads)
    num_experts: int = 8  # routed experts per MoE layer, dealt round-robin: party i owns experts e with e mod n == i
    top_k: int = 2  # routed experts per token
    expert_intermediate_size: int = 256  # each routed expert's SwiGLU width
    shared_intermediate_size: int = 0  # the shared (always-on) expert's SwiGLU width; 0: none
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert's output times sigmoid(gate(x))
    norm_topk_prob: bool = True  # renormalise the k routing weights to sum to 1
    qk_norm: bool = False  # OLMoE: RMSNorm on the query and key projections
    qk_norm_per_head: bool = False  # Qwen3-MoE: that RMSNorm over each head rather than the whole projection
    attention_bias: bool = False  # Qwen: biases on the q, k, v projections
    attention_out_bias: bool = False  # a bias on the output projection too (OLMoE, Qwen3-MoE: attention_bias)
    attention_head_dim: int = 0  # per-head width; 0: hidden_size // num_heads (Qwen3-MoE, Mixtral may set it)
    rope_theta: float = 10000.0  # the base of the default (unscaled) RoPE
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # the LM head is the embedding matrix
    # Layers with a dense SwiGLU MLP of dense_intermediate_size instead of an MoE (Qwen's mlp_only_layers and
    # decoder_sparse_step); they have no router and no experts.
    dense_layers: list[int] = field(default_factory=list)
    dense_intermediate_size: int = 0  # the dense layers' SwiGLU width
    # A local transformers checkpoint folder (config.json, *.safetensors, tokenizer.json) the parties start from:
    # every field above comes from its config.json, each party loads its backbone and its own experts from it
    # and tokenises its text with its tokenizer. "": random init.
    init_from: str = ""

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
    """What each party trains on. Text is cut into blocks (paragraphs, and pieces of at most 4,000 characters of
    longer ones); the last eval_fraction of each party's blocks is held out."""
    corpus: str = "tinyshakespeare"  # a built-in corpus, or a text file or directory, split across the parties
    party_paths: list[str] = field(default_factory=list)  # one file or directory per party: its private data
    split: str = "iid"  # iid: blocks dealt at random; noniid: contiguous stretches (Tiny Shakespeare: different plays)
    eval_fraction: float = 0.05  # the share of each party's blocks held out for evaluation (its last ones)
    seq_len: int = 128  # tokens per training sequence
    tokenizer: str = ""  # a tokenizers tokenizer.json file; "": the bundled byte-level BPE (tokenizer_corpus)
    # The bundled byte-level BPE (model.vocab_size entries) is trained on this public text, so no party's private
    # text shapes it.
    tokenizer_corpus: str = "tinyshakespeare"
    cache_dir: str = ""  # tokenizer cache; default $PCMOE_CACHE or ~/.cache/pcmoe


@dataclass
class TrainConfig:
    """The training loop, its optimizer (AdamW, warmup then cosine), logging and checkpoints."""
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch, per party
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # peak learning rate, after the warmup
    min_lr: float | None = None  # the cosine schedule's floor; unset: lr / 10
    warmup_steps: int = 20  # linear warmup from 0 to lr
    weight_decay: float = 0.1  # AdamW's, on matrices only (not on norms and biases)
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    # Bounds two gradient norms of this party, each clipped on its own: its backbone's to grad_clip, its expert
    # shard's to grad_clip x sqrt(local experts / model.num_experts), so that the parties' shards together are held
    # to grad_clip, as a centralized run's whole expert set is (an expert's gradient is the mean over every party's
    # tokens: protocol.py); 0: off
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss
    z_loss_coef: float = 0.001  # weight of the router z-loss
    # Recompute each block in backward from what its forward received: the exchanges replay, nothing crosses
    # again (protocol.DistributedExperts.recomputable); less memory for about a third more forward compute.
    activation_checkpointing: bool = False
    fused_optimizer: bool = True  # on GPUs, AdamW's fused kernel: one launch, no parameter-sized temporaries
    # bitsandbytes' AdamW8bit: both moments in 8 bits (blockwise scales), 1/4 of AdamW's state (GPU only;
    # `pip install 'pcmoe[memory]'`); tensors under 4096 elements keep 32-bit state
    optimizer_8bit: bool = False
    # Step each parameter as soon as its gradient is complete, then free the gradient: no gradient memory. A
    # global gradient norm is then unknown when the first parameter steps, so train.grad_clip clips each
    # parameter's gradient to grad_clip * sqrt(its share of the parameters) (the global norm stays <= grad_clip).
    # Needs grad_accum = 1.
    optimizer_in_backward: bool = False
    pin_cpus: bool = True  # on GPUs: run each party's process on the CPU cores of its GPU's NUMA node
    seed: int = 0  # seeds every random draw (weights, data split and order, noise)
    log_every: int = 10  # a progress line every this many steps
    eval_every: int = 0  # evaluate every this many steps; 0: at the end only
    eval_batches: int = 4  # batches of held-out text per evaluation
    checkpoint_every: int = 0  # checkpoint every this many steps; 0: only at the end
    keep_checkpoints: int = 2  # the newest this many checkpoints are kept
    checkpoints: bool = True  # write checkpoints; false: none (benchmarks, profiling)
    resume: bool = False  # continue from the latest checkpoint every party holds intact
    overwrite: bool = False  # replace a run already in the run directory (else starting there is refused)
    # A step with a non-finite loss or gradient at any party: skip it at every party, or stop the run
    nonfinite: str = "skip"
    nonfinite_patience: int = 5  # with skip: stop (the run diverged) after this many such steps in a row
    peer_timeout_s: float = 60.0  # a party silent this long (killed, hung, cut off) stops every other party
    # auto: one GPU per party when there are enough, else CPU; cuda: GPUs, which the parties share round-robin
    # (over gloo) when there are fewer GPUs than parties; cpu
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; or bf16 / fp32
    out_dir: str = "runs"  # the folder of run folders
    name: str = ""  # run directory under out_dir; default <preset>-<parties>p
    wire_log: bool = False  # write every cross-party transfer to party<i>/wire.jsonl
    tensorboard: bool = False  # TensorBoard event files in party<i>/ (pip install 'pcmoe[tensorboard]')

    @property
    def lr_floor(self) -> float:
        """min_lr, or lr / 10 when it is unset (so that --set train.lr=... alone keeps the schedule valid)."""
        return self.lr / 10 if self.min_lr is None else self.min_lr


@dataclass
class PrivacyConfig:
    """Defences on what a party sends to the hosts of its routed experts (docs/privacy.md). Each row is scaled
    to L2 norm <= clip, then N(0, (noise * clip)^2) is added to every coordinate, drawn once per (token, host)
    and layer: a token's copies to one host carry the same noise. Rows a party keeps for its own experts never
    cross and are left alone. With model.init_from (every party starts from weights the hosts know) an unset
    noise is SHARED_START_NOISE (measured: bench/results/privacy/report.md)."""
    # L2 bound on each dispatched hidden-state row ("hidden"); 0: none, or, with noise, the median norm of the
    # rows of each exchange (scale-free: it follows the model's width and the norms' drift in training)
    hidden_clip: float = 0.0
    hidden_noise: float | None = None  # noise multiplier on those rows; unset: 0, or 0.5 with model.init_from
    grad_clip: float = 0.0  # the same on the gradients of expert outputs sent back to the hosts ("output_grad")
    grad_noise: float | None = None  # noise multiplier on those gradients; unset as hidden_noise
    # each step and layer, the rows a party sends a host cross in a fresh secret order (undone when they return),
    # so the host can tie a row neither to its position in the batch nor to the same token at other layers
    shuffle: bool = True
    # with a public starting checkpoint (model.init_from): the origin adds f0(x) - f0(row sent) to each output a
    # host returns, f0 the public expert (held frozen), so the noise's effect cancels to first order in how far the
    # host's expert has moved from f0; nothing more crosses (protocol.DistributedExperts._public_correction)
    public_correction: bool = False

    def resolved(self, shared_start: bool) -> "PrivacyConfig":
        """The noises left unset filled in: SHARED_START_NOISE when the parties start from one public checkpoint
        (model.init_from), else 0."""
        default = SHARED_START_NOISE if shared_start else 0.0
        return dataclasses.replace(self, hidden_noise=default if self.hidden_noise is None else self.hidden_noise,
                                   grad_noise=default if self.grad_noise is None else self.grad_noise)


@dataclass
class TransportConfig:
    """How rows travel between the parties (docs/multihost.md). torch: torch.distributed (gloo, or NCCL with a GPU
    per party), neither authenticated nor encrypted: one machine, a private network or a VPN. tls: a mesh of
    mutually authenticated TLS 1.3 connections, for parties on separate sites (`pcmoe party --peers ...`)."""
    kind: str = "torch"  # torch | tls
    peers: list[str] = field(default_factory=list)  # tls: every party's host:port in rank order (each listens on its)
    tls_cert: str = ""  # tls: this party's certificate (PEM), naming pcmoe-party-<rank>.<run_id>, issued by tls_ca
    tls_key: str = ""  # tls: this party's private key (PEM)
    tls_ca: str = ""  # tls: the certificate of the CA the parties agreed on (PEM)
    run_id: str = ""  # tls: the collaboration's name in the certificates; "": the run's name (train.name or default)


@dataclass
class WireConfig:
    """What crosses between parties at each MoE layer, and in what precision (protocol.py; docs/privacy.md says
    what each choice reveals)."""
    # token: a token's hidden state crosses to a host once, however many of its experts it picked (with a
    # bitmask of which); pair: once per (token, expert), as before issue 13
    dispatch: str = "token"
    # origin: outputs return per (token, expert) and the origin combines them with its routing weights, which
    # never leave it; host: the origin sends the host its routing weights for the host's experts and gets one
    # combined row per (token, host) back (fewer bytes; the host learns the weights)
    combine: str = "origin"
    hidden_dtype: str = "auto"  # dispatched rows: auto, the activations' dtype (bf16 on GPU); fp8: e4m3, per-row scale
    grad_dtype: str = "auto"  # output gradients sent to the hosts: auto or fp8, as hidden_dtype


@dataclass
class Config:
    parties: int = 2  # parties training together, one process each
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    wire: WireConfig = field(default_factory=WireConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out_dir) / (self.train.name or f"{self.model.preset}-{self.parties}p")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "privacy": PrivacyConfig,
            "transport": TransportConfig, "wire": WireConfig}


def _parse_value(text: str):
    """A --set value as TOML (numbers, booleans, lists, quoted strings), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _types(f: dataclasses.Field) -> tuple[type, type]:
    """(value type, list item type) of a field: (int, str) for ``int``, (float, str) for ``float | None``,
    (list, int) for ``list[int]``."""
    args = [a for a in typing.get_args(f.type) if a is not type(None)]
    if typing.get_origin(f.type) is list:
        return list, args[0]
    return (args[0] if args else f.type), str


def _coerce(where: str, value, kind: type, item: type = str):
    """Check a value against the field's type (and a list's items against ``item``); ints are accepted for
    floats."""
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        raise ValueError(f"{where} must be a {kind.__name__}, got {value!r}")
    if kind is list and not all(type(v) is item for v in value):
        raise ValueError(f"{where} must be a list of {'strings' if item is str else item.__name__ + 's'}, "
                         f"got {value!r}")
    return value


def _known(section: str) -> str:
    return ", ".join(f.name for f in dataclasses.fields(SECTIONS[section]))


def preset_config(name: str) -> tuple[Path, list[str]]:
    """``--preset NAME``: (TOML file, overrides). The packaged configs/NAME.toml, or the default run with the
    model preset NAME when no such file is packaged."""
    if (CONFIGS / f"{name}.toml").is_file():
        return CONFIGS / f"{name}.toml", []
    if name in PRESETS:
        return DEFAULT_CONFIG, [f"model.preset={name}"]
    raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE or --preset NAME, and --set SECTION.KEY=VALUE: how every command is told a run's config."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="FILE", help="TOML file (default: the packaged configs/tiny.toml)")
    source.add_argument("--preset", metavar="NAME", help=f"a packaged run: {', '.join(PRESETS)} (configs/NAME.toml, "
                        "or the default run with that model preset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override an option, e.g. --set train.steps=50 (repeatable; a list: --set "
                             "\"data.party_paths=['a.txt', 'b.txt']\")")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (), parties: int | None = None,
                preset: str | None = None) -> Config:
    """Read a TOML file (default: configs/tiny.toml) or a run preset, apply ``section.key=value`` overrides and
    validate."""
    if preset is not None:
        if path is not None:
            raise ValueError("give --config or --preset, not both (--preset NAME is the packaged configs/NAME.toml)")
        path, preset_overrides = preset_config(preset)
        overrides = [*preset_overrides, *overrides]
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
                                 f"{', '.join(SECTIONS)}, or parties=N")
            raw["parties"] = _parse_value(text.strip())
            continue
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"--set {item!r}: {section} is not a section")
        raw[section][name] = _parse_value(text.strip())
    if parties is not None:
        raw["parties"] = parties
    from .validate import validate  # validate.py reads this module's dataclasses and constants

    return validate(_build(raw))


def _build(raw: dict) -> Config:
    unknown = set(raw) - {"parties", *SECTIONS}
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}: the top level has parties and the sections "
                         f"{', '.join(SECTIONS)}")
    sections = {}
    for section, cls in SECTIONS.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise ValueError(f"{section} must be a table ([{section}] in TOML)")
        types = {f.name: _types(f) for f in dataclasses.fields(cls)}
        for name in given:
            if name not in types:
                raise ValueError(f"unknown option {section}.{name}; {section} has: {_known(section)}")
        given = {name: _coerce(f"{section}.{name}", value, *types[name]) for name, value in given.items()}
        if section == "model" and given.get("init_from"):
            sections[section] = _pretrained_model(given)
            continue
        if section == "model":
            preset = given.get("preset", cls.preset)
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
            given = {**PRESETS[preset], **given}
        sections[section] = cls(**given)
    parties = raw.get("parties", Config.parties)
    if type(parties) is not int:
        raise ValueError(f"parties must be an integer, got {parties!r}")
    return Config(parties=parties, **sections)


def _pretrained_model(given: dict) -> ModelConfig:
    """The model of the checkpoint folder ``given["init_from"]``; every other option given must agree with it."""
    from .hf_config import read_config  # hf_config builds on this module

    where = given["init_from"]
    model = dataclasses.replace(read_config(where), init_from=where)
    for name, value in given.items():
        if name not in ("preset", "init_from") and value != getattr(model, name):
            raise ValueError(f"model.{name}={value!r} conflicts with {where}/config.json, which has "
                             f"{getattr(model, name)!r}: with model.init_from the model comes from the checkpoint; "
                             f"drop model.{name}")
    return model


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6 address]:port`` for IPv6) as (host, port); a one-line ValueError otherwise."""
    host, colon, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{text!r} is not host:port (expected HOST:PORT, e.g. 10.0.0.5:29500)")
    return host, int(port)


def corpus_path(name: str) -> Path:
    """A built-in corpus name or a path to a text file or directory."""
    return BUILTIN_CORPORA.get(name, Path(name).expanduser())
