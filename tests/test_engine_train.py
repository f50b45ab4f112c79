"""End-to-end runs through the `pcmoe train` launcher: 2 CPU parties over gloo, each its own process."""

import json
import shutil

import pytest
import torch

from pcmoe_engine.cli import main as pcmoe
from pcmoe_engine.config import WireConfig
from pcmoe_engine.protocol import TRAINING_KINDS, kinds_sent

# A very small model, so a run takes seconds on two cores.
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.expert_intermediate_size=64",
         "model.shared_intermediate_size=32", "data.seq_len=32", "train.batch_size=4", "train.log_every=100",
         "train.eval_batches=2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PCMOE_CACHE", str(tmp_path_factory.getbasetemp() / "pcmoe-cache"))


def _run(out_dir, *overrides):
    args = ["train", "--parties", "2", "--set", f"train.out_dir={out_dir}"]
    pcmoe(args + [a for o in SMALL + list(overrides) for a in ("--set", o)])


def _metrics(run_dir, timings=True):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if not timings:
        records = [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s", "peak_memory_bytes")}
                   for r in records]
    return records


@pytest.mark.slow
def test_two_party_tiny_run_lowers_the_loss(tmp_path):
    _run(tmp_path, "train.steps=40", "train.warmup_steps=5", "train.name=run", "train.wire_log=true")
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["parties"] == 2 and summary["steps"] == 40 and summary["parties_missing"] == []
    # a GPU per party where there are two (party.party_device), else the CPU
    assert summary["peak_memory_kind"] == ("cuda_max_allocated" if torch.cuda.device_count() >= 2 else "cpu_max_rss")
    for p in range(2):
        assert summary["final_loss"][p] < summary["initial_loss"][p] - 1.0
        assert summary["eval_loss"][p] < summary["initial_loss"][p] - 1.0
        assert summary["bytes_sent"][p] > 0 and summary["tokens_per_s"][p] > 0
        assert summary["peak_memory_bytes"][p] > 0
        assert summary["parameters"]["local_experts"][p] == summary["parameters"]["local_experts"][0]
    steps = [r for r in _metrics(run) if "loss" in r]
    assert [(r["step"], r["party"]) for r in steps] == [(s, p) for s in range(1, 41) for p in range(2)]
    assert len(steps[0]["expert_load"]) == 2 and sum(steps[0]["expert_load"][0]) == 4 * 32 * 2

    # The wire carried only the protocol's kinds; a party's checkpoint holds only what it owns.
    for p in range(2):
        entries = [json.loads(line) for line in (run / f"party{p}" / "wire.jsonl").read_text().splitlines()]
        assert {e["kind"] for e in entries} == kinds_sent(WireConfig())
        assert kinds_sent(WireConfig()) < set(TRAINING_KINDS)
        assert sum(e["bytes"] for e in entries if e["src"] == p) == summary["bytes_sent"][p]
        (ckpt,) = (run / f"party{p}" / "checkpoints").glob("step_*.pt")
        state = torch.load(ckpt, weights_only=False)
        assert state["expert_ids"] == [p, p + 2, p + 4, p + 6]
        assert all(v.shape[0] == 4 for k, v in state["experts"].items())
        assert not any("experts" in k for k in state["backbone"])


@pytest.mark.slow
@pytest.mark.parametrize("defences", [[], ["privacy.hidden_noise=0.5", "privacy.grad_noise=0.5"]],
                         ids=["plain", "noise"])
def test_resume_equals_uninterrupted_run(tmp_path, defences):
    """With noise on too: each party's secret and noise generator travel in its checkpoint, so the resumed run
    draws the noise the uninterrupted one drew after step 4 (and not the noise of its first steps again)."""
    run = ["train.steps=8", "train.warmup_steps=2", "train.checkpoint_every=4", *defences]
    _run(tmp_path, *run, "train.name=straight")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for p in range(2):  # interrupt after step 4: only the step-4 checkpoint survives
        (resumed / f"party{p}" / "checkpoints" / "step_0000008.pt").unlink()
    _run(tmp_path, *run, "train.name=resumed", "train.resume=true")

    # Losses, grad norms, bytes, expert loads and eval losses, bitwise (timings aside).
    assert _metrics(resumed, timings=False) == _metrics(straight, timings=False)
    for p in range(2):
        a, b = (torch.load(d / f"party{p}" / "checkpoints" / "step_0000008.pt", weights_only=False)
                for d in (straight, resumed))
        for part in ("backbone", "experts"):
            for name, tensor in a[part].items():
                assert torch.equal(tensor, b[part][name]), f"party {p} {part} {name}"
