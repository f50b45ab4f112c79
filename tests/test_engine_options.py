"""The options as a newcomer meets them: `pcmoe train --help` generated from the dataclasses, `pcmoe config show`
(TOML that loads back to the same Config), min_lr relative to lr, and run presets packaged with the engine."""

import dataclasses
import os
import re

import pytest

from pcmoe_engine.cli import main as pcmoe
from pcmoe_engine.config import CONFIGS, PRESETS, SECTIONS, Config, load_config
from pcmoe_engine.config_text import field_docs, toml_value
from pcmoe_engine.party import lr_at


def _options():
    yield "parties", Config
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield f"{section}.{f.name}", cls


def test_every_option_is_documented():
    undocumented = [name for name, cls in _options() if not field_docs(cls)[name.rpartition(".")[2]]]
    assert undocumented == [], f"give these options a comment in config.py: {undocumented}"


def test_field_docs_come_from_the_comments():
    model, data = field_docs(SECTIONS["model"]), field_docs(SECTIONS["data"])
    assert model["top_k"] == "routed experts per token"  # the comment on the field's line
    assert model["dense_layers"].startswith("Layers with a dense SwiGLU MLP")  # the comment lines above it
    assert model["dense_layers"].endswith("no router and no experts.")
    assert data["tokenizer_corpus"].startswith("The bundled byte-level BPE")


def test_train_help_lists_every_option_with_its_default_and_doc(capsys):
    with pytest.raises(SystemExit) as info:
        pcmoe(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    cfg = load_config()
    for name, cls in _options():
        section, _, field = name.rpartition(".")
        value = getattr(getattr(cfg, section), field) if section else cfg.parties
        shown = "unset" if value is None else toml_value(value)
        doc = " ".join(field_docs(cls)[field].split()[:4])
        assert re.search(rf"^  {re.escape(name)} = {re.escape(shown)}\n +{re.escape(doc)}", text, re.M), name
    assert "train.steps = 300" in text and "train.min_lr = unset" in text  # the default run's (configs/tiny.toml)


@pytest.mark.parametrize("args,expected", [
    ([], {}),
    (["--preset", "small", "--set", "train.lr=1e-4", "--parties", "4"],
     dict(preset="small", overrides=["train.lr=1e-4", "parties=4"])),
])
def test_config_show_loads_back_to_the_same_config(tmp_path, capsys, args, expected):
    pcmoe(["config", "show", *args])
    text = capsys.readouterr().out
    path = tmp_path / "run.toml"
    path.write_text(text)
    assert load_config(path) == load_config(**expected)
    assert "# the cosine schedule's floor; unset: lr / 10\n# min_lr: unset" in text
    assert text.startswith(f"# pcmoe config show{' ' if args else ''}{' '.join(args[:2])}")


def test_config_show_round_trips_odd_values(tmp_path, capsys):
    (tmp_path / "a").write_text("x")
    pcmoe(["config", "show", "--parties", "1", "--set", f"data.party_paths=['{tmp_path / 'a'}']", "--set",
           "model.dense_layers=[0, 2]", "--set", "model.num_layers=3", "--set",
           "model.dense_intermediate_size=64", "--set", "train.min_lr=0",
           "--set", "privacy.hidden_clip=inf", "--set", "train.name='run \"é\"'"])
    path = tmp_path / "run.toml"
    path.write_text(capsys.readouterr().out)
    cfg = load_config(path)
    assert cfg.data.party_paths == [str(tmp_path / "a")] and cfg.model.dense_layers == [0, 2]
    assert cfg.train.min_lr == 0.0 and cfg.privacy.hidden_clip == float("inf") and cfg.train.name == 'run "é"'


def test_min_lr_follows_lr_unless_set():
    cfg = load_config(None, ["train.lr=1e-4"])  # the issue: this alone failed (min_lr 3e-4 above lr)
    assert cfg.train.min_lr is None and cfg.train.lr_floor == pytest.approx(1e-5)
    assert lr_at(cfg.train.steps, cfg) == pytest.approx(1e-5)
    assert load_config(None, ["train.lr=1e-4", "train.min_lr=0"]).train.lr_floor == 0.0
    with pytest.raises(ValueError, match="lower train.min_lr, or leave it unset"):
        load_config(None, ["train.lr=1e-4", "train.min_lr=1e-3"])


def test_presets_are_packaged_and_found_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: the presets come from the installed package
    assert sorted(p.stem for p in CONFIGS.glob("*.toml")) == ["small", "tiny"]
    small = load_config(preset="small")
    assert (small.model.hidden_size, small.data.seq_len, small.train.steps) == (768, 512, 2000)
    assert load_config(preset="tiny") == load_config()
    olmoe = load_config(preset="olmoe-1b-7b")  # a model preset without a run file: the default run with it
    assert olmoe.model.num_experts == 64 and olmoe.train == load_config().train
    assert set(PRESETS) >= {"tiny", "small"}


@pytest.mark.parametrize("call,message", [
    (dict(preset="huge"), "unknown preset 'huge': choose one of tiny, small"),
    (dict(preset="small", path=CONFIGS / "tiny.toml"), "give --config or --preset, not both"),
])
def test_preset_errors_are_one_line(call, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        load_config(**call)
    assert "\n" not in str(info.value)


def test_cli_takes_preset_or_config_not_both(capsys):
    with pytest.raises(SystemExit) as info:
        pcmoe(["config", "show", "--preset", "small", "--config", os.devnull])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
