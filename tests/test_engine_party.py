"""A Party driven through its public methods, in one process (one party: the exchanges are local)."""

import re

import pytest
import torch

from pcmoe_engine.config import load_config
from pcmoe_engine.party import Party, initial_backbone

SMALL = ["parties=1", "model.hidden_size=32", "model.num_layers=2", "model.expert_intermediate_size=32",
         "data.seq_len=16", "train.batch_size=2", "train.steps=4", "train.warmup_steps=1", "train.eval_batches=1"]
RECORD = {"step", "loss", "load_balancing_loss", "z_loss", "lr", "skipped", "grad_norm", "expert_grad_norm",
          "step_time_s", "tokens_per_s", "peak_memory_bytes", "bytes_sent", "bytes_received", "expert_load"}
TIMINGS = ("step_time_s", "tokens_per_s", "peak_memory_bytes")


@pytest.fixture(autouse=True)
def _cpu_references(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PCMOE_CACHE", str(tmp_path_factory.getbasetemp() / "pcmoe-cache"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the engine on a CPU runs csrc_triton's references


def _cfg(tmp_path, *overrides):
    return load_config(None, SMALL + [f"train.out_dir={tmp_path}", "train.name=run", *overrides])


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMINGS}


@pytest.mark.slow
def test_resume_continues_bitwise(tmp_path):
    cfg = _cfg(tmp_path)
    straight = Party(cfg, 0)
    assert straight.resume() is None and straight.step_count == 0  # nothing to resume from yet
    first = [straight.step() for _ in range(2)]
    assert [r["step"] for r in first] == [1, 2] and set(first[0]) == RECORD
    saved = straight.save()
    rest = [straight.step() for _ in range(2)]

    resumed = Party(cfg, 0)
    assert resumed.resume() == saved and resumed.step_count == 2
    assert [_untimed(resumed.step()) for _ in range(2)] == [_untimed(r) for r in rest]
    for name, tensor in straight.backbone.state_dict().items():
        assert torch.equal(tensor, resumed.backbone.state_dict()[name]), name
    assert resumed.evaluate() == straight.evaluate()
    summary = resumed.summary(1.5)
    assert (summary["steps"], summary["eval_loss"], summary["initial_loss"]) == (4, 1.5, first[0]["loss"])


def test_resume_refuses_another_model(tmp_path):
    Party(_cfg(tmp_path), 0).save()
    with pytest.raises(ValueError, match=re.escape("was written for another configuration (model.num_layers=2, "
                                                   "this run has 3)")):
        Party(_cfg(tmp_path, "model.num_layers=3"), 0).resume()


def test_load_backbone_starts_from_another_partys_weights(tmp_path):
    cfg = _cfg(tmp_path)
    party, other = Party(cfg, 0), initial_backbone(cfg, 1).state_dict()
    own = {k: v.cpu().clone() for k, v in party.backbone.state_dict().items()}
    assert not torch.equal(own["embed.weight"], other["embed.weight"])  # each party draws its own
    party.load_backbone(other)
    assert all(torch.equal(v.cpu(), other[k]) for k, v in party.backbone.state_dict().items())
    assert party.step()["loss"] > 0
