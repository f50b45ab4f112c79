"""transformers checkpoints in and out of the engine (pcmoe_engine/hf.py, hf_config.py).

Tiny random checkpoints of each family, written by transformers' save_pretrained: the engine's logits at 1, 2 and
4 parties equal transformers' on the same weights (every party loads the checkpoint's backbone and only its own
experts, so every party's logits must match); a party reads exactly its backbone and its experts' bytes; the
export loads back into transformers with no missing, unexpected or mismatched keys; bad input is one line.
"""

import json
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM

import pcmoe_engine.hf as hf
from helpers import FAMILIES, end_party, make_checkpoint, rel_err
from pcmoe_engine.cli import free_port
from pcmoe_engine.config import PRESETS, ModelConfig, load_config
from pcmoe_engine.hf import CheckpointReader, load_hf_tokenizer, load_hf_weights, save_hf_checkpoint
from pcmoe_engine.hf_config import config_from_hf, hf_config, read_config
from pcmoe_engine.model import Backbone
from pcmoe_engine.protocol import DistributedExperts, ExpertShard, Wire, owned_experts

TOKENS = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (folder, the transformers model's logits on TOKENS)."""
    result = {}
    for family in FAMILIES:
        directory = tmp_path_factory.mktemp(family)
        with torch.no_grad():
            result[family] = (directory, make_checkpoint(family, directory)(TOKENS).logits)
    return result


def engine_logits(directory, party: int = 0, parties: int = 1, group=None) -> torch.Tensor:
    cfg = read_config(directory)
    backbone, shard = Backbone(cfg), ExpertShard(cfg, party, parties)
    load_hf_weights(directory, backbone, shard)
    with torch.no_grad():
        return backbone(TOKENS, DistributedExperts(shard, Wire(party, parties, group)))[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_party_equals_transformers(family, checkpoints):
    directory, reference = checkpoints[family]
    assert rel_err(engine_logits(directory), reference) <= 1e-5


def _party(rank, parties, port, folders, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=parties)
    logits = {family: engine_logits(directory, rank, parties, dist.group.WORLD) for family, directory in folders}
    torch.save(logits, os.path.join(out_dir, f"party{rank}.pt"))
    end_party()


@pytest.mark.slow
@pytest.mark.parametrize("parties", [2, 4])
def test_parties_equal_transformers(parties, checkpoints, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # spawned parties run csrc_triton's CPU references
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    folders = [(family, str(directory)) for family, (directory, _) in checkpoints.items()]
    mp.spawn(_party, args=(parties, free_port(), folders, str(tmp_path)), nprocs=parties)
    for party in range(parties):
        logits = torch.load(tmp_path / f"party{party}.pt")
        for family, (_, reference) in checkpoints.items():
            assert rel_err(logits[family], reference) <= 1e-5, (party, family)


def test_config_mapping_and_back(checkpoints):
    cfgs = {family: read_config(directory) for family, (directory, _) in checkpoints.items()}
    assert cfgs["olmoe"].tie_word_embeddings and cfgs["olmoe"].qk_norm and not cfgs["olmoe"].qk_norm_per_head
    assert (cfgs["qwen2_moe"].dense_layers, cfgs["qwen2_moe"].moe_layers) == ([1], [0, 2])
    assert cfgs["qwen2_moe"].shared_expert_gate and cfgs["qwen2_moe"].attention_bias
    assert (cfgs["qwen3_moe"].dense_layers, cfgs["qwen3_moe"].head_dim) == ([0, 2], 12)
    assert cfgs["qwen3_moe"].qk_norm_per_head and cfgs["qwen3_moe"].attention_out_bias
    assert cfgs["mixtral"].norm_topk_prob and cfgs["mixtral"].rope_theta == 1e6 and cfgs["mixtral"].head_dim == 12
    for family, cfg in cfgs.items():
        assert config_from_hf(hf_config(cfg)) == cfg, family


def test_dense_layers_from_the_command_line():
    cfg = load_config(None, ["model.dense_layers=[0]", "model.dense_intermediate_size=64"])
    assert cfg.model.moe_layers == [1, 2, 3]
    with pytest.raises(ValueError, match=re.escape("model.dense_layers must be a list of ints")):
        load_config(None, ["model.dense_layers=['0']"])
    with pytest.raises(ValueError, match=re.escape("model.dense_layers needs model.dense_intermediate_size")):
        load_config(None, ["model.dense_layers=[0]"])


class CountingSafeOpen:
    """safetensors.safe_open that counts the bytes of every tensor (or slice of one) it hands out."""

    read: dict[str, int] = {}

    def __init__(self, path, framework):
        self.inner = safe_open(path, framework)

    def keys(self):
        return self.inner.keys()

    def get_tensor(self, key):
        return self._count(key, self.inner.get_tensor(key))

    def get_slice(self, key):
        outer, inner = self, self.inner.get_slice(key)

        class Slice:
            get_shape = inner.get_shape

            def __getitem__(self, index):
                return outer._count(key, inner[index])
        return Slice()

    def _count(self, key, tensor):
        CountingSafeOpen.read[key] = CountingSafeOpen.read.get(key, 0) + tensor.numel() * tensor.element_size()
        return tensor


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_a_party_reads_only_its_experts(layout, tmp_path, monkeypatch):
    """Party 1 of 4 reads every backbone byte once and, of the experts, exactly its own (1 and 5) bytes."""
    family = "mixtral"  # its fused layout also tests the in-memory names (mlp, not block_sparse_moe)
    model = make_checkpoint(family, tmp_path)
    if layout == "fused":
        os.remove(tmp_path / "model.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(hf, "safe_open", CountingSafeOpen)
    monkeypatch.setattr(CountingSafeOpen, "read", {})
    cfg = read_config(tmp_path)
    backbone, shard = Backbone(cfg), ExpertShard(cfg, 1, 4)
    load_hf_weights(tmp_path, backbone, shard)

    assert shard.expert_ids == owned_experts(1, 4, 8) == [1, 5]
    backbone_bytes = sum(p.numel() * 4 for p in backbone.parameters())
    expert_bytes = len(cfg.moe_layers) * len(shard.expert_ids) * 3 * cfg.expert_intermediate_size * cfg.hidden_size * 4
    assert sum(CountingSafeOpen.read.values()) == backbone_bytes + expert_bytes
    others = [f"experts.{e}." for e in range(8) if e not in shard.expert_ids]
    assert not [key for key in CountingSafeOpen.read if any(o in key for o in others)]
    experts = model.model.layers[1].mlp.experts
    assert torch.equal(shard.w_gate_up[1], experts.gate_up_proj.detach()[[1, 5]])
    assert torch.equal(shard.w_down[1], experts.down_proj.detach()[[1, 5]])


def test_public_experts_are_every_expert_of_the_checkpoint(checkpoints):
    """privacy.public_correction's frozen copy: every routed expert of every MoE layer, as a whole shard reads them."""
    directory = checkpoints["mixtral"][0]
    cfg = read_config(directory)
    whole = ExpertShard(cfg)
    load_hf_weights(directory, Backbone(cfg), whole)
    gate_up, down = hf.load_public_experts(directory, cfg, "cpu", torch.float32)
    assert len(gate_up) == len(down) == len(cfg.moe_layers)
    for layer in range(len(cfg.moe_layers)):
        assert torch.equal(gate_up[layer], whole.w_gate_up[layer].detach())
        assert torch.equal(down[layer], whole.w_down[layer].detach())
        assert not gate_up[layer].requires_grad


@pytest.mark.parametrize("family", FAMILIES)
def test_pooled_export_loads_into_transformers(family, checkpoints, tmp_path):
    """The three parties' shards, pooled, written in several files: transformers loads every key, the weights
    are the original checkpoint's, and so are the logits."""
    directory, reference = checkpoints[family]
    cfg = read_config(directory)
    backbone, shards = Backbone(cfg), [ExpertShard(cfg, p, 3) for p in range(3)]
    for shard in shards:
        load_hf_weights(directory, backbone, shard)
    base = json.loads((directory / "config.json").read_text())
    save_hf_checkpoint(tmp_path, backbone, shards, base_config=base, max_shard_bytes=40_000)
    assert (tmp_path / hf.INDEX).is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == set() and not info["mismatched_keys"]
    original = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    assert all(torch.equal(t, original[k]) for k, t in model.state_dict().items())
    with torch.no_grad():
        assert rel_err(model.eval()(TOKENS).logits, reference) <= 1e-6
    assert engine_logits(tmp_path).equal(engine_logits(directory))  # and the engine reads it back


def test_a_party_alone_exports_a_partial_checkpoint(checkpoints, tmp_path):
    """Its backbone and its own experts only; the engine reads that party back from it."""
    directory, _ = checkpoints["qwen2_moe"]
    cfg = read_config(directory)
    backbone, shard = Backbone(cfg), ExpertShard(cfg, 0, 2)
    load_hf_weights(directory, backbone, shard)
    save_hf_checkpoint(tmp_path, backbone, [shard])
    experts = {key for key in CheckpointReader(tmp_path).location if ".experts." in key}
    assert experts == {f"model.layers.{layer}.mlp.experts.{e}.{name}.weight" for layer in (0, 2) for e in (0, 2, 4, 6)
                       for name in ("gate_proj", "up_proj", "down_proj")}
    again = ExpertShard(cfg, 0, 2)
    load_hf_weights(tmp_path, Backbone(cfg), again)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), shard.parameters()))
    with pytest.raises(ValueError, match=re.escape("has no tensor 'model.layers.0.mlp.experts.1.gate_proj.weight'")):
        load_hf_weights(tmp_path, Backbone(cfg), ExpertShard(cfg, 1, 2))
    with pytest.raises(ValueError, match=re.escape("experts [0, 2, 4, 6] come from two shards")):
        save_hf_checkpoint(tmp_path / "twice", backbone, [shard, shard])


def test_export_refuses_bad_models_and_writes_nothing(checkpoints, tmp_path):
    cfg = ModelConfig(**{**PRESETS["small"], "family": "mixtral"})  # a shared expert: no transformers family
    with pytest.raises(ValueError, match=re.escape("a mixtral model has model.shared_intermediate_size=0, this one "
                                                   "768")):
        save_hf_checkpoint(tmp_path, Backbone(cfg), [])
    directory, _ = checkpoints["mixtral"]
    cfg = read_config(directory)
    backbone, shard = Backbone(cfg), ExpertShard(cfg)
    load_hf_weights(directory, backbone, shard)
    with torch.no_grad():
        shard.w_down[1][3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=re.escape("model.layers.1.block_sparse_moe.experts.3.w2.weight has NaN")):
        save_hf_checkpoint(tmp_path, backbone, [shard])
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=re.escape("already holds a checkpoint")):
        save_hf_checkpoint(directory, backbone, [shard])


