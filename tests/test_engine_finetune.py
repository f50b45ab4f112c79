"""Parties fine-tune a transformers checkpoint together and take their models out (issue 12, part B):
`model.init_from`, `pcmoe export` (alone: partial; --pool: complete), `pcmoe eval`, `pcmoe generate`, and their
bad input. Tiny checkpoints written by transformers' save_pretrained, fp32 on the CPU; each loss is compared with
transformers' own on the same tokens and windows (inference.py defines them)."""

import dataclasses
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

import pcmoe_engine.hf as hf
from helpers import FAMILIES, make_checkpoint
from pcmoe_engine.cli import free_port, main as pcmoe
from pcmoe_engine.config import DataConfig, corpus_path, load_config
from pcmoe_engine.data import load_tokenizer, read_text
from pcmoe_engine.hf_config import read_config
from pcmoe_engine.inference import generate, load_model, windows
from pcmoe_engine.model import Backbone
from pcmoe_engine.party import Party
from pcmoe_engine.protocol import ExpertShard

# On the CPU even where there is a GPU: these check what is read and computed; bench/finetune_proof.py is the GPU's.
RUN = ["data.seq_len=16", "train.batch_size=2", "train.warmup_steps=1", "train.eval_batches=1", "train.lr=1e-2",
       "train.precision=fp32", "train.log_every=100", "train.device=cpu"]


@pytest.fixture(autouse=True)
def _cpu(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PCMOE_CACHE", str(tmp_path_factory.getbasetemp() / "pcmoe-cache"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the engine on a CPU runs csrc_triton's references


def pretrained(directory, family="olmoe", **overrides):
    """A tiny random checkpoint with a tokenizer (the engine's BPE of 300 tokens; <|endoftext|> = 0 ends text)."""
    model = make_checkpoint(family, directory, eos_token_id=0, pad_token_id=1, **overrides)
    load_tokenizer(DataConfig(), 300).save(str(directory / "tokenizer.json"))
    return model


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    directory = tmp_path_factory.mktemp("olmoe")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PCMOE_CACHE", str(tmp_path_factory.getbasetemp() / "pcmoe-cache"))
        pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The parties' text: the first 60 KB of Tiny Shakespeare (each party's share is encoded at every start)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(read_text(corpus_path("tinyshakespeare"))[:60_000])
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A held-out text: the last lines of Tiny Shakespeare (no party of these runs trains on more than a slice)."""
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(read_text(corpus_path("tinyshakespeare"))[-3000:])
    return path


def transformers_loss(folder, text_file, seq_len: int) -> float:
    """transformers' mean next-token loss on the windows of inference.windows, each a sequence of its own."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.tensor(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text_file.read_text()).ids)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows(tokens, seq_len):
            logits = model(w[None, :-1]).logits[0]
            total += F.cross_entropy(logits, w[1:], reduction="sum").item()
            count += w.numel() - 1
    assert count == tokens.numel() - 1  # every token but the first, once
    return total / count


def pcmoe_json(capsys, *args) -> dict:
    pcmoe(list(map(str, args)))
    return json.loads(capsys.readouterr().out)


def one_line_error(capsys, *args) -> str:
    capsys.readouterr()  # what came before (e.g. save_pretrained's progress bar)
    with pytest.raises(SystemExit) as info:
        pcmoe(list(map(str, args)))
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("pcmoe: error: ") and err.count("\n") == 1, err
    return err


def local_run(tmp_path, init_from, corpus, parties=2, steps=0):
    """A run folder made in this process: each party built (and, with one party, trained) and saved."""
    cfg = load_config(None, [*RUN, f"parties={parties}", f"model.init_from={init_from}", f"data.corpus={corpus}",
                             f"train.out_dir={tmp_path}", "train.name=run"])
    for rank in range(parties):
        party = Party(cfg, rank)
        for _ in range(steps):
            party.step()
        party.save()
    return cfg.run_dir


