"""The benchmark harness's CPU logic: shapes and the published anchors, work counters, routings, the peers'
arithmetic and the fused peers' agreement with ours, ratios, tables, plots, the README section with a rerun's
changes, the engine's NVTX/profiler ranges, and stage suites run end to end on the CPU (bench/bench_*.py)."""

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import rel_err

import csrc_triton as ct
from bench import at_cap, compare, peers, plots, readme_table, report, shapes
from bench.engine_e2e import flops_per_token, party_result
from csrc_triton.routed_experts import expert_mlp_reference
from csrc_triton.permute import permute_reference, plan_routing_reference, unpermute_reference
from pcmoe_engine.config import ModelConfig, load_config
from pcmoe_engine.model import Backbone, compute_loss
from pcmoe_engine.protocol import DistributedExperts, ExpertShard, Wire
from profiling.engine_step import idle_table, kernel_table, range_table

ROOT = Path(__file__).resolve().parents[1]


def test_shape_table_is_the_issues():
    s = shapes.SHAPES
    assert (s["olmoe-1b-7b"].hidden, s["olmoe-1b-7b"].experts, s["olmoe-1b-7b"].top_k, s["olmoe-1b-7b"].inter) == (
        2048, 64, 8, 1024)
    assert s["qwen1.5-moe-a2.7b"][1:6] == (2048, 60, 4, 1408, 5632)
    assert s["qwen3-30b-a3b"][1:5] == (2048, 128, 8, 768)
    assert s["deepseek-v2-lite"][1:6] == (2048, 64, 6, 1408, 2 * 1408)
    assert shapes.TOKENS == (4096, 16384, 65536) and shapes.ROUTINGS == ("balanced", "skewed")


def test_work_counters():
    olmoe = shapes.SHAPES["olmoe-1b-7b"]
    t = 16384
    assert shapes.layer_flops(t, olmoe) == 2 * t * 2048 * (64 + 3 * 8 * 1024)
    qwen = shapes.SHAPES["qwen1.5-moe-a2.7b"]
    assert shapes.layer_flops(t, qwen) == 2 * t * 2048 * (60 + 3 * 4 * 1408 + 3 * 5632 + 1)
    assert shapes.router_bytes(t, olmoe) == t * 64 * 2 + t * 8 * 8
    assert shapes.permute_bytes(t, olmoe) == t * 8 * 4 * 4 + t * 2048 * 2 * 9
    assert shapes.unpermute_bytes(t, olmoe) == t * 8 * 2048 * 2 + t * 8 * 6 + t * 2048 * 2


def test_published_anchors_have_their_shapes_and_counts():
    s = shapes.SHAPES
    assert s["sonicmoe-7b"][1:5] == (1536, 128, 8, 256) and s["sonicmoe-30b"][1:5] == (4096, 128, 8, 512)
    assert {(a.shape, a.tokens) for a in shapes.ANCHORS} == {("sonicmoe-7b", 24576), ("sonicmoe-30b", 32768),
                                                              ("qwen3-30b-a3b", 32768)}
    assert all(a.convention and set(a.tflops) <= {"fwd", "bwd", "fwd_bwd"} for a in shapes.ANCHORS)
    assert shapes.routed_flops(24576, s["sonicmoe-7b"]) == 6 * 24576 * 8 * 1536 * 256
    assert shapes.README_SHAPES == ("olmoe-1b-7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "deepseek-v2-lite")



def test_profiling_case_option_parses_and_rejects_in_one_line(capsys):
    """The profiling scripts' --case: shape:tokens pairs, the anchors by default, a bad spec named in argparse's
    one-line error."""
    import argparse

    parser = argparse.ArgumentParser()
    shapes.add_case_option(parser)
    assert parser.parse_args([]).case is None and ("sonicmoe-7b", 24576) in shapes.PROFILED_CASES
    assert parser.parse_args(["--case", "olmoe-1b-7b:16384", "--case", "qwen3-30b-a3b:32768"]).case == [
        ("olmoe-1b-7b", 16384), ("qwen3-30b-a3b", 32768)]
    for bad in ("qwen3:16384", "olmoe-1b-7b", "olmoe-1b-7b:many"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--case", bad])
        assert f"'{bad}': give shape:tokens, shape one of olmoe-1b-7b" in capsys.readouterr().err

def test_anchor_cases_come_first_and_once():
    from bench.conftest import _cases

    class Config:
        options = {"--bench-shapes": "qwen3-30b-a3b", "--bench-tokens": "16384,32768", "--bench-routing": "balanced",
                   "--bench-anchors": True}

        def getoption(self, name):
            return self.options[name]

    cases = _cases(Config())
    assert cases[:3] == [shapes.Case(a.shape, a.tokens, "balanced") for a in shapes.ANCHORS]
    assert cases[3:] == [shapes.Case("qwen3-30b-a3b", 16384, "balanced")]  # 32768: the Liger anchor's, not repeated


def test_skewed_routing_is_skewed_and_balanced_is_not():
    gen = torch.Generator().manual_seed(0)
    s = shapes.SHAPES["olmoe-1b-7b"]
    got = {}
    for routing in shapes.ROUTINGS:
        _, ids = shapes.topk_routing(shapes.router_logits(16384, s.experts, routing, gen), s.top_k, False)
        assert ids.unique(dim=-1).shape == ids.shape  # k distinct experts per token
        got[routing] = shapes.imbalance(ids, s.experts)
    assert got["balanced"] < 1.3 and got["skewed"] > 3


def test_skewing_input_moves_the_blocks_logits():
    w = torch.randn(64, 256) * 0.02
    u = shapes.skewing_input(w, "skewed")
    torch.testing.assert_close(u @ w.t(), shapes.routing_bias(64, "skewed"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted({s.family for s in shapes.SHAPES.values()}))
def test_hf_blocks_build_and_switch_back_ends(family):
    name = next(n for n, s in shapes.SMOKE_SHAPES.items() if s.family == family)
    block = shapes.make_hf_block(shapes.SMOKE_SHAPES[name], dtype=torch.bfloat16)
    assert type(block).__name__ in ct.SUPPORTED_BLOCKS  # FusedMoE.from_hf takes it (tests/test_fused_moe.py)
    x = torch.randn(1, 8, block.gate.weight.shape[1], dtype=torch.bfloat16)
    eager = peers.layer_module("hf_eager", block, None)(x)
    assert rel_err(peers.layer_module("hf_grouped_mm", block, None)(x), eager) < 2e-2


def _sorted_problem(rows=48, hidden=32, inter=16, experts=3):
    gen = torch.Generator().manual_seed(1)
    counts = [16, 0, 32]
    bounds = [0, 16, 16, 48]
    x = torch.randn(rows, hidden, generator=gen)
    w_gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.2
    w_down = torch.randn(experts, hidden, inter, generator=gen) * 0.2
    dy = torch.randn(rows, hidden, generator=gen)
    return x, dy, w_gate_up, w_down, counts, bounds


def test_peer_gemms_match_autograd():
    x, dy, w_gate_up, w_down, _, bounds = _sorted_problem()
    leaves = [t.clone().requires_grad_() for t in (x, w_gate_up, w_down)]
    y = peers.eager_forward(leaves[0], bounds, leaves[1], leaves[2])
    y.backward(dy)
    h = torch.cat([x[lo:hi] @ w_gate_up[e].t() for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))])
    gate, up = h.chunk(2, -1)
    act = torch.nn.functional.silu(gate) * up
    dh = torch.cat([peers.swiglu_backward_act(h[lo:hi], dy[lo:hi] @ w_down[e])
                    for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))])
    assert rel_err(peers.eager_dgrad(dy, h, bounds, w_gate_up, w_down), leaves[0].grad) < 1e-5
    dw_down, dw_gate_up = peers.eager_wgrad(dy, act, dh, x, bounds, w_gate_up, w_down)
    assert rel_err(dw_down, leaves[2].grad) < 1e-5 and rel_err(dw_gate_up, leaves[1].grad) < 1e-5
    # torch._grouped_mm (bf16 operands, 16-byte aligned rows) against the same references
    bf = [t.bfloat16() for t in (x, dy, w_gate_up, w_down, h, act, dh)]
    ends = torch.tensor(bounds[1:], dtype=torch.int32)
    y_mm, h_mm = peers.grouped_mm_forward(bf[0], ends, bf[2], bf[3])
    assert rel_err(y_mm, y.detach()) < 2e-2 and rel_err(h_mm, h) < 2e-2
    assert rel_err(peers.grouped_mm_dgrad(bf[1], bf[4], ends, bf[2], bf[3]), leaves[0].grad) < 2e-2
    mm_down, mm_gate_up = peers.grouped_mm_wgrad(bf[1], bf[5], bf[6], bf[0], ends)
    assert rel_err(mm_down, leaves[2].grad) < 2e-2 and rel_err(mm_gate_up, leaves[1].grad) < 2e-2


