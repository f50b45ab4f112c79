"""bench/convergence.py on its `smoke` scale (a 2-layer model, 4 steps), four small domains cut from Tiny Shakespeare:
its runs, their evaluations on every domain, the results file and README table, and resuming: from a checkpoint,
and after a budget stop, a run ends exactly as one that never stopped."""

import argparse
import gzip
import json
import shutil

import pytest

import pcmoe_engine.cli
from bench import convergence
from bench.convergence_report import main as report
from bench.convergence_routing import main as routing_main
from pcmoe_engine.config import corpus_path
from pcmoe_engine.data import read_text

RUNS = "central-2,pcmoe-2p,local-kernel"
TIMINGS = ("step_time_s", "tokens_per_s", "peak_memory_bytes")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PCMOE_CACHE", str(tmp_path_factory.getbasetemp() / "pcmoe-cache"))


@pytest.fixture(autouse=True)
def _on_the_cpu(monkeypatch):
    """The smoke study runs its parties on the CPU, as in CI, on a GPU machine too: there the scheduler would give
    each party a GPU of its own and skip the 2-party run on a machine of one GPU."""
    monkeypatch.setattr(convergence.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(convergence.torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the parties' processes


@pytest.fixture
def corpora(tmp_path):
    text = read_text(corpus_path("tinyshakespeare"))
    folder = tmp_path / "corpora"
    folder.mkdir()
    for i, domain in enumerate(convergence.DOMAINS):
        with gzip.open(folder / f"{domain}.txt.gz", "wt") as f:
            f.write(text[i * 30_000:(i + 1) * 30_000])
    return folder


def _study(tmp_path, corpora, out, *extra):
    convergence.main(["--scale", "smoke", "--corpora", str(corpora), "--out", str(out), "--results",
                      str(tmp_path / f"results-{out.name}"), "--runs", RUNS, *extra])
    return json.loads((tmp_path / f"results-{out.name}" / "convergence_smoke.json").read_text())


def _metrics(out, run: str, parties: int) -> list[list[dict]]:
    return [[{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
             for line in (out / run / f"party{p}" / "metrics.jsonl").read_text().splitlines()] for p in range(parties)]


@pytest.mark.slow
def test_study_runs_evaluates_every_domain_and_resumes(tmp_path, corpora):
    straight = tmp_path / "straight"
    study = _study(tmp_path, corpora, straight)
    runs = study["runs"]
    assert list(runs) == RUNS.split(",") and all(state["complete"] for state in runs.values())
    assert [runs[name]["tokens_per_step"] for name in runs] == [2 * 2 * 16, 2 * 16, 2 * 16]
    assert not any(state["diagnostic"] for state in runs.values())
    for name, state in runs.items():
        for party, evals in enumerate(state["evals"]):
            assert [e["step"] for e in evals] == [0, 2, 4]
            for e in evals:
                assert set(e["domains"]) == set(convergence.DOMAINS)
                assert e["union"] == pytest.approx(sum(e["domains"].values()) / 4)
            own = state["domains"][party] if state["kind"] == "pcmoe" else state["domains"][0]
            assert evals[-1]["domains"][own] < evals[0]["domains"][own], f"{name} party {party} did not learn"
    # The PC-MoE parties start from their own backbones: different held-out losses at step 0.
    assert runs["pcmoe-2p"]["evals"][0][0]["union"] != runs["pcmoe-2p"]["evals"][1][0]["union"]

    readme = tmp_path / "README.md"
    other = "<!-- convergence:cpu:start -->\nkept\n<!-- convergence:cpu:end -->\n"
    readme.write_text(f"intro\n<!-- convergence:smoke:start -->\nold\n<!-- convergence:smoke:end -->\n{other}rest\n")
    report([str(tmp_path / "results-straight" / "convergence_smoke.json"), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n<!-- convergence:smoke:start -->\n")
    assert text.endswith(f"<!-- convergence:smoke:end -->\n{other}rest\n")
    assert "old" not in text and all(f"| {name} |" in text for name in runs)
    assert (tmp_path / "results-straight" / "convergence_smoke.png").is_file()

    # Where the PC-MoE parties' tokens went: every routing slot counted once, shares and overlaps in range.
    routing_main(["--scale", "smoke", "--corpora", str(corpora), "--out", str(straight), "--results",
                  str(tmp_path / "results-straight"), "--runs", "pcmoe-2p,local-kernel"])
    routed = json.loads((tmp_path / "results-straight" / "routing_smoke.json").read_text())["runs"]
    assert list(routed) == ["pcmoe-2p"]
    routing = routed["pcmoe-2p"]
    assert all(sum(use) == pytest.approx(1) and len(use) == 8 for use in routing["use"])
    assert routing["use_overlap"][0][0] == pytest.approx(1) and 0 < routing["use_overlap"][0][1] <= 1
    assert all(0 <= x <= 1 for x in routing["own_local"]) and set(routing["agreement"]) == set(convergence.DOMAINS)
    assert routing["agreement_by_chance"] == 0.25 and all(0 <= a <= 1 for a in routing["agreement"].values())
    assert len(routing["agreement_by_layer"]) == 2
    assert sum(routing["agreement_by_layer"]) / 2 == pytest.approx(sum(routing["agreement"].values()) / 4)

    # Interrupted after the step-2 checkpoints: the rerun continues from them and ends as the straight run did.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for checkpoint in resumed.glob("*/party*/checkpoints/step_0000004.pt"):
        checkpoint.unlink()
    for summary in resumed.glob("*/party*/summary.json"):
        summary.unlink()
    again = _study(tmp_path, corpora, resumed)
    assert all(state["complete"] for state in again["runs"].values())
    for name, state in again["runs"].items():
        assert _metrics(resumed, name, state["parties"]) == _metrics(straight, name, state["parties"]), name
        assert len(state["calls"]) == 2
        assert state["evals"] == runs[name]["evals"]

    # A later phase on a fresh machine (another --runs, an empty --out): the results keep every earlier run.
    phase = tmp_path / "results-straight"
    convergence.main(["--scale", "smoke", "--corpora", str(corpora), "--out", str(tmp_path / "fresh"), "--results",
                      str(phase), "--runs", "local-kernel"])
    assert json.loads((phase / "convergence_smoke.json").read_text())["runs"] == study["runs"]
    assert not (tmp_path / "fresh" / "local-kernel").exists()

    # A budget already spent: the first run stops before its first step (checkpointed), the others wait; the next
    # call finishes all of them, as if nothing had stopped.
    budget = tmp_path / "budget"
    stopped = _study(tmp_path, corpora, budget, "--budget-s", "0", "--reserve-s", "0")
    started = list(stopped["runs"])  # one run at a time on a CPU; on GPUs, any later run that finds its GPUs free
    assert started[:1] == ["central-2"] and set(started) <= set(RUNS.split(","))
    assert all(not state["complete"] and state["steps_done"] == 0 for state in stopped["runs"].values())
    finished = _study(tmp_path, corpora, budget)
    for name, state in finished["runs"].items():
        assert state["complete"] and state["evals"] == runs[name]["evals"], name


def test_the_party_batch_diagnostic_pools_the_domains_at_one_partys_batch():
    scale = convergence.SCALES["smoke"]
    assert convergence.KNOWN["central-2"].batch_size(scale) == 2 * scale.batch
    diagnostic = convergence.KNOWN["central-2-party-batch"]
    assert diagnostic.batch_size(scale) == scale.batch and diagnostic.domains == convergence.DOMAINS[:2]
    assert diagnostic in convergence.DIAGNOSTICS


@pytest.mark.parametrize("visible, expected", [(None, "1,2"), ("4,5,6", "5,6")])
def test_a_run_gets_the_gpus_it_was_given_among_those_visible(tmp_path, monkeypatch, visible, expected):
    """The study may itself be confined to some GPUs (another job beside it): a run's GPU indexes are its."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    seen = {}
    monkeypatch.setattr(pcmoe_engine.cli, "launch", lambda n, argv, env, module: seen.update(env) or 0)
    args = argparse.Namespace(out=tmp_path, corpora=tmp_path)
    convergence._launch_run("smoke", convergence.KNOWN["pcmoe-2p"], args, [1, 2], deadline=0.0)
    assert seen["CUDA_VISIBLE_DEVICES"] == expected
    assert json.loads((tmp_path / "pcmoe-2p" / "calls.json").read_text())[0]["device"] == "cuda x 2"


FINE_TUNED = "central-2-ft,pcmoe-2p-ft,pcmoe-2p-ft-no-noise,local-kernel-ft"


@pytest.mark.slow
def test_the_ft_runs_start_from_one_public_checkpoint_made_once(tmp_path, corpora):
    from bench.convergence_report import comparison, own_losses
    from pcmoe_engine.data import tokenizer_for

    out, results = tmp_path / "out", tmp_path / "results"
    args = ["--scale", "smoke", "--corpora", str(corpora), "--out", str(out), "--results", str(results)]
    convergence.main([*args, "--runs", FINE_TUNED])
    study = json.loads((results / "convergence_smoke.json").read_text())
    runs = study["runs"]
    assert list(runs) == ["public-pretrain", *FINE_TUNED.split(",")] and all(s["complete"] for s in runs.values())
    public = out / convergence.PUBLIC_CHECKPOINT
    assert (public / "config.json").is_file() and any(public.glob("*.safetensors"))
    assert runs["public-pretrain"]["steps_done"] == convergence.SCALES["smoke"].steps // 2
    for name in FINE_TUNED.split(","):
        assert runs[name]["config"]["model"]["init_from"] == str(public) and runs[name]["public_init"]
    assert runs["pcmoe-2p-ft"]["noise"] == {"hidden": 0.5, "output_grad": 0.5}  # the engine's default
    assert runs["pcmoe-2p-ft-no-noise"]["noise"] == {"hidden": 0.0, "output_grad": 0.0}

    # Every party of every noiseless -ft run starts as the pretrained model ended; from scratch, it started higher.
    pretrained, scratch = (runs["public-pretrain"]["evals"][0][i]["domains"] for i in (-1, 0))
    starts = [evals[0]["domains"] for name in ("central-2-ft", "pcmoe-2p-ft-no-noise", "local-kernel-ft")
              for evals in runs[name]["evals"]]
    for start in starts:
        assert start == pytest.approx(pretrained, abs=1e-4) and start != pytest.approx(scratch, abs=1e-2)
    # The noised run's evaluation goes through the noised protocol: another step 0.
    assert runs["pcmoe-2p-ft"]["evals"][0][0]["domains"] != pytest.approx(pretrained, abs=1e-6)
    # The held-out tokens are the from-scratch runs' (the cache is shared): the checkpoint carries the same BPE.
    text = "Documentation of the kernel's memory manager, and its manual page."
    tokenizers = [tokenizer_for(convergence.run_config(convergence.SCALES["smoke"], convergence.KNOWN[name], out))
                  for name in ("central-2", "central-2-ft")]
    assert tokenizers[0].encode(text).ids == tokenizers[1].encode(text).ids

    # A -ft PC-MoE party is compared with its own family, central-2-ft and local-<domain>-ft.
    row = next(r for r in comparison(study) if r["run"] == "pcmoe-2p-ft" and r["domain"] == "kernel")
    assert row["central"] == own_losses(study, "central-2-ft")["kernel"]
    assert row["local"] == own_losses(study, "local-kernel-ft")["kernel"]
    assert not any(r["domain"] == "manuals" and r["local"] is not None for r in comparison(study))  # not run
    # ... and only while they started from the same checkpoint (one remade with other CPU threads differs).
    digest = convergence._digest(public)
    assert all(runs[name]["public_checkpoint"] == digest for name in ["public-pretrain", *FINE_TUNED.split(",")])
    study["runs"]["central-2-ft"]["public_checkpoint"] = "another"
    row = next(r for r in comparison(study) if r["run"] == "pcmoe-2p-ft" and r["domain"] == "kernel")
    assert row["central"] is None and row["local"] == own_losses(study, "local-kernel-ft")["kernel"]

    # Another -ft run later reuses the checkpoint: the pretraining ran in one call, the folder was not rewritten.
    written = {p.name: p.stat().st_mtime_ns for p in public.iterdir()}
    convergence.main([*args, "--runs", "local-manuals-ft"])
    again = json.loads((results / "convergence_smoke.json").read_text())["runs"]
    assert again["local-manuals-ft"]["complete"] and len(again["public-pretrain"]["calls"]) == 1
    assert {p.name: p.stat().st_mtime_ns for p in public.iterdir()} == written
    assert again["local-manuals-ft"]["evals"][0][0]["domains"] == pytest.approx(pretrained, abs=1e-4)


def test_the_ft_runs_need_a_model_of_a_transformers_family(tmp_path, capsys):
    """The gpu scale's `small` preset (an ungated shared expert) is no transformers architecture: refused before
    anything runs."""
    with pytest.raises(SystemExit, match="-ft runs start from a transformers checkpoint of the gpu scale's model"):
        convergence.main(["--scale", "gpu", "--out", str(tmp_path / "out"), "--results", str(tmp_path), "--runs",
                          "pcmoe-2p-ft"])
    assert not (tmp_path / "out" / "public-pretrain").exists()