def test_windows_predict_every_token_but_the_first_once():
    pieces = windows(torch.arange(10), 4)
    assert [w.tolist() for w in pieces] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    assert [w.tolist() for w in windows(torch.arange(9), 4)] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]


def test_the_model_section_comes_from_the_checkpoint(olmoe):
    cfg = load_config(None, [f"model.init_from={olmoe}", "model.hidden_size=32"])  # agreeing is fine
    assert cfg.model == dataclasses.replace(read_config(olmoe), init_from=str(olmoe))
    assert (cfg.model.family, cfg.model.preset, cfg.model.init_from) == ("olmoe", "olmoe", str(olmoe))
    assert (cfg.model.hidden_size, cfg.model.num_experts, cfg.model.tie_word_embeddings) == (32, 8, True)
    assert cfg.run_dir.name == "olmoe-2p"
    assert load_config(None, [f"model.init_from={olmoe}", "model.preset=small"]).model == cfg.model  # bypassed
    with pytest.raises(ValueError, match=re.escape(f"model.hidden_size=64 conflicts with {olmoe}/config.json, "
                                                   "which has 32")) as info:
        load_config(None, [f"model.init_from={olmoe}", "model.hidden_size=64"])
    assert "\n" not in str(info.value)


def test_a_party_starts_from_the_checkpoint_without_a_random_init(olmoe, corpus, tmp_path, monkeypatch):
    """Party 1 of 2: the checkpoint's backbone, its own experts only (no other expert's tensor read), the
    checkpoint's tokenizer, and no random init drawn first."""
    monkeypatch.setattr(Backbone, "init_weights", lambda *a: pytest.fail("random init of the backbone"))
    monkeypatch.setattr(ExpertShard, "init_weights", lambda *a: pytest.fail("random init of the experts"))
    read = []
    reader_read = hf.CheckpointReader.read
    monkeypatch.setattr(hf.CheckpointReader, "read", lambda self, key, *a, **k: (
        read.append(key), reader_read(self, key, *a, **k))[1])
    cfg = load_config(None, [*RUN, f"model.init_from={olmoe}", f"data.corpus={corpus}", f"train.out_dir={tmp_path}"])
    party = Party(cfg, 1)
    assert party.shard.expert_ids == [1, 3, 5, 7]
    assert {int(k.split(".")[5]) for k in read if ".experts." in k} == {1, 3, 5, 7}
    original = AutoModelForCausalLM.from_pretrained(olmoe).state_dict()
    assert torch.equal(party.backbone.blocks[1].attn.q_proj.weight, original["model.layers.1.self_attn.q_proj.weight"])
    assert party.backbone.lm_head.weight is party.backbone.embed.weight  # tied, as in the checkpoint
    assert torch.equal(party.shard.w_down[0][1], original["model.layers.0.mlp.experts.down_proj"][3])
    assert party.tokenizer.to_str() == Tokenizer.from_file(str(olmoe / "tokenizer.json")).to_str()
    assert party.setup["seconds"] > 0 and party.setup["peak_host_rss_bytes"] > 0


def test_a_pretrained_run_resumes_bitwise(olmoe, corpus, tmp_path):
    cfg = load_config(None, [*RUN, "parties=1", f"model.init_from={olmoe}", f"data.corpus={corpus}",
                             f"train.out_dir={tmp_path}", "train.steps=4"])
    straight = Party(cfg, 0)
    straight.step(), straight.step()
    straight.save()
    rest = [straight.step()["loss"] for _ in range(2)]
    resumed = Party(cfg, 0)
    resumed.resume()
    assert resumed.step_count == 2 and [resumed.step()["loss"] for _ in range(2)] == rest