def test_peer_router_and_permutation_match_the_references():
    s = shapes.SMOKE_SHAPES["tiny-qwen3-30b-a3b"]
    logits = torch.randn(40, s.experts)
    weights, ids = peers.eager_route(logits, s)
    ref = ct.router.route_reference(logits, s.top_k, norm_topk_prob=s.norm_topk_prob)
    torch.testing.assert_close(weights, ref.weights)
    assert torch.equal(ids, ref.expert_ids.long())
    x = torch.randn(40, 8)
    plan = plan_routing_reference(ids, s.experts)
    x_sorted, counts = peers.eager_permute(x, ids, s.experts)
    torch.testing.assert_close(x_sorted, permute_reference(x, plan))
    assert torch.equal(counts.int(), plan.tokens_per_expert)
    y = torch.randn(ids.numel(), 8)
    torch.testing.assert_close(peers.eager_unpermute(y, plan, weights), unpermute_reference(y, plan, weights))


def test_megablocks_missing_is_a_reason():
    if importlib.util.find_spec("megablocks"):
        pytest.skip("megablocks is installed here")
    with pytest.raises(peers.Unavailable, match="megablocks does not import"):
        peers.megablocks_ops()


def test_a_peer_that_cannot_run_does_not_keep_its_case_alive(monkeypatch):
    """Why megablocks cannot run is kept with the case; kept as the exception, its traceback held the case (a cycle:
    every case's inputs stayed on the GPU until Python's collector ran, and the suites ran out of memory)."""
    import gc
    import weakref

    from bench import bench_layer

    def unavailable(part):
        raise peers.Unavailable(f"{part}: not here")

    monkeypatch.setattr(bench_layer, "probe", unavailable)
    inputs = torch.zeros(4)
    alive = weakref.ref(inputs)
    case = {"inputs": [inputs]}
    del inputs
    gc.disable()  # what refcounting frees, without the collector
    try:
        for _ in range(2):  # built once, refused every time after
            try:
                bench_layer.module_for("megablocks", None, case)
            except peers.Unavailable as e:
                assert str(e) == "megablocks dmoe: not here"
            else:
                raise AssertionError("megablocks ran")
        del case
        assert alive() is None
    finally:
        gc.enable()


def _tiny_experts():
    s = shapes.SMOKE_SHAPES["tiny-qwen3-30b-a3b"]
    torch.manual_seed(0)
    experts = shapes.make_hf_block(s).experts
    gen = torch.Generator().manual_seed(1)
    weights, ids = shapes.topk_routing(shapes.router_logits(12, s.experts, "skewed", gen), s.top_k, True)
    return experts, torch.randn(12, s.hidden, generator=gen), ids, weights.requires_grad_()


@pytest.mark.parametrize("impl", ["hf_grouped_mm", "liger"])
def test_fused_peers_agree_with_the_reference(impl):
    """Each peer through peers.experts_fn (Liger's kernels under Triton's interpreter, fp32) against the PyTorch
    reference of the routed experts: the output and the gradients of x, both weight tensors and the weights."""
    if impl == "liger" and importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(peers.Unavailable, match="liger-kernel does not import"):
            peers.require("liger")
        return
    experts, x, ids, weights = _tiny_experts()
    dy, leaves = torch.randn_like(x), [experts.gate_up_proj, experts.down_proj, weights]
    results = []
    for fn in (peers.experts_fn(impl, experts),
               lambda x, ids, w: expert_mlp_reference(x, w, ids, experts.gate_up_proj, experts.down_proj)):
        x_leaf = x.clone().requires_grad_()
        results.append(peers.outputs_and_grads(lambda: fn(x_leaf, ids, weights), [x_leaf, *leaves], dy))
    check = peers.agreement(*results, against="reference")
    assert check["out_rel_err"] < 1e-5 and check["max_grad_rel_err"] < 1e-5, check
    assert all(g.abs().sum() > 0 for g in results[0][1:])  # every gradient was computed, not left at zero