def _tokenizer(directory, size: int) -> None:
    vocab = {f"t{i}": i for i in range(size - 1)} | {"[UNK]": size - 1}
    Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(directory / "tokenizer.json"))


def test_tokenizer_loads_from_the_folder(tmp_path):
    _tokenizer(tmp_path, 300)
    assert load_hf_tokenizer(tmp_path, 300).encode("t7").ids == [7]


def _drop_tensor(directory, family):
    model = make_checkpoint(family, directory)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k != "model.layers.0.self_attn.q_proj.weight"}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _sharded(directory, family):
    model = make_checkpoint(family, directory)
    os.remove(directory / "model.safetensors")
    model.save_pretrained(directory, max_shard_size="20KB")
    return json.loads((directory / hf.INDEX).read_text())["weight_map"]


def _missing_shard(directory, family):
    weight_map = _sharded(directory, family)
    os.remove(directory / weight_map["model.norm.weight"])


def _partial_shard(directory, family):
    weight_map = _sharded(directory, family)
    index = json.loads((directory / hf.INDEX).read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = weight_map["model.norm.weight"]
    (directory / hf.INDEX).write_text(json.dumps(index))


def _edit_config(**changes):
    def edit(directory, family):
        make_checkpoint(family, directory)
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


def _load(directory):
    cfg = read_config(directory)
    load_hf_weights(directory, Backbone(cfg), ExpertShard(cfg))


def _tokenizer_check(size):
    def check(directory):
        if size:
            _tokenizer(directory, size)
        load_hf_tokenizer(directory, 300)
    return check


@pytest.mark.parametrize("family,prepare,action,message", [
    ("olmoe", None, lambda d: read_config(d / "nowhere"), "does not exist: give a local transformers checkpoint"),
    ("olmoe", lambda d, f: None, read_config, "has no config.json"),
    ("olmoe", lambda d, f: (make_checkpoint(f, d), os.remove(d / "model.safetensors")), _load,
     "has no *.safetensors files"),
    ("qwen3_moe", _missing_shard, _load, "named by model.safetensors.index.json is missing"),
    ("qwen3_moe", _partial_shard, _load, "tensor 'model.layers.0.extra.weight' is not in shard"),
    ("mixtral", _drop_tensor, _load, "has no tensor 'model.layers.0.self_attn.q_proj.weight'"),
    ("olmoe", _edit_config(intermediate_size=20), _load, "has shape [24, 32], the model needs [20, 32]"),
    ("olmoe", _edit_config(model_type="llama"), read_config, "model_type 'llama' is not supported; the engine "
     "reproduces OlmoeForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, MixtralForCausalLM"),
    ("olmoe", _edit_config(model_type="deepseek_v3"), read_config, "DeepSeek-V3 is not supported: its multi-head "
     "latent attention"),
    ("mixtral", _edit_config(sliding_window=8), read_config, "sliding-window attention is not implemented"),
    ("qwen2_moe", _edit_config(use_sliding_window=True, sliding_window=8,
                               layer_types=["sliding_attention", "full_attention", "full_attention"]), read_config,
     "sliding-window attention is not implemented"),
    ("qwen3_moe", _edit_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     read_config, "RoPE type 'linear' is not implemented"),
    ("olmoe", _edit_config(clip_qkv=8.0), read_config, "clip_qkv=8.0 is not implemented"),
    ("olmoe", lambda d, f: None, _tokenizer_check(0), "has no tokenizer.json"),
    ("olmoe", lambda d, f: None, _tokenizer_check(400), "has token ids up to 399, beyond the model's embedding of "
     "300 rows"),
])
def test_bad_input_is_one_line(family, prepare, action, message, tmp_path):
    if prepare is not None:
        prepare(tmp_path, family)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        action(tmp_path)
    assert "\n" not in str(info.value)


def test_config_and_weights_that_disagree(tmp_path):
    """A checkpoint with tensors its config.json's model lacks (here: q, k, v biases) is refused, not half-read."""
    make_checkpoint("olmoe", tmp_path, attention_bias=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_bias": False}))
    with pytest.raises(ValueError, match=re.escape("holds tensors its config.json's model does not have "
                                                   "(model.layers.0.self_attn.k_proj.bias")):
        _load(tmp_path)