def test_one_party_run_exports_and_evaluates_as_transformers(olmoe, corpus, text, tmp_path, capsys):
    """One party holds every expert, so its export is complete: transformers loads it with every key and its
    loss equals pcmoe eval of the run and of the folder."""
    run = local_run(tmp_path, olmoe, corpus, 1, 3)
    out = tmp_path / "export"
    pcmoe(["export", str(run), "--party", "0", "--out", str(out)])
    assert "all 8 experts" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json"]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == set() and not info["mismatched_keys"]
    reference = transformers_loss(out, text, 16)
    # on the CPU in fp32 like the reference (on a GPU machine `pcmoe eval` would pick the GPU and bf16)
    of_run = pcmoe_json(capsys, "eval", run, "--text", text, "--seq-len", 16, "--batch-size", 4, "--device", "cpu")
    of_folder = pcmoe_json(capsys, "eval", out, "--text", text, "--seq-len", 16, "--device", "cpu")
    for result in (of_run, of_folder):
        assert abs(result["loss"] / reference - 1) < 1e-4, (result, reference)
    assert of_run["model"] == {"path": str(run), "kind": "run", "party": 0, "step": 3, "parties": 1,
                               "experts": "every party's, from its checkpoint in the run folder", "device": "cpu",
                               "precision": "fp32"}
    assert of_run["tokens"] == of_folder["tokens"] and abs(of_run["perplexity"] - torch.tensor(reference).exp()) < 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_of_a_transformers_folder_equals_transformers(family, text, tmp_path, capsys):
    pretrained(tmp_path, family)
    result = pcmoe_json(capsys, "eval", tmp_path, "--text", text, "--seq-len", 24, "--batch-size", 3)
    assert abs(result["loss"] / transformers_loss(tmp_path, text, 24) - 1) < 1e-5
    assert result["model"]["kind"] == "transformers" and result["model"]["family"] == family


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_greedy_generation_equals_transformers(family, tmp_path, capsys):
    pretrained(tmp_path, family)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    engine = load_model(tmp_path)
    prompt = engine.tokenizer.encode("ROMEO: what").ids
    expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)[0].tolist()
    assert generate(engine, prompt, 12, temperature=0) == expected
    pcmoe(["generate", str(tmp_path), "--prompt", "ROMEO: what", "--max-new-tokens", "12", "--temperature", "0"])
    assert capsys.readouterr().out == engine.tokenizer.decode(expected) + "\n"
    sampled = [generate(engine, prompt, 8, temperature=1.0, seed=s) for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] and len(sampled[0]) > len(prompt)