def test_liger_runs_inside_transformers_block():
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed here")
    block = shapes.make_hf_block(shapes.SMOKE_SHAPES["tiny-olmoe-1b-7b"])
    x = torch.randn(1, 8, block.gate.weight.shape[1])
    eager = peers.layer_module("hf_eager", block, None)(x)
    assert rel_err(peers.layer_module("liger", block, None)(x), eager) < 1e-5
    assert peers.settings()["liger"] == "one config per kernel (LIGER_FUSED_MOE_AUTOTUNE=0)"


def test_sonicmoe_missing_is_a_reason():
    if importlib.util.find_spec("sonicmoe"):
        pytest.skip("sonic-moe is installed here")
    with pytest.raises(peers.Unavailable, match="sonic-moe does not import"):
        peers.require("sonicmoe")


def _sample_report():
    rows = []
    for stage in report.STAGES:
        for shape in list(shapes.SHAPES)[:2]:
            for tokens in (4096, 16384):
                for routing in shapes.ROUTINGS:
                    for i, impl in enumerate(("pcmoe", "hf_grouped_mm", "megablocks")):
                        row = dict(stage=stage, shape=shape, tokens=tokens, routing=routing, impl=impl,
                                   flops=10**12, bytes=10**9)
                        if impl == "megablocks":
                            row["error"] = "megablocks does not import: ModuleNotFoundError"
                        else:
                            row["ms"] = (1 + i) * tokens / 4096
                            if stage in report.HOST_BOUND_STAGES:  # ours: 1/4 GPU time, the peer's 1/2
                                row["gpu_ms"] = row["ms"] / (4 if impl == "pcmoe" else 2)
                            if stage == "layer_fwd_bwd":
                                row["peak_bytes"] = 2**30
                        rows.append(report.finish_row(row, dict(bf16_matmul_tflops=700.0, copy_gbps=3000.0)))
    rows[-6]["check"] = dict(out_rel_err=5e-3, max_grad_rel_err=6e-3)
    return dict(device="NVIDIA H100 80GB HBM3", commit="abc1234", date="2026-11-25T10:00:00+00:00",
                torch="2.11.0+cu130", triton="3.6.0", transformers="5.17.0", benchmark="pcmoe-bench",
                ceilings=dict(bf16_matmul_tflops=700.0, copy_gbps=3000.0), rows=report.add_ratios(rows))


def test_ratios_rates_and_tables():
    rep = _sample_report()
    ours = next(r for r in rep["rows"] if r["impl"] == "pcmoe" and r["stage"] == "gemm_fwd")
    peer = next(r for r in rep["rows"] if r["impl"] == "hf_grouped_mm" and report.case_key(r) == report.case_key(ours))
    assert peer["pcmoe_speedup"] == pytest.approx(2.0) and ours["vs"]["hf_grouped_mm"] == pytest.approx(2.0)
    assert ours["vs"]["megablocks"].startswith("megablocks does not import")
    assert ours["tflops"] == pytest.approx(10**12 / ours["ms"] / 1e9)
    assert ours["frac_copy"] == pytest.approx(ours["gbps"] / 3000)
    assert report.gpu_tag(rep["device"]) == "h100"
    assert "could not run: megablocks" in report.text_table(rep)
    table = report.markdown_table(rep, 4096)
    assert "| gemm_fwd | olmoe-1b-7b | 1.000 | - |" in table and "2.00x" in table and "n/a" in table
    # the small stages: GPU bandwidth and speed-up by GPU time, wall-time ratio beside it, wall time marked
    assert "| router | olmoe-1b-7b | 1.000† | 0.250 | 1000 | 4000 | 133% | 4.00x (2.00x†) | n/a |" in table
    assert report.host_bound("layer_fwd", "hf_eager") and not report.host_bound("layer_fwd", "hf_grouped_mm")
    assert report.unavailable(rep) == {"megablocks": "could not run: megablocks does not import: ModuleNotFoundError"}


