"""What a run shows and leaves to look at: the start line, the launcher's progress (plain lines or live, read from
the parties' metrics files), the same summary from `pcmoe train` and from the parties launched as torchrun would,
TensorBoard event files, and `pcmoe plot`."""

import importlib.util
import json
import os
import re
import sys

import pytest
import torch

from pcmoe_engine.cli import launch
from pcmoe_engine.cli import main as pcmoe
from pcmoe_engine.config import load_config
from pcmoe_engine.metrics import start_line, summary_text
from pcmoe_engine.plot import loss_figure, plot_runs
from pcmoe_engine.progress import RunProgress

SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.expert_intermediate_size=64", "data.seq_len=32",
         "train.batch_size=4", "train.eval_batches=2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PCMOE_CACHE", str(tmp_path_factory.getbasetemp() / "pcmoe-cache"))


def _record(step: int, party: int = 0) -> dict:
    return {"party": party, "step": step, "tokens": 128 * step, "loss": 8.0 - step / 10, "lr": 1e-3,
            "step_time_s": 0.5, "tokens_per_s": 256.0, "peak_memory_bytes": 2**30, "bytes_sent": 2**20}


def _append(path, *records, end="\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("\n".join(json.dumps(r) if r else "" for r in records) + end)


def test_start_line_says_what_the_run_does(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the default run on a machine without GPUs
    cfg = load_config(None, ["train.grad_accum=2"])
    assert start_line(cfg) == ("pcmoe: 2 parties train tiny (8 experts) on CPU over gloo | 2,048 tokens per party "
                               "and step (8 x 2 x 128), 300 steps | run folder runs/tiny-2p")


@pytest.mark.parametrize("device,gpus,where", [("auto", 2, "one GPU per party over nccl"),
                                               ("cuda", 1, "1 GPU shared by the parties over gloo")])
def test_start_line_names_the_gpus(monkeypatch, device, gpus, where):
    cfg = load_config(None, ["train.device=auto"])  # validated without GPUs; the placement below is what is tested
    cfg.train.device = device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert f"train tiny (8 experts) on {where} | " in start_line(cfg)


def test_plain_progress_comes_from_the_metrics_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the parties' peak memory is their RSS
    cfg = load_config(None, [f"train.out_dir='{tmp_path}'", "train.steps=20", "train.log_every=10"])
    files = [cfg.run_dir / f"party{p}" / "metrics.jsonl" for p in range(2)]
    _append(files[1], _record(20, 1))  # an earlier run's file, until this run's party rewrites it
    os.utime(files[1], (0, 0))
    with RunProgress(cfg, live=False) as progress:
        _append(files[0], *[_record(s) for s in range(1, 10)])
        progress.poll()
        _append(files[0], _record(10), end="")  # not a whole line yet: waits
        progress.poll()
        assert capsys.readouterr().out == ("party 0 | step  1/20 | loss 7.9000 | lr 1.00e-03 | 256 tok/s | peak mem "
                                           "1,024 MiB (rss) | sent 1.0 MiB\n")
        _append(files[0], {}, {"party": 0, "step": 10, "eval_loss": 7.25})  # "{}": the rest of that line
        files[1].write_text(json.dumps(_record(1, 1)) + "\n")  # party 1 starts: rewrites its file
    out = capsys.readouterr().out.splitlines()
    assert out == ["party 0 | step 10/20 | loss 7.0000 | lr 1.00e-03 | 256 tok/s | peak mem 1,024 MiB (rss) | sent "
                   "1.0 MiB | ETA 0m05s", "party 0 | eval loss 7.2500", out[2]]
    assert out[2].startswith("party 1 | step  1/20 | loss 7.9000")


def test_resumed_history_is_one_line_and_live_bars_follow_the_steps(tmp_path, capsys):
    cfg = load_config(None, [f"train.out_dir='{tmp_path}'", "train.steps=20", "train.log_every=2",
                             "train.resume=true", "parties=1"])
    (cfg.run_dir / "party0" / "checkpoints").mkdir(parents=True)
    (cfg.run_dir / "party0" / "checkpoints" / "step_0000004.pt").touch()
    path = cfg.run_dir / "party0" / "metrics.jsonl"
    with RunProgress(cfg, live=False):
        _append(path, *[_record(s) for s in range(1, 7)])
    resumed, step = capsys.readouterr().out.splitlines()
    assert resumed == "party 0 | resumed at step 4" and step.startswith("party 0 | step  6/20 | loss 7.4000")

    path.unlink()
    with RunProgress(cfg, live=True) as progress:
        _append(path, *[_record(s) for s in range(1, 8)], {"party": 0, "step": 7, "eval_loss": 6.5})
        progress.poll()
        task = progress.live.tasks[0]
        assert (task.completed, task.total) == (7, 20)
        assert task.fields["status"] == "loss 7.300 | eval 6.500 | 256 tok/s | ETA 0m06s"


def test_tensorboard_needs_its_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ValueError, match=re.escape("train.tensorboard=true needs the tensorboard package: pip install "
                                                   "'pcmoe[tensorboard]'")):
        load_config(None, ["train.tensorboard=true"])


def test_plot_draws_every_party_of_every_run(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        for p in range(2):
            _append(run / f"party{p}" / "metrics.jsonl", *[_record(s, p) for s in range(1, 5)],
                    {"party": p, "step": 4, "eval_loss": 7.5})
    lines = loss_figure(runs).axes[0].get_lines()
    assert [line.get_label() for line in lines] == [f"{r} party {p}: {what}" for r in "ab" for p in range(2)
                                                    for what in ("training", "held out")]
    assert list(lines[0].get_xdata()) == [128, 256, 384, 512] and list(lines[1].get_ydata()) == [7.5]
    out = plot_runs(runs)
    assert out == runs[0] / "loss.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        pcmoe(["plot", str(tmp_path / "missing")])


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    _append(tmp_path / "run" / "party0" / "metrics.jsonl", _record(1))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit) as info:
        pcmoe(["plot", str(tmp_path / "run")])
    assert info.value.code == 2
    assert capsys.readouterr().err == "pcmoe: error: pcmoe plot needs matplotlib: pip install 'pcmoe[plot]'\n"


@pytest.mark.slow
def test_pcmoe_train_prints_start_progress_and_summary(tmp_path, capfd):
    options = [f"train.out_dir={tmp_path}", "train.steps=6", "train.log_every=3", "train.eval_every=3",
               "train.tensorboard=true", *SMALL]
    pcmoe(["train", "--parties", "2"] + [a for o in options for a in ("--set", o)])
    out = capfd.readouterr().out.splitlines()
    run = tmp_path / "tiny-2p"
    summary = json.loads((run / "summary.json").read_text())
    assert out[0] == start_line(load_config(None, ["parties=2", *options]))  # on CPU or GPUs, as this machine has
    assert out[0].endswith(f"| 128 tokens per party and step (4 x 32), 6 steps | run folder {run}")
    for p in range(2):  # drawn once, by the launcher: the parties themselves print nothing
        assert sum(line.startswith(f"party {p} | step 1/6") for line in out) == 1
        assert sum(line.startswith(f"party {p} | eval loss") for line in out) == 2
    assert "\n".join(out).endswith(summary_text(summary, run))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for p in range(2):
        events = EventAccumulator(str(run / f"party{p}"))
        events.Reload()
        records = [json.loads(line) for line in (run / f"party{p}" / "metrics.jsonl").read_text().splitlines()]
        losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
        assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == losses
        assert [e.step for e in events.Scalars("eval_loss")] == [3, 6]
    pcmoe(["plot", str(run)])
    assert (run / "loss.png").is_file()


@pytest.mark.slow
def test_parties_launched_as_torchrun_would_print_the_same_summary(tmp_path, capfd):
    overrides = [f"train.out_dir={tmp_path}", "train.steps=3", *SMALL]
    assert launch(2, [a for o in overrides for a in ("--set", o)]) == 0  # python -m pcmoe_engine.train per party
    out = capfd.readouterr().out
    run = tmp_path / "tiny-2p"
    assert out.count("pcmoe: 2 parties train tiny") == 1  # party 0's start line
    assert out.count("party 1 | step 1/3") == 1 and out.count("party 0 | step 3/3") == 1
    assert out.endswith(summary_text(json.loads((run / "summary.json").read_text()), run) + "\n")
