"""transformers checkpoints in and out of the engine: one party's Backbone and ExpertShard from a local checkpoint
folder, and a backbone plus a set of expert shards back to a folder ``AutoModelForCausalLM.from_pretrained``
loads (the config mapping is in hf_config.py).

Reading is lazy: safetensors' ``safe_open`` maps each file and reads only the tensors asked for, so a party
reads its backbone and, of the routed experts, only its own (expert e on party e mod n): never another party's
expert weights. Experts come in two on-disk layouts, per MoE layer:

- per expert (what transformers 5.x ``save_pretrained`` writes, and the hub checkpoints):
  ``mlp.experts.{e}.{gate,up,down}_proj.weight``; Mixtral ``block_sparse_moe.experts.{e}.{w1,w3,w2}.weight``
  (w1 gate, w3 up, w2 down);
- fused (transformers' in-memory layout, e.g. a ``save_file(model.state_dict())``):
  ``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first) and ``mlp.experts.down_proj`` [E, H, I], of which
  a party reads only its experts' rows.

Writing uses the per-expert layout, in safetensors files of at most ``max_shard_bytes`` (with a
``model.safetensors.index.json`` when there are several), each written whole then renamed into place, then the
tokenizer's files, and config.json last: a folder with a config.json is complete.
"""

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from .config import ModelConfig
from .hf_config import hf_config
from .model import Backbone, empty_backbone
from .protocol import ExpertShard

__all__ = ["CheckpointReader", "load_hf_weights", "load_party", "hf_state_dict", "check_new_folder",
           "save_hf_checkpoint", "load_hf_tokenizer", "checkpoint_files", "TOKENIZER_FILES"]

INDEX = "model.safetensors.index.json"
# What a checkpoint folder holds beside its weights and config.json that a model exported from it needs: the
# tokenizer (as save_pretrained writes it, fast or slow) and the generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json")

# Backbone parameter name -> transformers name; {moe} is the layer's MoE block (Mixtral: block_sparse_moe).
_BACKBONE_NAMES = [
    (r"embed\.", "model.embed_tokens."),
    (r"norm\.", "model.norm."),
    (r"lm_head\.", "lm_head."),
    (r"blocks\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"blocks\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"blocks\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"blocks\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
    (r"blocks\.(\d+)\.moe\.router\.", r"model.layers.\1.{moe}.gate."),
    (r"blocks\.(\d+)\.moe\.shared\.gate\.", r"model.layers.\1.{moe}.shared_expert_gate."),
    (r"blocks\.(\d+)\.moe\.shared\.", r"model.layers.\1.{moe}.shared_expert."),
]


def _moe_blocks(family: str) -> tuple[str, ...]:
    """The names of an MoE layer's block: the one save_pretrained writes first."""
    return ("block_sparse_moe", "mlp") if family == "mixtral" else ("mlp",)


def _expert_projections(family: str) -> tuple[str, str, str]:
    """The per-expert names of the (gate, up, down) projections."""
    return ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def hf_name(name: str, family: str) -> str:
    """The transformers name (as save_pretrained writes it) of a Backbone parameter."""
    for pattern, replacement in _BACKBONE_NAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name, count=1).format(moe=_moe_blocks(family)[0])
    raise KeyError(f"no transformers name for backbone parameter {name!r}")


def _alternatives(name: str, family: str) -> list[str]:
    """A transformers name, and the same under the MoE block's other names (Mixtral: mlp)."""
    first, *others = _moe_blocks(family)
    return [name] + [name.replace(f".{first}.", f".{other}.") for other in others if f".{first}." in name]