def test_plots_and_readme_section(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    bench_json = results / "bench_h100_abc1234.json"
    bench_json.write_text(json.dumps(_sample_report()))
    pngs = plots.plot(bench_json)
    assert pngs and all(p.is_file() and p.stat().st_size > 10_000 for p in pngs)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{readme_table.START}\nold\n{readme_table.END}\nrest\n")
    readme_table.main(["--bench", str(bench_json), "--e2e", "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{readme_table.END}\nrest\n")
    assert "| olmoe-1b-7b | **pcmoe** |" in text and "Peers that did not run: **megablocks**" in text
    readme_table.main(["--bench", str(bench_json), "--e2e", "--readme", str(readme), "--check"])


def _e2e_report(parties: int) -> dict:
    memory = dict(backbone_params=1, local_expert_params=2, gradients=3, optimizer_state=4,
                  activations_and_workspace=5)
    party = dict(tokens_per_s=1000.0, step_ms=100.0, mfu=0.2, peak_memory_bytes=15 * 2**30,
                 memory={k: v * 2**30 for k, v in memory.items()}, memory_share={k: v / 15 for k, v in memory.items()},
                 comm_share=0.1 if parties > 1 else 0.0)
    return dict(device="NVIDIA H100 80GB HBM3", commit="abc1234", date=f"2026-11-25T10:0{parties}:00+00:00",
                benchmark="engine-e2e", parties=parties, gpus=parties, backend="nccl" if parties > 1 else None,
                total_parameters=1.9e9, tokens_per_s_total=1000.0 * parties,
                config=dict(model=dict(preset="olmoe-1b-7b", num_layers=4), train=dict(batch_size=8),
                            data=dict(seq_len=1024)),
                per_party=[dict(party, party=i) for i in range(parties)])


def test_readme_end_to_end_rows_and_memory_plots(tmp_path):
    bench_json = tmp_path / "bench_h100_abc1234.json"
    bench_json.write_text(json.dumps(_sample_report()))
    e2e = []
    for parties in (1, 2):
        e2e.append(tmp_path / f"e2e_h100_{parties}p_abc1234.json")
        e2e[-1].write_text(json.dumps(_e2e_report(parties)))
        assert plots.plot(e2e[-1])[0].name == f"e2e_h100_{parties}p_abc1234_memory.png"
    assert report.latest_e2e(tmp_path) == e2e
    text = readme_table.section(bench_json, e2e, tmp_path / "README.md")
    assert ("| 1 (party 0) | NVIDIA H100 80GB HBM3 | 1,000 | 20.0% | 100.0 | 15.0 | 7% / 13% / 20% / 27% / 33% "
            "| 0.0% |") in text
    assert "| 2 (party 1) | 2 x NVIDIA H100 80GB HBM3, nccl | 2,000 |" in text
    assert "[memory, 2p](e2e_h100_2p_abc1234_memory.png)" in text


def test_compare_flags_the_readme_cells_a_rerun_moved(tmp_path):
    first = _sample_report()
    (tmp_path / "first.json").write_text(json.dumps(first))
    assert compare.compare(first, first, 0.1)[1] == []
    rerun = json.loads(json.dumps(first))
    for r in rerun["rows"]:
        if r["impl"] == "pcmoe" and r["stage"] == "layer_fwd_bwd" and r["shape"] == "olmoe-1b-7b" and "ms" in r:
            r["ms"] *= 1.3 if r["tokens"] == 16384 and r["routing"] == "balanced" else 1.05
        if r["stage"] == "router" and r["tokens"] == 4096 and "ms" in r:  # not in the README (its tables show 16384 tokens)
            r["ms"] *= 1.5
        if r["stage"] == "router" and r["tokens"] == 16384 and r["impl"] == "pcmoe" and r["routing"] == "balanced":
            r["ms"] *= 3  # the host's time (its GPU time stays): reported, not held to the tolerance
    report.add_ratios(rerun["rows"])
    (tmp_path / "rerun.json").write_text(json.dumps(rerun))
    lines, moved = compare.compare(first, rerun, 0.1)
    assert moved == ["layer_fwd_bwd / olmoe-1b-7b / balanced / hf_grouped_mm / speed-up: 2.000 -> 1.538 (-23%)",
                     "layer_fwd_bwd / olmoe-1b-7b / balanced / pcmoe / ms: 4.000 -> 5.200 (+30%)"]
    assert "| router † | 16 | 50.0% | 50.0% | 200.0% | 10 |" in lines
    assert "| router (GPU time) | 16 | 0.0% | 0.0% | 0.0% | 0 |" in lines
    assert "The host's cells moved by 0.0% (median) and 200% at most: not held to the tolerance." in lines
    # ours 1.3x slower in one case: the peers' speed-ups there 23.1% lower; the router's GPU speed-ups held
    assert "Their speed-ups moved at most (cells): experts_fwd 0.0% (4), experts_fwd_bwd 0.0% (4), gemm_dgrad 0.0% " \
           "(2), gemm_fwd 0.0% (2), gemm_wgrad 0.0% (2), layer_fwd 0.0% (4), layer_fwd_bwd 23.1% (4), permute 0.0% " \
           "(2), router 0.0% (2), unpermute 0.0% (2)." in lines
    with pytest.raises(SystemExit) as info:
        compare.main([str(tmp_path / "first.json"), str(tmp_path / "rerun.json"), "--out", str(tmp_path / "r.md")])
    assert info.value.code == 1 and "moved by more than 10%" in (tmp_path / "r.md").read_text()


def test_a_rerun_that_tuned_other_wgrad_tiles_says_where(monkeypatch):
    import triton

    from bench.common import tuned_tiles
    from csrc_triton._grouped_gemm import _wgrad_kernel

    key, config = (2048, 768, True, False, False, True, "torch.bfloat16"), triton.Config(dict(BM=128), num_warps=8)
    monkeypatch.setattr(_wgrad_kernel, "cache", {key: config})
    first = dict(commit="a", date="d", device="H100", rows=[], tuned_tiles=tuned_tiles())
    assert first["tuned_tiles"] == [dict(key=[str(k) for k in key], config=str(config))] and "BM: 128" in str(config)
    rerun = json.loads(json.dumps(first))
    assert compare.tile_lines(first, rerun)[1].endswith("1 shape keys in both runs, 0 chosen differently.")
    rerun["tuned_tiles"][0]["config"] = "BM: 128, BN: 128, BK: 32, num_warps: 4"
    lines = compare.tile_lines(first, rerun)
    assert lines[1].endswith("1 chosen differently:") and lines[2].startswith("- 2048, 768, True, False, False")
    assert lines[2].endswith("-> BM: 128, BN: 128, BK: 32, num_warps: 4")
    older = {k: v for k, v in first.items() if k != "tuned_tiles"}  # results files before 5dba7b8
    assert compare.tile_lines(older, rerun) == []


def test_compare_says_how_the_gpu_ran_in_each_run(tmp_path):
    """nvidia-smi's samples, as run_device.sh's clock_log writes them, split at each run's end (its results' date);
    idle samples, a header, a cut-off last line and samples after the rerun do not count."""
    first = dict(_sample_report(), date="2026-11-28T03:08:07+00:00")
    rerun = dict(first, date="2026-11-28T03:10:27+00:00")
    clocks = tmp_path / "clocks.csv"
    clocks.write_text("\n".join([
        "timestamp, index, clocks.current.sm [MHz], power.draw [W], temperature.gpu, clocks_event_reasons.active",
        "2026/11/28 03:02:43.155, 0, 345 MHz, 72.76 W, 38, 0x0000000000000001",  # idle
        "2026/11/28 03:05:01.000, 0, 1980 MHz, 650.10 W, 55, 0x0000000000000000",
        "2026/11/28 03:06:01.000, 0, 1215 MHz, 700.65 W, 60, 0x0000000000000004",  # held down by the power cap
        "2026/11/28 03:09:01.000, 0, 1980 MHz, 500.00 W, 58, 0x0000000000000000",
        "2026/11/28 03:11:01.000, 0, 1500 MHz, 690.00 W, 58, 0x0000000000000004",  # after the rerun
        "2026/11/28 03:11:03.000, 0, 19"]))
    assert compare.clock_lines(clocks, first, rerun) == [
        "", "The GPU under load (above 200 W, `clocks.csv`): first run 2 samples, SM clock median 1215 MHz (lowest "
            "1215), power cap active in 1; rerun 1 samples, SM clock median 1980 MHz (lowest 1980), power cap active "
            "in 0."]
    (tmp_path / "first.json").write_text(json.dumps(first))
    (tmp_path / "rerun.json").write_text(json.dumps(rerun))
    with pytest.raises(SystemExit) as info:
        compare.main([str(tmp_path / "first.json"), str(tmp_path / "rerun.json"), "--out", str(tmp_path / "r.md"),
                      "--clocks", str(clocks)])
    assert info.value.code == 0 and "power cap active in 1; rerun" in (tmp_path / "r.md").read_text()


def _peers_report() -> dict:
    """A `run_device.sh peers` run: the routed experts and the layer at 16384 tokens and in the anchors' cases,
    ours twice as fast as the peers that run (which agree with ours to 1e-3 / 2e-3), SonicMoE unable to."""
    ceilings, rows = dict(bf16_matmul_tflops=700.0, copy_gbps=3000.0), []
    for shape, tokens in [("olmoe-1b-7b", 16384)] + [(a.shape, a.tokens) for a in shapes.ANCHORS]:
        s = shapes.SHAPES[shape]
        for family, flops in (("experts", shapes.routed_flops(tokens, s)), ("layer", shapes.layer_flops(tokens, s))):
            for stage, passes in ((f"{family}_fwd", 1), (f"{family}_fwd_bwd", 3)):
                for impl, ms in (("pcmoe", 1.0), ("hf_grouped_mm", 2.0), ("liger", 2.0), ("sonicmoe", None)):
                    row = dict(stage=stage, shape=shape, tokens=tokens, routing="balanced", impl=impl,
                               flops=passes * flops, bytes=None)
                    if ms is None:
                        row["error"] = "sonic-moe does not import: ModuleNotFoundError: No module named 'quack'"
                    else:
                        row["ms"] = passes * ms
                    if impl != "pcmoe" and ms and passes == 3:
                        row["check"] = dict(against="pcmoe", out_rel_err=1e-3, max_grad_rel_err=2e-3)
                    rows.append(report.finish_row(row, ceilings))
    return dict(device="NVIDIA H100 80GB HBM3", commit="abc1234", date="2026-11-27T10:00:00+00:00",
                torch="2.11.0+cu130", triton="3.6.0", transformers="5.17.0", benchmark="pcmoe-bench",
                ceilings=ceilings, shapes={n: s._asdict() for n, s in shapes.SHAPES.items()},
                anchors=[a._asdict() for a in shapes.ANCHORS],
                options=dict(shapes="olmoe-1b-7b", tokens="16384", routing="balanced", anchors=True),
                peers={"liger-kernel": "0.8.5", "sonic-moe": None}, rows=report.add_ratios(rows),
                peer_settings={"liger": "one config per kernel (LIGER_FUSED_MOE_AUTOTUNE=0)", "sonicmoe": None})


def test_peers_run_in_the_readme_with_the_anchors_and_the_rerun(tmp_path):
    peers_rep = _peers_report()
    assert report.table_tokens(peers_rep) == 16384
    assert report.anchor_cases(peers_rep) == {(a.shape, a.tokens) for a in shapes.ANCHORS}
    rerun = json.loads(json.dumps(peers_rep))
    for r in rerun["rows"]:  # the rerun: Liger's routed experts 10% slower at the SonicMoE 7B anchor
        if (r["stage"], r["shape"], r["impl"]) == ("experts_fwd_bwd", "sonicmoe-7b", "liger"):
            r["ms"] *= 1.1
    report.add_ratios(rerun["rows"])
    bench_json, peers_json = tmp_path / "bench_h100_abc1234.json", tmp_path / "peers_h100_abc1234.json"
    bench_json.write_text(json.dumps(_sample_report()))
    peers_json.write_text(json.dumps(peers_rep))
    (tmp_path / "rerun_peers_h100_abc1234.json").write_text(json.dumps(rerun))
    assert readme_table.rerun_of(peers_json).name == "rerun_peers_h100_abc1234.json"
    assert readme_table.rerun_of(bench_json) is None
    text = readme_table.section(bench_json, [], tmp_path / "README.md", peers_json)
    # the anchors in their count: 6 T k H I over 1 ms (forward), 12 over 3 - 1 ms, 18 over 3 ms: all 464 TFLOP/s
    assert ("| **SonicMoE 7B** (24576, 1536, 256, 128, 8) | published: router GEMM, top-k and experts "
            "(moe_TC_softmax_topk_layer) | 365 / 405 / - | |") in text
    assert "| | pcmoe | 464 / 464 / 464 | 464 / 464 / 464 |" in text and "| | liger | 232 / 232 / 232 |" in text
    assert "counted forward 6 T k H I, forward+backward 18 T k H I (issue 16)." in text
    assert "| sonicmoe-7b at 24576 | liger | 2.00 (+0.0%) | 6.00 (+10.0%) | 232 |" in text
    assert "| 2.00x (+10.0%) |" in text and "| olmoe-1b-7b | liger | 2.00 (+0.0%) | 6.00 (+0.0%) |" in text
    assert "by 0.0% (median) and 10.0% at most" in text
    assert "Peers that did not run: **sonicmoe**: could not run: sonic-moe does not import" in text
    assert "(output / largest gradient, relative error, at most): hf_grouped_mm 1.0e-03 / 2.0e-03; liger" in text
    lines, moved = compare.compare(peers_rep, rerun, 0.05)
    assert moved == ["experts_fwd_bwd / sonicmoe-7b at 24576 / balanced / liger / ms: 6.000 -> 6.600 (+10%)",
                     "experts_fwd_bwd / sonicmoe-7b at 24576 / balanced / liger / speed-up: 2.000 -> 2.200 (+10%)"]
    names = {p.name.removeprefix("peers_h100_abc1234_") for p in plots.plot(peers_json)}
    assert names == {"stages_16384_balanced.png", "anchors.png"}


def test_cases_only_the_rerun_timed_are_shown_from_the_rerun(tmp_path):
    rerun = _peers_report()
    first = json.loads(json.dumps(rerun))  # the first run's time cap ended before olmoe's forward+backward
    first["rows"] = [r for r in first["rows"] if (r["stage"], r["shape"]) != ("experts_fwd_bwd", "olmoe-1b-7b")]
    rerun_path = tmp_path / "rerun_peers_h100_abc1234.json"
    lines = readme_table.rerun_only_lines(first, rerun, rerun_path, tmp_path / "README.md", "experts")
    text = "\n".join(lines)
    assert "from the rerun alone (`rerun_peers_h100_abc1234.json`)" in text
    assert "| olmoe-1b-7b | liger | 2.00 | 6.00 |" in text and "sonicmoe-7b" not in text
    assert readme_table.rerun_only_lines(first, rerun, rerun_path, tmp_path / "README.md", "layer") == []
    assert readme_table.rerun_only_lines(rerun, rerun, rerun_path, tmp_path / "README.md", "experts") == []
    # one implementation missing from the first run's case: the whole case from the rerun
    first["rows"] = [r for r in rerun["rows"] if (r["stage"], r["shape"], r["impl"]) !=
                     ("experts_fwd_bwd", "sonicmoe-7b", "liger")]
    text = "\n".join(readme_table.rerun_only_lines(first, rerun, rerun_path, tmp_path / "README.md", "experts"))
    assert "| sonicmoe-7b at 24576 | **pcmoe** |" in text and "| sonicmoe-7b at 24576 | liger |" in text
    assert "olmoe-1b-7b" not in text


def test_layer_cases_only_the_rerun_timed_are_shown_from_the_rerun(tmp_path):
    """The first run's cap ended before the layer suite at the README's shapes: those cases come from the rerun,
    under the layer's heading; with no layer rows in either run, the section says so."""
    rerun = _peers_report()
    first = json.loads(json.dumps(rerun))
    first["rows"] = [r for r in first["rows"] if not (r["stage"].startswith("layer") and r["tokens"] == 16384)]
    rerun_path = tmp_path / "rerun_peers_h100_abc1234.json"
    cases = [("olmoe-1b-7b", 16384, "balanced"), ("sonicmoe-7b", 24576, "balanced")]
    text = "\n".join(readme_table.layer_lines(first, rerun, rerun_path, tmp_path / "README.md", cases, {}))
    assert text.index("The whole layer (every peer") < text.index("| sonicmoe-7b at 24576 | **pcmoe** |") \
        < text.index("from the rerun alone") < text.index("| olmoe-1b-7b | **pcmoe** |")
    no_layers = dict(first, rows=[r for r in first["rows"] if not r["stage"].startswith("layer")])
    assert readme_table.layer_lines(no_layers, no_layers, rerun_path, tmp_path / "README.md", cases, {}) == \
        ["", "The whole layer: not measured in this run (its time budget ended first)."]


def test_e2e_accounting():
    cfg = load_config(None, ["model.preset=olmoe-1b-7b", "model.num_layers=4"], parties=1)
    m = cfg.model
    active = 4 * (4 * 2048 * 2048 + 2048 * 64 + 8 * 3 * 2048 * 1024) + 2048 * 50304
    assert flops_per_token(m) == 6 * active
    summary = dict(party=0, peak_memory_bytes=100, parameters={"backbone": 3, "local_experts": 4}, bytes_sent=0,
                   final_loss=1.0, memory=dict(backbone_params_bytes=10, expert_params_bytes=20,
                                               optimizer_state_bytes=40))
    steps = [dict(step_time_s=1.0, bytes_sent=100 * i, loss=2.0) for i in range(1, 5)]
    r = party_result(summary, steps, slice(1, None), 0.0, cfg, {"bf16_matmul_tflops": 1.0}, [0.25, 0.25, 0.1],
                     [0.5, 0.25, 0.0])
    assert r["memory"]["gradients"] == 30 and r["memory"]["activations_and_workspace"] == 0
    assert sum(r["memory_share"].values()) == pytest.approx(1.0)
    assert r["tokens_per_s"] == pytest.approx(cfg.train.batch_size * cfg.data.seq_len)
    assert r["exposed_comm_share"] == pytest.approx(0.6 / 3) and r["bytes_sent_per_step"] == 100
    assert r["host_blocked_share"] == pytest.approx(0.75 / 3)
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["model_flops_per_token"] / 1e12)


def test_engine_step_has_named_ranges_forward_and_backward(profiling):
    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, num_experts=4,
                      top_k=2, expert_intermediate_size=16, shared_intermediate_size=16)
    backbone, shard = Backbone(cfg), ExpertShard(cfg)
    backbone.init_weights(torch.Generator().manual_seed(0))
    shard.init_weights(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        logits, routings = backbone(tokens[:, :-1], DistributedExperts(shard, Wire()))
        compute_loss(logits, tokens[:, 1:], routings, 0.01, 0.001).total.backward()
    names = {e.name for e in prof.events()}
    stages = ("router", "permute", "dispatch", "experts", "combine", "attention", "shared_expert", "lm_head")
    missing = {n for s in stages for n in (s, f"{s}.backward")} - names
    assert not missing


def test_range_table_attributes_time_and_memory():
    mem = lambda ts, total: dict(name="[memory]", ph="i", ts=ts, args={"Device Type": 1, "Total Allocated": total})
    events = [dict(name="experts", ph="X", cat="user_annotation", ts=10, dur=10),
              dict(name="experts", ph="X", cat="gpu_user_annotation", ts=12, dur=20),
              mem(5, 100), mem(12, 300), mem(18, 150), mem(25, 900)]
    (row,) = range_table(events, steps=2, device_type=1)
    assert row == dict(range="experts", calls=1, host_ms=10 / 1e3 / 2, gpu_ms=20 / 1e3 / 2, peak_added_bytes=200)


def test_kernel_table_counts_overlapping_kernels_once():
    kernel = lambda name, ts, dur: dict(name=name, ph="X", cat="kernel", ts=ts, dur=dur)
    events = [kernel("gemm", 0, 100), kernel("ncclAllToAll", 50, 100), kernel("gemm", 300, 40),
              kernel("add", 310, 10), dict(name="gemm", ph="X", cat="cpu_op", ts=0, dur=999)]
    table = kernel_table(events, steps=2, top=2)
    assert table["gpu_busy_ms"] == pytest.approx((150 + 40) / 1e3 / 2)  # [0, 150) and [300, 340)
    assert table["nccl_ms"] == pytest.approx(100 / 1e3 / 2)
    assert table["kernels"] == [dict(kernel="gemm", calls_per_step=1.0, gpu_ms=140 / 1e3 / 2),
                                dict(kernel="ncclAllToAll", calls_per_step=0.5, gpu_ms=100 / 1e3 / 2)]


def test_idle_table_puts_each_gap_down_to_the_range_that_launched_its_end():
    op = lambda ts, dur, corr, cat="kernel": dict(name="k", ph="X", cat=cat, ts=ts, dur=dur, args={"correlation": corr})
    launch = lambda ts, corr: dict(name="cudaLaunchKernel", ph="X", cat="cuda_runtime", ts=ts, dur=1,
                                   args={"correlation": corr})
    rng = lambda name, ts, dur: dict(name=name, ph="X", cat="user_annotation", ts=ts, dur=dur)
    events = [rng("permute", 0, 100), rng("experts", 100, 100), rng("dispatch", 110, 10),
              op(0, 20, 1), launch(0, 1),
              op(30, 10, 2), launch(25, 2),  # gap 20-30: launched at 25, after the GPU ran dry: the host's
              op(60, 5, 3, "gpu_memcpy"), launch(35, 3),  # gap 40-60: launched at 35, before it: not the host's
              op(150, 10, 4), launch(115, 4)]  # gap 65-150, launched inside dispatch (inside experts)
    table = idle_table(events, steps=1)
    assert table["idle_ms"] == pytest.approx((10 + 20 + 85) / 1e3)
    assert table["host_late_ms"] == pytest.approx((10 + 85) / 1e3)
    assert table["idle_by_range"] == [dict(range="dispatch", gaps_per_step=1, idle_ms=85 / 1e3),
                                      dict(range="permute", gaps_per_step=2, idle_ms=30 / 1e3)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the suites themselves run (bench/run_device.sh)")
def test_stage_suite_runs_on_the_cpu(tmp_path):
    """The router suite, ours and eager, through pytest-benchmark and the session's JSON (Triton interpreter)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/bench_router.py", "--benchmark-only", "-q", "-p", "no:cacheprovider",
         "--bench-cpu", "--bench-shapes", "tiny-olmoe-1b-7b", "--bench-tokens", "16", "--bench-out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert {(r["routing"], r["impl"]) for r in rep["rows"] if "ms" in r} == {
        (routing, impl) for routing in shapes.ROUTINGS for impl in ("pcmoe", "eager")}
    assert all(isinstance(v, float) for r in rep["rows"] if r["impl"] == "pcmoe" for v in r["vs"].values())


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the suites themselves run (bench/run_device.sh)")
def test_experts_suite_runs_on_the_cpu(tmp_path):
    """The routed-experts suite through pytest on the CPU: transformers' grouped_mm timed and checked against ours,
    SonicMoE (whose CUTLASS DSL kernels need a GPU) recorded with the reason it could not run."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/bench_experts.py", "--benchmark-only", "-q", "-p", "no:cacheprovider",
         "--bench-cpu", "--bench-shapes", "tiny-qwen3-30b-a3b", "--bench-tokens", "16", "--bench-routing", "balanced",
         "--bench-out", str(tmp_path), "--bench-prefix", "peers", "-k", "hf_grouped_mm or sonicmoe"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("peers_*.json")
    rep = json.loads(path.read_text())
    rows = {(r["stage"], r["impl"]): r for r in rep["rows"]}
    assert "ms" in rows["experts_fwd", "hf_grouped_mm"] and "ms" in rows["experts_fwd_bwd", "hf_grouped_mm"]
    check = rows["experts_fwd_bwd", "hf_grouped_mm"]["check"]
    assert check["against"] == "pcmoe" and check["out_rel_err"] < 1e-5 and check["max_grad_rel_err"] < 1e-5
    if importlib.util.find_spec("sonicmoe") is None:
        assert rows["experts_fwd", "sonicmoe"]["error"].startswith("sonic-moe does not import")
    assert [a["name"] for a in rep["anchors"]] == [a.name for a in shapes.ANCHORS]
    assert set(rep["peer_settings"]) == {"liger", "sonicmoe"} and "liger-kernel" in rep["peers"]


def test_projection_adds_what_the_window_does_not_cover():
    from bench import projection

    exchange = {"bytes_sent": 125_000_000, "bytes_received": 50_000_000, "window_s": 0.005, "exposed_s": 0.01}
    party = {"party": 0, "step_ms": 100.0, "exchanges": [exchange], "bytes_sent_per_step": 125_000_000}
    # compute 0.1 - 0.01 s; at 100 Gbit/s the larger direction takes 125e6 * 8 / 1e11 = 0.01 s
    assert projection.party_step_s(party, 100.0, overlap=False) == pytest.approx(0.1)
    assert projection.party_step_s(party, 100.0) == pytest.approx(0.095)
    assert projection.party_step_s(party, 400.0) == pytest.approx(0.09)  # 2.5 ms, hidden in the 5 ms window
    assert projection.party_step_s(party, 100.0, latency_s=0.001) == pytest.approx(0.096)
    slow = dict(party, party=1, step_ms=120.0)
    report = {"per_party": [party, slow], "variant": "token", "config": {"train": {"batch_size": 2, "grad_accum": 1},
                                                                          "data": {"seq_len": 50}}}
    (at100,) = projection.project(report, (100.0,)).values()
    assert at100["step_s"] == pytest.approx(0.115) and at100["tokens_per_s"] == pytest.approx(100 / 0.115)
    text = "a\n" + projection.START + "\nold\n" + projection.END + "\nb"
    assert projection.replace_section(text, "NEW") == "a\nNEW\nb"
    with pytest.raises(ValueError, match="no <!-- scale:start -->"):
        projection.replace_section("no markers", "NEW")


def test_ab_trees_loads_another_checkout_beside_ours(monkeypatch, tmp_path):
    """profiling/ab_trees.py times two checkouts in one process: the other one's csrc_triton must be a package of
    its own (its code, not ours under a second name), and give what ours gives."""
    from profiling.ab_trees import load_base

    base = tmp_path / "checkout"
    shutil.copytree(ROOT / "csrc_triton", base / "csrc_triton")
    monkeypatch.delitem(sys.modules, "csrc_base", raising=False)
    for name in [m for m in sys.modules if m.startswith("csrc_base.")]:
        monkeypatch.delitem(sys.modules, name)
    other = load_base(base)
    assert other.expert_mlp is not ct.expert_mlp
    assert Path(other.expert_mlp.__code__.co_filename).is_relative_to(base)
    gen = torch.Generator().manual_seed(0)
    x, w_gate_up, w_down = torch.randn(12, 16, generator=gen), torch.randn(4, 24, 16, generator=gen) / 4, \
        torch.randn(4, 16, 12, generator=gen) / 4
    ids = torch.randint(0, 4, (12, 2), generator=gen, dtype=torch.int32)
    weights = torch.rand(12, 2, generator=gen)
    assert torch.equal(other.expert_mlp(x, weights, ids, w_gate_up, w_down),
                       ct.expert_mlp(x, weights, ids, w_gate_up, w_down))


def test_sustained_counts_whole_batches_and_energy_a_step():
    calls, readings = [0], iter([1500, 1200, 1800, 1300, 1700] * 1000)

    def step():
        calls[0] += 1

    def energy():  # 7 mJ a step, read at the start and the end
        return 100.0 + 7.0 * calls[0]

    clocks = []

    def clock():
        clocks.append(next(readings))
        return clocks[-1]

    m = at_cap.sustained(step, seconds=0.005, rest=0.0, energy_mj=energy, sm_clock=clock)
    assert m["steps"] == calls[0] and m["steps"] % at_cap.BATCH == 0 and m["steps"] >= at_cap.BATCH
    assert m["mj"] == pytest.approx(7.0)
    assert len(clocks) == m["steps"] // at_cap.BATCH and m["sm_mhz"] == statistics.median(clocks)
    assert m["ms"] > 0
    nan = float("nan")
    blind = at_cap.sustained(step, seconds=0.0, rest=0.0, energy_mj=lambda: nan, sm_clock=lambda: nan)
    assert blind["steps"] == at_cap.BATCH and blind["mj"] is None and blind["sm_mhz"] is None


@pytest.mark.slow
def test_at_cap_times_ours_and_records_an_unavailable_peer(monkeypatch):
    """On the CPU (a tiny shape, our kernels interpreted: one step a batch): every round of ours timed, its TFLOP/s
    from the shape's FLOPs, and SonicMoE (not installed here) recorded as unavailable."""
    if importlib.util.find_spec("sonicmoe") is not None:
        pytest.skip("SonicMoE is installed here: its rows would be timed, not recorded as unavailable")
    monkeypatch.setattr(at_cap, "BATCH", 1)
    rows = at_cap.run([("tiny-qwen3-30b-a3b", 16)], ["pcmoe", "sonicmoe"], seconds=0.0, rest=0.0, rounds=2,
                      warmup=1)
    unavailable = [r for r in rows if "unavailable" in r]
    assert [r["impl"] for r in unavailable] == ["sonicmoe"] and "sonic" in unavailable[0]["unavailable"].lower()
    timed = [r for r in rows if "round" in r]
    assert [(r["impl"], r["round"]) for r in timed] == [("pcmoe", 0), ("pcmoe", 1)]
    flops = shapes.routed_flops(16, shapes.SMOKE_SHAPES["tiny-qwen3-30b-a3b"])
    for r in timed:
        assert r["fwd_bwd"]["steps"] == r["fwd"]["steps"] == at_cap.BATCH
        assert r["fwd_bwd"]["tflops"] == pytest.approx(3 * flops / r["fwd_bwd"]["ms"] / 1e9)
        assert r["fwd"]["tflops"] == pytest.approx(flops / r["fwd"]["ms"] / 1e9)


def test_at_cap_summary_takes_medians_over_rounds_and_speedups_against_ours():
    fake = [dict(shape="s", tokens=8, impl=impl, round=rnd, fwd_bwd=dict(ms=ms, mj=mj), fwd=dict(ms=ms / 3, mj=None))
            for impl, rnd, ms, mj in (("pcmoe", 0, 10.0, 7.0), ("sonicmoe", 0, 12.0, 8.0), ("pcmoe", 1, 11.0, 9.0),
                                      ("sonicmoe", 1, 13.0, None), ("pcmoe", 2, 30.0, 8.0))]
    fake.append(dict(shape="s", tokens=8, impl="liger", unavailable="not installed"))
    ours, sonic = at_cap.summary(fake)
    assert (ours["impl"], ours["rounds"], ours["fwd_bwd_ms"], ours["fwd_bwd_mj"]) == ("pcmoe", 3, 11.0, 8.0)
    assert ours["speedup_fwd_bwd"] == 1.0 and ours["fwd_ms"] == pytest.approx(11.0 / 3)
    assert (sonic["rounds"], sonic["fwd_bwd_ms"], sonic["fwd_bwd_mj"]) == (2, 12.5, 8.0)
    assert sonic["speedup_fwd_bwd"] == pytest.approx(12.5 / 11.0) and sonic["speedup_fwd"] == pytest.approx(12.5 / 11.0)


def test_at_cap_times_each_implementation_with_its_own_function(monkeypatch):
    """Two implementations measured in alternation each run their own function in every round (the suites'
    one experts module, switched between implementations, would have run the last one set for both)."""
    calls = {"a": 0, "b": 0}

    def fake(name):
        def fn(x, ids, weights, w_gate_up, w_down):
            calls[name] += 1
            return x * 2
        return fn

    monkeypatch.setattr(at_cap, "FUNCTIONS", {"a": fake("a"), "b": fake("b")})
    monkeypatch.setattr(at_cap.peers, "require", lambda impl: None)
    monkeypatch.setattr(at_cap, "BATCH", 1)
    rows = at_cap.run([("tiny-olmoe-1b-7b", 8)], ["a", "b"], seconds=0.0, rest=0.0, rounds=2, warmup=1)
    assert [(r["impl"], r["round"]) for r in rows] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert calls == {"a": 2 + 2 * 2, "b": 2 + 2 * 2}  # warm-up of both steps, then two steps a round