def _edit(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def _sharded_missing_one(directory):
    pretrained(directory).save_pretrained(directory, max_shard_size="20KB")
    (directory / "model.safetensors").unlink()
    weight_map = json.loads((directory / hf.INDEX).read_text())["weight_map"]
    (directory / weight_map["model.norm.weight"]).unlink()


@pytest.mark.parametrize("prepare,command,message", [
    (None, ["eval", "{d}/nowhere", "--text", "{t}"], "does not exist: give a run folder"),
    (lambda d: d.mkdir(), ["eval", "{d}", "--text", "{t}"], "is neither a run folder (party<i>/ folders) nor a "
     "transformers checkpoint folder"),
    (lambda d: pretrained(d), ["eval", "{d}", "--text", "{d}/none.txt"], "--text '{d}/none.txt' is not a file"),
    (_sharded_missing_one, ["eval", "{d}", "--text", "{t}"], "named by model.safetensors.index.json is missing"),
    (lambda d: (pretrained(d), _edit(d, model_type="llama")), ["generate", "{d}", "--prompt", "a"],
     "model_type 'llama' is not supported; the engine reproduces OlmoeForCausalLM, Qwen2MoeForCausalLM, "
     "Qwen3MoeForCausalLM, MixtralForCausalLM"),
    (lambda d: (pretrained(d), (d / "tokenizer.json").unlink()), ["eval", "{d}", "--text", "{t}"],
     "has no tokenizer.json"),
    (lambda d: (pretrained(d), load_tokenizer(DataConfig(), 400).save(str(d / "tokenizer.json"))),
     ["eval", "{d}", "--text", "{t}"], "beyond the model's embedding of 300 rows"),
    (lambda d: pretrained(d), ["eval", "{d}", "--party", "1", "--text", "{t}"], "--party is for a run folder"),
    *([(lambda d: pretrained(d), ["generate", "{d}", "--prompt", "a", "--device", "cuda"],
        "--device cuda: choose auto, cpu")] if not torch.cuda.is_available() else []),
])
def test_bad_model_paths_are_one_line(prepare, command, message, text, tmp_path, capsys):
    directory = tmp_path / "model"
    if prepare is not None:
        prepare(directory)
    command = [c.format(d=directory, t=text) for c in command]
    assert message.format(d=directory) in one_line_error(capsys, *command)


def test_bad_init_from_is_one_line(olmoe, tmp_path):
    shutil.copytree(olmoe, tmp_path / "llama")
    _edit(tmp_path / "llama", model_type="llama")
    shutil.copytree(olmoe, tmp_path / "untokenized")
    (tmp_path / "untokenized" / "tokenizer.json").unlink()
    _sharded_missing_one(tmp_path / "shard-missing")
    for folder, message in ((tmp_path / "nowhere", "does not exist: give a local transformers checkpoint folder"),
                            (tmp_path / "llama", "model_type 'llama' is not supported"),
                            (tmp_path / "untokenized", "has no tokenizer.json"),
                            (tmp_path / "shard-missing", "named by model.safetensors.index.json is missing")):
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            load_config(None, [f"model.init_from={folder}"])
        assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def two_party_run(olmoe, corpus, tmp_path_factory):
    """A 2-party run folder at step 0 (each party built and saved in this process: no training needed)."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PCMOE_CACHE", str(tmp_path_factory.getbasetemp() / "pcmoe-cache"))
        return local_run(tmp_path_factory.mktemp("runs"), olmoe, corpus)


def test_bad_exports_are_one_line_and_write_nothing(two_party_run, text, tmp_path, capsys):
    out, taken = tmp_path / "out", tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    run = str(two_party_run)
    for command, message in (
            (["export", tmp_path / "nowhere", "--party", 0, "--out", out], "does not exist: give the folder"),
            (["export", tmp_path, "--party", 0, "--out", out], "is not a run folder"),
            (["export", run, "--party", 2, "--out", out], f"--party 2 is out of range: run {run!r} has 2 parties "
                                                          "(0 to 1)"),
            (["eval", run, "--party", 5, "--text", text], "--party 5 is out of range"),
            (["export", run, "--party", 0, "--out", out, "--step", 3], "has no checkpoint of step 3 (it has steps 0)"),
            (["export", run, "--party", 0, "--out", out, "--rendezvous", "127.0.0.1:1"], "add --pool"),
            (["export", run, "--party", 0, "--out", out, "--pool", "--rendezvous", "nowhere"], "expected HOST:PORT"),
            (["export", run, "--party", 0, "--out", taken], "already holds a checkpoint: write to a new folder")):
        assert message in one_line_error(capsys, *command)
        assert not out.exists() and [p.name for p in taken.iterdir()] == ["config.json"]

    no_checkpoint = tmp_path / "empty-run"
    (no_checkpoint / "party0").mkdir(parents=True)
    assert f"party 0 of run {str(no_checkpoint)!r} has no checkpoint (party0/checkpoints/step_*.pt)" in \
        one_line_error(capsys, "export", no_checkpoint, "--party", 0, "--out", out)
    half = tmp_path / "half-run"
    shutil.copytree(two_party_run, half)
    shutil.rmtree(half / "party1" / "checkpoints")
    assert "party 1 of run" in one_line_error(capsys, "eval", half, "--text", text)  # every shard is needed
    assert "has no checkpoint" in one_line_error(capsys, "export", half, "--party", 0, "--out", out, "--pool")
    shutil.rmtree(half / "party1")
    assert "has no folder of party 1" in one_line_error(capsys, "eval", half, "--text", text)
    assert not out.exists()


def test_a_partial_export_holds_one_partys_experts(two_party_run, text, tmp_path, capsys):
    out = tmp_path / "party1"
    pcmoe(["export", str(two_party_run), "--party", "1", "--out", str(out)])
    assert "its own 4 of the 8 experts (step 0): a partial checkpoint" in capsys.readouterr().out
    experts = {int(k.split(".")[5]) for k in hf.CheckpointReader(out).location if ".experts." in k}
    assert experts == {1, 3, 5, 7}
    assert "a party's export without --pool holds only its own experts" in one_line_error(
        capsys, "eval", out, "--text", text)


@pytest.mark.slow
def test_pool_with_a_party_absent_is_one_line_and_writes_nothing(two_party_run, tmp_path, capfd):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        pcmoe(["export", str(two_party_run), "--party", "0", "--out", str(out), "--pool", "--rendezvous",
               f"127.0.0.1:{free_port()}", "--timeout", "2"])
    err = capfd.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1, err
    assert err.startswith("pcmoe: error (party 0): not all 2 parties joined at 127.0.0.1:") and "within 2 s" in err
    assert not out.exists()


@pytest.mark.slow
def test_two_parties_fine_tune_and_pool_their_experts(olmoe, corpus, text, tmp_path, capsys):
    """`pcmoe train` from the checkpoint (2 processes over gloo), then each party's pooled export: complete for
    transformers, the same experts in both, each party's own backbone; transformers' loss on each equals
    `pcmoe eval` of the run for that party."""
    options = [*RUN, f"model.init_from={olmoe}", f"data.corpus={corpus}", f"train.out_dir={tmp_path}", "train.name=run",
               "train.steps=4"]
    pcmoe(["train", "--parties", "2", *[a for o in options for a in ("--set", o)]])
    run = tmp_path / "run"
    capsys.readouterr()
    exports = [tmp_path / f"pooled{p}" for p in range(2)]
    for party, out in enumerate(exports):
        pcmoe(["export", str(run), "--party", str(party), "--out", str(out), "--pool"])
    states = []
    for party, out in enumerate(exports):
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert info["missing_keys"] == info["unexpected_keys"] == set() and not info["mismatched_keys"]
        states.append(model.state_dict())
        result = pcmoe_json(capsys, "eval", run, "--party", party, "--text", text, "--seq-len", 16)
        assert (result["model"]["party"], result["model"]["step"]) == (party, 4)
        assert abs(result["loss"] / transformers_loss(out, text, 16) - 1) < 1e-4
    experts = [k for k in states[0] if ".experts." in k]
    assert experts and all(torch.equal(states[0][k], states[1][k]) for k in experts)
    assert not torch.equal(states[0]["model.layers.0.self_attn.q_proj.weight"],
                           states[1]["model.layers.0.self_attn.q_proj.weight"])  # private backbones, trained apart
    original = AutoModelForCausalLM.from_pretrained(olmoe).state_dict()
    assert not any(torch.equal(states[0][k], original[k]) for k in experts)  # the experts trained too


def test_public_correction_holds_every_expert_of_the_start(olmoe, corpus, tmp_path):
    """privacy.public_correction: a party built from model.init_from holds every routed expert of the checkpoint,
    frozen, beside its own shard (which the same folder filled)."""
    cfg = load_config(None, [*RUN, "parties=2", f"model.init_from={olmoe}", f"data.corpus={corpus}",
                             f"train.out_dir={tmp_path}", "train.name=run", "privacy.public_correction=true"])
    party = Party(cfg, 1)
    gate_up, down = party.experts.public_experts
    for layer, shard_layer in enumerate(party.shard.w_gate_up):
        assert gate_up[layer].shape[0] == down[layer].shape[0] == cfg.model.num_experts
        assert torch.equal(gate_up[layer][party.shard.expert_ids], shard_layer.detach())
        assert torch.equal(down[layer][party.shard.expert_ids], party.shard.w_down[layer].detach())