class CheckpointReader:
    """The tensors of a checkpoint folder's *.safetensors files, read lazily. With an index, every file it
    names must exist and hold the tensors it lists; without one, every *.safetensors file is read."""

    REMAP_ELEMENTS = 2**26  # 128 MiB in bf16

    def __init__(self, directory):
        self.directory = Path(directory).expanduser()
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{str(index)!r} is not a safetensors index ({e!r}): restore it") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{str(self.directory)!r} has no *.safetensors files: give a checkpoint saved "
                                 "with safetensors (save_pretrained's default)")
            weight_map = None
        self.location, self.shapes = {}, {}
        for file in files:
            path = self.directory / file
            if not path.is_file():
                raise ValueError(f"shard {file!r} named by {INDEX} is missing from {str(self.directory)!r}: "
                                 "the download is incomplete; fetch every shard")
            handle = safe_open(str(path), framework="pt")  # reads the header only
            for key in handle.keys():
                if key not in self.location:
                    self.location[key], self.shapes[key] = file, handle.get_slice(key).get_shape()
        if weight_map is not None:
            for key, file in weight_map.items():
                if self.location.get(key) != file:
                    raise ValueError(f"tensor {key!r} is not in shard {file!r} as {INDEX} says: the shard is "
                                     "partial or from another checkpoint; fetch it again")
        self.read_keys: set[str] = set()
        self._mapped: dict = {}  # file -> (handle, elements read through it)

    def __contains__(self, key: str) -> bool:
        return key in self.location

    def find(self, candidates: list[str], what: str) -> str:
        for key in candidates:
            if key in self.location:
                return key
        raise ValueError(f"{str(self.directory)!r} has no tensor {candidates[0]!r} ({what}): the checkpoint is "
                         "incomplete or does not match its config.json")

    def read(self, key: str, shape: torch.Size, row: int | None = None) -> torch.Tensor:
        """The tensor ``key``, which must have ``shape``, or only its row ``row`` (one expert of a fused tensor)."""
        found = self.shapes[key]
        if found != list(shape):
            raise ValueError(f"tensor {key!r} in {str(self.directory)!r} has shape {found}, the model needs "
                             f"{list(shape)}: the checkpoint does not match its config.json")
        self.read_keys.add(key)
        handle = self._handle(self.location[key], math.prod(found[1:] if row is not None else found))
        return handle.get_tensor(key) if row is None else handle.get_slice(key)[row:row + 1][0]

    def _handle(self, file: str, elements: int):
        """An open handle on ``file``, opened anew once REMAP_ELEMENTS have been read through it: the pages of a
        mapped file count as the process's memory until it is closed, so a long-open one would add every byte
        read so far to the peak beside the model."""
        handle, read = self._mapped.get(file, (None, self.REMAP_ELEMENTS))
        if read >= self.REMAP_ELEMENTS:
            handle, read = safe_open(str(self.directory / file), framework="pt"), 0
        self._mapped[file] = (handle, read + elements)
        return handle


