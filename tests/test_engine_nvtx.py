"""The engine's named ranges cost nothing unless profiling is on: no autograd nodes, no profiler ranges."""

import os
import subprocess
import sys

import pytest
import torch

from pcmoe_engine import nvtx
from pcmoe_engine.config import ModelConfig
from pcmoe_engine.model import Backbone, compute_loss
from pcmoe_engine.protocol import DistributedExperts, ExpertShard, Wire

STAGES = ("router", "permute", "dispatch", "experts", "combine", "attention", "shared_expert", "lm_head")


def _profiled_step() -> tuple[set[str], set[str]]:
    """One forward and backward of a small model under torch.profiler: (range names, autograd node names)."""
    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, num_experts=4,
                      top_k=2, expert_intermediate_size=16, shared_intermediate_size=16)
    backbone, shard = Backbone(cfg), ExpertShard(cfg)
    backbone.init_weights(torch.Generator().manual_seed(0))
    shard.init_weights(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        logits, routings = backbone(tokens[:, :-1], DistributedExperts(shard, Wire()))
        loss = compute_loss(logits, tokens[:, 1:], routings, 0.01, 0.001).total
        seen, stack = set(), [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node not in seen:
                seen.add(node)
                stack += [next_fn for next_fn, _ in node.next_functions]
        loss.backward()
    return {e.name for e in prof.events()}, {node.name() for node in seen}


@pytest.mark.parametrize("on", [False, True])
def test_ranges_and_marks_only_while_profiling(on, monkeypatch, profiling):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU references: fewer events to sift
    nvtx.enable(on)
    names, nodes = _profiled_step()
    ranges = {n for s in STAGES for n in (s, f"{s}.backward")} | {"dispatch"}
    marks = {n for n in nodes if "_Mark" in n}
    if on:
        assert ranges <= names and marks
    else:
        assert not ranges & names and not marks


def test_pcmoe_profile_switches_it_on_at_start():
    code = "from pcmoe_engine import nvtx; print(nvtx.enabled())"
    for value, expected in (("1", "True"), (None, "False")):
        env = {k: v for k, v in os.environ.items() if k != "PCMOE_PROFILE"}
        if value is not None:
            env["PCMOE_PROFILE"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
