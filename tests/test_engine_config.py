"""Config loading and validation (one-line errors), the data split, the tokenizer cache and the batch loader."""

import re

import pytest
import torch

from pcmoe_engine.cli import main as pcmoe
from pcmoe_engine.config import load_config
from pcmoe_engine.data import Batches, load_tokenizer, party_texts
from pcmoe_engine.party import party_device, process_group_backend


def test_defaults_are_two_party_tiny():
    cfg = load_config()
    assert cfg.parties == 2 and cfg.model.preset == "tiny" and cfg.run_dir.name == "tiny-2p"


def test_preset_then_explicit_overrides():
    cfg = load_config(None, ["model.preset=small", "model.num_layers=3", "train.lr=1", "data.split=noniid"])
    assert (cfg.model.hidden_size, cfg.model.num_layers) == (768, 3)
    assert cfg.train.lr == 1.0 and cfg.data.split == "noniid"
    olmoe = load_config(None, ["model.preset=olmoe-1b-7b", "parties=4"]).model
    assert (olmoe.num_experts, olmoe.top_k, olmoe.qk_norm) == (64, 8, True)


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('parties = 3\n[model]\nnum_experts = 6\n[train]\nsteps = 5\nname = "x"\n')
    cfg = load_config(path, ["train.steps=7"])
    assert (cfg.parties, cfg.model.num_experts, cfg.train.steps, cfg.train.name) == (3, 6, 7, "x")


@pytest.mark.parametrize("overrides,message", [
    (["parties=9"], "parties=9 exceeds model.num_experts=8"),
    (["model.top_k=9"], "model.top_k=9 must be between 1 and model.num_experts=8"),
    (["model.preset=gpt5"], "unknown preset 'gpt5'"),
    (["model.hidden=3"], "unknown option model.hidden"),
    (["optim.lr=3"], "unknown config key"),
    (["data.corpus=/no/such/text"], "data.corpus='/no/such/text' is neither"),
    (["data.party_paths=['/no/a', '/no/b']"], "data.party_paths: '/no/a' does not exist"),
    (["data.party_paths=['/']"], "lists 1 paths for 2 parties"),
    (["data.split=topic"], "data.split='topic'"),
    (["train.steps=ten"], "train.steps must be a int"),
    (["train.lr"], "expected section.key=value"),
    (["train.min_lr=1"], "min_lr=1.0 between 0 and lr"),
    (["model.num_heads=3"], "must split into num_heads=3"),
    (["train.device=tpu"], "train.device='tpu'"),
    (["privacy.public_correction=true"], "privacy.public_correction corrects with the experts of the public"),
    *([(["train.device=cuda"], "train.device=cuda, but torch sees no GPU")] if not torch.cuda.is_available() else []),
])
def test_validation_errors_are_one_line(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("device,gpus,rank,expect", [
    ("auto", 2, 1, ("cuda:1", "nccl")),  # a GPU per party
    ("auto", 1, 1, ("cpu", "gloo")),  # too few GPUs: CPU processes
    ("cuda", 1, 1, ("cuda:0", "gloo")),  # asked for GPUs: the two parties share one, over gloo
    ("cuda", 2, 1, ("cuda:1", "nccl")),
    ("cpu", 2, 1, ("cpu", "gloo")),
])
def test_party_device_and_backend(monkeypatch, device, gpus, rank, expect):
    cfg = load_config(None, ["train.device=auto"])  # validated without GPUs; the choice below is what is tested
    cfg.train.device = device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert (str(party_device(cfg)), process_group_backend(cfg)) == expect


def test_missing_config_file():
    with pytest.raises(ValueError, match=re.escape("config file '/no/such.toml' not found")):
        load_config("/no/such.toml")


def test_cli_rejects_bad_input_in_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        pcmoe(["train", "--parties", "9"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pcmoe: error: parties=9 exceeds") and err.count("\n") == 1


@pytest.mark.parametrize("split", ["iid", "noniid"])
def test_party_shards_are_disjoint(split):
    cfg = load_config(None, [f"data.split={split}", "parties=3"])
    shards = [party_texts(cfg, p) for p in range(3)]
    blocks = [set(train.split("\n\n")) | set(held_out.split("\n\n")) for train, held_out in shards]
    for p in range(3):
        train, held_out = shards[p]
        assert len(held_out) < 0.1 * len(train)
        for q in range(p + 1, 3):  # a few blocks ("All:\nCome, come.") recur in the play itself
            assert len(blocks[p] & blocks[q]) < 0.01 * len(blocks[p])


def test_party_paths(tmp_path):
    for p in range(2):
        (tmp_path / f"p{p}").mkdir()
        (tmp_path / f"p{p}" / "a.txt").write_text("\n\n".join(f"party {p} doc {i}" for i in range(40)))
    cfg = load_config(None, [f"data.party_paths=['{tmp_path / 'p0'}', '{tmp_path / 'p1'}']"])
    train, held_out = party_texts(cfg, 1)
    assert train.startswith("party 1 doc 0") and held_out == "party 1 doc 38\n\nparty 1 doc 39"


def test_tokenizer_is_cached(tmp_path):
    cfg = load_config(None, [f"data.cache_dir='{tmp_path}'", "model.vocab_size=400"])
    tokenizer = load_tokenizer(cfg.data, 400)
    assert tokenizer.get_vocab_size() == 400 and len(list(tmp_path.glob("bpe-*-400.json"))) == 1
    text = "Romeo, Romeo! wherefore art thou Romeo?"
    assert load_tokenizer(cfg.data, 400).encode(text).ids == tokenizer.encode(text).ids
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_batches_resume_where_they_stopped():
    tokens = torch.arange(1000)
    a = Batches(tokens, seq_len=10, batch_size=4, seed=(0, 1))
    for _ in range(30):  # crosses an epoch (99 windows)
        a.next()
    b = Batches(tokens, seq_len=10, batch_size=4, seed=(0, 1))
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(xa[:, 1:], ya[:, :-1])


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_packaged_configs_validate(name):
    from pcmoe_engine.config import DEFAULT_CONFIG

    assert load_config(DEFAULT_CONFIG.with_name(f"{name}.toml")).model.preset == name