def _read_experts(reader: CheckpointReader, cfg: ModelConfig, layer: int,
                  experts: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(gate_up [2I, H], down [H, I]) of each expert of ``experts`` in MoE layer ``layer``, in either layout."""
    count, inter, hidden = cfg.num_experts, cfg.expert_intermediate_size, cfg.hidden_size
    blocks = [f"model.layers.{layer}.{b}" for b in _moe_blocks(cfg.family)]
    fused = next((b for b in blocks if f"{b}.experts.gate_up_proj" in reader), None)
    names = _expert_projections(cfg.family)
    for expert in experts:
        if fused is not None:
            yield (reader.read(f"{fused}.experts.gate_up_proj", torch.Size([count, 2 * inter, hidden]), row=expert),
                   reader.read(f"{fused}.experts.down_proj", torch.Size([count, hidden, inter]), row=expert))
            continue
        gate, up, down = (reader.find([f"{block}.experts.{expert}.{name}.weight" for block in blocks],
                                      f"expert {expert} of layer {layer}; a party's export without --pool holds "
                                      "only its own experts") for name in names)
        yield (torch.cat([reader.read(gate, torch.Size([inter, hidden])),
                          reader.read(up, torch.Size([inter, hidden]))]),
               reader.read(down, torch.Size([hidden, inter])))


@torch.no_grad()
def load_hf_weights(directory, backbone: Backbone, shard: ExpertShard) -> None:
    """Fill one party's ``backbone`` and ``shard`` (its experts, ``shard.expert_ids``) from a checkpoint folder
    whose config.json maps to ``backbone.cfg`` (hf_config.read_config)."""
    cfg = backbone.cfg
    reader = CheckpointReader(directory)
    for name, param in backbone.named_parameters():  # a tied LM head is the embedding: listed once
        key = reader.find(_alternatives(hf_name(name, cfg.family), cfg.family), "a backbone parameter")
        param.copy_(reader.read(key, param.shape))
    for position, layer in enumerate(cfg.moe_layers):
        for local, (gate_up, down) in enumerate(_read_experts(reader, cfg, layer, shard.expert_ids)):
            shard.w_gate_up[position][local].copy_(gate_up)
            shard.w_down[position][local].copy_(down)
    ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unused = sorted(k for k in reader.location if k not in reader.read_keys and k not in ignored
                    and not re.search(r"\.experts\.", k))
    if unused:
        raise ValueError(f"{str(reader.directory)!r} holds tensors its config.json's model does not have "
                         f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}): config and weights "
                         "disagree")


def load_party(directory, cfg: ModelConfig, party: int, parties: int, device) -> tuple[Backbone, ExpertShard]:
    """Party ``party`` of ``parties``: its backbone and its experts, allocated on ``device`` without an init and
    filled from the checkpoint folder (one tensor in host memory at a time; no other party's experts read)."""
    backbone = empty_backbone(cfg, device)
    with torch.device(device):
        shard = ExpertShard(cfg, party, parties)  # torch.empty: nothing initialised
    load_hf_weights(directory, backbone, shard)
    return backbone, shard


def load_public_experts(directory, cfg: ModelConfig, device, dtype: torch.dtype
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every routed expert of the checkpoint folder, frozen, in ``dtype``: per MoE layer [E, 2I, H] and [E, H, I]
    (privacy.public_correction)."""
    reader = CheckpointReader(directory)
    every = list(range(cfg.num_experts))
    gate_up, down = [], []
    for layer in cfg.moe_layers:
        pairs = list(_read_experts(reader, cfg, layer, every))
        gate_up.append(torch.stack([g for g, _ in pairs]).to(device, dtype))
        down.append(torch.stack([d for _, d in pairs]).to(device, dtype))
    return gate_up, down


def hf_state_dict(backbone: Backbone, shards: list[ExpertShard]) -> dict[str, torch.Tensor]:
    """The transformers state dict (per-expert layout, save_pretrained's names) of ``backbone`` with the experts
    of ``shards``: every expert once for a complete model, or some (e.g. one party's) for a partial one. The
    tensors are views of the parameters (detached, not copied)."""
    cfg = backbone.cfg
    state = {hf_name(name, cfg.family): p.detach() for name, p in backbone.named_parameters()}
    names = _expert_projections(cfg.family)
    inter, seen = cfg.expert_intermediate_size, set()
    for shard in shards:
        if seen & set(shard.expert_ids):
            raise ValueError(f"experts {sorted(seen & set(shard.expert_ids))} come from two shards: give each once")
        seen |= set(shard.expert_ids)
        for position, layer in enumerate(cfg.moe_layers):
            for local, expert in enumerate(shard.expert_ids):
                gate_up, down = shard.w_gate_up[position][local].detach(), shard.w_down[position][local].detach()
                block = f"model.layers.{layer}.{_moe_blocks(cfg.family)[0]}.experts.{expert}"
                state.update({f"{block}.{names[0]}.weight": gate_up[:inter], f"{block}.{names[1]}.weight":
                              gate_up[inter:], f"{block}.{names[2]}.weight": down})
    return state


def _write(path: Path, write) -> None:
    """Write a file whole: to a temporary name, then renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def check_new_folder(directory) -> Path:
    """``directory``, refused if it already holds a checkpoint."""
    directory = Path(directory).expanduser()
    if any(directory.glob("*.safetensors")) or (directory / "config.json").exists():
        raise ValueError(f"{str(directory)!r} already holds a checkpoint: write to a new folder, or remove it first")
    return directory


def save_hf_checkpoint(directory, backbone: Backbone, shards: list[ExpertShard], base_config: dict | None = None,
                       dtype: torch.dtype = torch.float32, max_shard_bytes: int = 5 * 2**30,
                       extra_files: dict[str, str] | None = None) -> Path:
    """Write ``backbone`` and the experts of ``shards`` as a transformers checkpoint folder (config.json and
    safetensors, sharded with an index above ``max_shard_bytes``, and ``extra_files``: name -> text, e.g. the
    tokenizer's) in a folder that holds no checkpoint yet; ``base_config`` as in hf_config. Refused, with
    nothing written: a model that is not exactly its family, an expert given twice, a non-finite weight."""
    directory = check_new_folder(directory)
    config = hf_config(backbone.cfg, base_config)  # refuses a model that is not exactly its family first
    config["dtype"] = str(dtype).removeprefix("torch.")
    state = hf_state_dict(backbone, shards)
    bad = next((name for name, tensor in state.items() if not torch.isfinite(tensor).all()), None)
    if bad is not None:
        raise ValueError(f"{bad} has NaN or infinite values: nothing written; export a checkpoint from before "
                         "training diverged")
    groups, size = [[]], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * dtype.itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    directory.mkdir(parents=True, exist_ok=True)
    files = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for file, names in zip(files, groups):  # one file's tensors in memory at a time
        tensors = {name: state[name].to(dtype=dtype, copy=True).contiguous() for name in names}
        _write(directory / file, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        del tensors
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * dtype.itemsize for t in state.values())},
                 "weight_map": {name: file for file, names in zip(files, groups) for name in names}}
        _write(directory / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    for name, text in (extra_files or {}).items():
        _write(directory / name, lambda tmp: tmp.write_text(text))
    _write(directory / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2, sort_keys=True)))
    return directory


def load_hf_tokenizer(directory, vocab_size: int) -> Tokenizer:
    """The checkpoint folder's tokenizer.json (the ``tokenizers`` library; nothing is fetched), checked to fit
    an embedding of ``vocab_size`` rows."""
    path = Path(directory).expanduser() / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{str(path.parent)!r} has no tokenizer.json: copy the checkpoint's tokenizer.json into "
                         "it (a fast tokenizer, as save_pretrained writes)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library's own parse error
        raise ValueError(f"{str(path)!r} is not a tokenizers file ({str(e).splitlines()[0]}): restore it") from None
    size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    if size > vocab_size:
        raise ValueError(f"{str(path)!r} has token ids up to {size - 1}, beyond the model's embedding of "
                         f"{vocab_size} rows: use the tokenizer that came with this checkpoint")
    return tokenizer


def checkpoint_files(directory) -> dict[str, str]:
    """What a model exported from a checkpoint folder takes from it beside the weights: its config.json and the
    TOKENIZER_FILES it holds, name -> text."""
    directory = Path(directory).expanduser()
    return {name: (directory / name).read_text() for name in ("config.json", *TOKENIZER_FILES)
            if (directory / name).is_file()}
