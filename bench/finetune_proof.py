"""GPU proof of issue 12 (item 7): four parties fine-tune a 6.9 B-parameter MoE with OLMoE-1B-7B's shapes from a
transformers checkpoint, pool their experts into a transformers model, and `pcmoe eval` agrees with transformers
on it. One call of nvidia-h100-x4 (4 GPUs), under 9 minutes (`bench/run_device.sh finetune`):

    PYTHONPATH=. python3 bench/finetune_proof.py --out DIR

Steps, each timed in the log ("== ... done in N s") and in the results JSON, which is written again after every
step so that a run cut short still says where its time went (estimates for 4 x H100, 64 cores, local disk):

1. checkpoint (~45 s): OLMoE-1B-7B's config.json (transformers' OlmoeConfig, intermediate_size 1024, so 6.9 B
   parameters) with random weights drawn on GPU 0 (normal, std 0.02; norms 1), written in bf16 (13.8 GB, 5 GB
   files) by the engine's save_hf_checkpoint to the device's disk, with the engine's BPE (16,384 tokens, trained on
   Tiny Shakespeare) as its tokenizer.json;
2. one process loads the whole model the way a party loads its part (a Party of a one-party run: backbone and all
   64 experts, fp32 on GPU 0): the baseline for host RSS and GPU memory (~30 s);
3. `pcmoe train --parties 4 --set model.init_from=...`: 20 steps, one party per GPU over NCCL, each on its own
   text (the four .corpora domains when carried, else four stretches of Tiny Shakespeare: non-iid), then its
   checkpoint (weights and AdamW state, fp32: ~25 GB per party); each party's load seconds, peak host RSS and peak
   GPU memory come from its summary.json (~150 s);
4. `pcmoe export RUN --party 0 --out EXPORT --pool` (bf16, the dtype the run started from) (~60 s);
5. on held-out text (the next 24 KB of each party's text, never trained on), at once: transformers
   (AutoModelForCausalLM.from_pretrained(EXPORT), every key loaded) in bf16 and then fp32 on GPU 0,
   `pcmoe eval EXPORT` in bf16 autocast on GPU 1 and in fp32 on GPU 3, `pcmoe eval RUN --party 0` on GPU 2 (~75 s).

Agreement: fp32 against fp32 on the same weights within a relative 1e-4; bf16 within 2e-2 (transformers computes
in bf16 throughout, the engine under autocast keeps fp32 master weights, norms and residual stream). The run's own
loss (fp32 weights) differs from the export's by the rounding of its weights to bf16. Results:
DIR/finetune_<gpu>_<commit>.json.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OLMOE_1B_7B = dict(model_type="olmoe", architectures=["OlmoeForCausalLM"], vocab_size=50304, hidden_size=2048,
                   intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                   num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, rms_norm_eps=1e-5,
                   max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                   tie_word_embeddings=False, pad_token_id=1, eos_token_id=0, bos_token_id=None)  # the BPE's ids
PARTIES = 4
# The proof; and --small, the same steps on a 2-layer model, to check this script on a CPU (2.5 min on 2 cores).
SETUPS = {
    "olmoe-1b-7b": dict(config=OLMOE_1B_7B, bpe_vocab=16384, seq_len=1024, batch_size=4, train_bytes=1_000_000,
                        held_out_bytes=24_000),
    "small": dict(config={**OLMOE_1B_7B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 32,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                          "num_experts": 8, "num_experts_per_tok": 2},
                  bpe_vocab=512, seq_len=32, batch_size=2, train_bytes=40_000, held_out_bytes=2_000),
}


def train_options(setup: dict) -> list[str]:
    return ["train.steps=20", f"train.batch_size={setup['batch_size']}", f"data.seq_len={setup['seq_len']}",
            "train.lr=3e-4", "train.min_lr=3e-5", "train.warmup_steps=2", "train.log_every=1", "train.eval_batches=2",
            "train.keep_checkpoints=1"]


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def say(line: str) -> None:
    print(line, flush=True)


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


# -----------------------------------------------------------------------------------------------------------------
# The steps that run in a process of their own (their GPU memory is theirs alone): `finetune_proof.py STEP ...`

def write_checkpoint(directory: str, setup_name: str) -> None:
    import torch

    from pcmoe_engine.config import DataConfig
    from pcmoe_engine.data import load_tokenizer
    from pcmoe_engine.hf import save_hf_checkpoint
    from pcmoe_engine.hf_config import config_from_hf
    from pcmoe_engine.model import empty_backbone
    from pcmoe_engine.protocol import ExpertShard

    setup = SETUPS[setup_name]
    cfg = config_from_hf(setup["config"])
    torch.manual_seed(0)
    backbone = empty_backbone(cfg, device())
    with torch.device(device()):
        shard = ExpertShard(cfg)  # every expert
    with torch.no_grad():
        for p in [*backbone.parameters(), *shard.parameters()]:
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02)  # OLMoE has no biases: 1-D are norm weights
    tokenizer = load_tokenizer(DataConfig(), setup["bpe_vocab"])
    save_hf_checkpoint(directory, backbone, [shard], base_config=setup["config"], dtype=torch.bfloat16,
                       extra_files={"tokenizer.json": tokenizer.to_str()})


def load_whole(directory: str, text: str, out_json: str, setup_name: str) -> None:
    """A Party of a one-party run: what a party does, for the whole model."""
    from pcmoe_engine.config import load_config
    from pcmoe_engine.party import Party

    cfg = load_config(None, ["parties=1", f"model.init_from={directory}", f"data.party_paths=['{text}']",
                             f"train.device={device()}", f"train.out_dir={Path(out_json).parent}",
                             "train.checkpoints=false", *train_options(SETUPS[setup_name])])
    Path(out_json).write_text(json.dumps(Party(cfg, 0).setup))


def transformers_eval(export: str, text: str, out_json: str, setup_name: str) -> None:
    """transformers' mean next-token loss on the windows `pcmoe eval` uses (pcmoe_engine/inference.py), in bf16
    (the export's dtype) and then in fp32."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from pcmoe_engine.data import encode, read_text
    from pcmoe_engine.inference import summed_cross_entropy, window_batches

    started = time.perf_counter()
    model, info = AutoModelForCausalLM.from_pretrained(export, output_loading_info=True)
    model = model.to(device()).eval()
    result = {"load_s": time.perf_counter() - started, "missing_keys": sorted(info["missing_keys"]),
              "unexpected_keys": sorted(info["unexpected_keys"]), "mismatched_keys": len(info["mismatched_keys"]),
              "dtype": str(model.dtype)}
    tokens = encode(Tokenizer.from_file(f"{export}/tokenizer.json"), read_text(text))
    for dtype in ("bf16", "fp32"):
        model = model.float() if dtype == "fp32" else model
        total, count, started = 0.0, 0, time.perf_counter()
        with torch.no_grad():
            for batch in window_batches(tokens, SETUPS[setup_name]["seq_len"], 8):
                batch = batch.to(device())
                total += summed_cross_entropy(model(batch[:, :-1]).logits, batch)
                count += batch[:, 1:].numel()
        result[dtype] = {"loss": total / count, "tokens": count, "seconds": time.perf_counter() - started}
    Path(out_json).write_text(json.dumps(result))


# -----------------------------------------------------------------------------------------------------------------
# The driver


def party_texts(work: Path, setup: dict) -> tuple[list[Path], Path, str]:
    """Each party's training text, and the held-out text: the next held_out_bytes of each party's source."""
    size = setup["train_bytes"] + setup["held_out_bytes"]
    domains = sorted((ROOT / ".corpora").glob("*.txt.gz"))[:PARTIES]
    if len(domains) == PARTIES:
        sources = [gzip.open(d, "rt", encoding="utf-8").read(size) for d in domains]
        source = "the .corpora domains " + ", ".join(d.name for d in domains)
    else:  # four stretches of Tiny Shakespeare, far apart (different plays): non-iid
        text = gzip.open(ROOT / "pcmoe_engine" / "data" / "tinyshakespeare.txt.gz", "rt", encoding="utf-8").read()
        stride = len(text) // PARTIES
        sources = [text[p * stride:p * stride + min(size, stride)] for p in range(PARTIES)]
        source = "Tiny Shakespeare, four stretches far apart"
    (work / "text").mkdir(parents=True, exist_ok=True)
    paths = [work / "text" / f"party{p}.txt" for p in range(PARTIES)]
    for path, text in zip(paths, sources):
        path.write_text(text[:-setup["held_out_bytes"]])
    held_out = work / "text" / "held_out.txt"
    held_out.write_text("\n\n".join(text[-setup["held_out_bytes"]:] for text in sources))
    return paths, held_out, source


class Proof:
    """The results, written after every step; each step's seconds."""

    def __init__(self, out: Path, budget_s: float):
        from bench.common import environment
        from bench.report import gpu_tag

        self.started, self.budget_s = time.perf_counter(), budget_s
        self.results = dict(environment(), benchmark="finetune-proof", parties=PARTIES, seconds={})
        self.path = out / f"finetune_{gpu_tag(self.results['device'])}_{self.results['commit']}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.results, indent=1) + "\n")

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def step(self, name: str, estimate_s: float, *commands: list[str], gpus: list[str] | None = None,
             capture: bool = False) -> list[str]:
        """Run ``commands`` at once (each on its GPU of ``gpus``), within what is left of the budget; returns
        their stdout when ``capture`` (else it goes to the log)."""
        at = time.perf_counter() - self.started
        say(f"== {name} (at {at:.0f} s, estimate {estimate_s:.0f} s, {self.left():.0f} s left)")
        begun = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        procs = [subprocess.Popen(c, env={**env, **({"CUDA_VISIBLE_DEVICES": gpus[i]} if gpus else {})},
                                  stdout=subprocess.PIPE if capture else None, text=True, cwd=ROOT)
                 for i, c in enumerate(commands)]
        outputs = []
        try:
            for p in procs:
                out, _ = p.communicate(timeout=max(1.0, self.left()))
                outputs.append(out or "")
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            self.results["stopped"] = f"{name}: out of time after {time.perf_counter() - begun:.0f} s"
            self.save()
            raise SystemExit(f"== {name}: STOPPED, out of the {self.budget_s:.0f} s budget")
        seconds = time.perf_counter() - begun
        self.results["seconds"][name] = round(seconds, 1)
        failed = [c for c, p in zip(commands, procs) if p.returncode]
        if failed:
            self.results["failed"] = f"{name}: {' '.join(map(str, failed[0]))}"
            self.save()
            raise SystemExit(f"== {name}: FAILED after {seconds:.0f} s ({self.results['failed']})")
        say(f"== {name} done in {seconds:.0f} s")
        self.save()
        return outputs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the results JSON")
    parser.add_argument("--work", default="/tmp/pcmoe-finetune", help="on the local disk: ~130 GB are written")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all the steps")
    parser.add_argument("--small", action="store_true", help="a 2-layer model: check the script on a CPU")
    args = parser.parse_args(argv)
    name = "small" if args.small else "olmoe-1b-7b"
    setup, work = SETUPS[name], Path(args.work)
    pretrained, run, export = work / f"{name}-random", work / "runs" / "run", work / "export"
    me, cli = [sys.executable, str(Path(__file__).resolve())], [sys.executable, "-m", "pcmoe_engine.cli"]
    proof = Proof(Path(args.out), args.budget)
    r = proof.results
    texts, held_out, source = party_texts(work, setup)
    r.update(setup=name, text=source, train_bytes_per_party=setup["train_bytes"],
             held_out_bytes=setup["held_out_bytes"] * PARTIES, seq_len=setup["seq_len"],
             train_options=train_options(setup))

    proof.step("1 write the checkpoint", 45, [*me, "write", str(pretrained), name])
    r["checkpoint"] = {"config": json.loads((pretrained / "config.json").read_text()),
                       "bytes": sum(p.stat().st_size for p in pretrained.glob("*.safetensors")),
                       "files": sorted(p.name for p in pretrained.iterdir())}

    whole = work / "whole.json"
    proof.step("2 one process loads the whole model", 30,
               [*me, "load-whole", str(pretrained), str(texts[0]), str(whole), name], gpus=["0"])
    r["load_whole_model"] = json.loads(whole.read_text())

    sets = [*train_options(setup), f"model.init_from={pretrained}", f"data.party_paths={[str(t) for t in texts]}",
            f"train.out_dir={run.parent}", f"train.name={run.name}"]
    proof.step("3 four parties load their parts and train 20 steps", 150,
               [*cli, "train", "--parties", str(PARTIES), *[a for s in sets for a in ("--set", s)]])
    parties = [json.loads((run / f"party{p}" / "summary.json").read_text()) for p in range(PARTIES)]
    r["parties_load"] = [s["setup"] for s in parties]
    r["train"] = {key: [s[key] for s in parties] for key in ("initial_loss", "final_loss", "eval_loss", "tokens_per_s",
                                                             "peak_memory_bytes", "bytes_sent", "parameters")}
    r["model"] = json.loads((run / "summary.json").read_text())["config"]["model"]
    r["total_parameters"] = (parties[0]["parameters"]["backbone"] +
                             sum(s["parameters"]["local_experts"] for s in parties))
    r["checkpoint_bytes_per_party"] = [sum(p.stat().st_size for p in (run / f"party{i}" / "checkpoints").glob("*.pt"))
                                       for i in range(PARTIES)]
    proof.save()

    proof.step("4 export with --pool", 60, [*cli, "export", str(run), "--party", "0", "--out", str(export), "--pool"])
    r["export"] = {"bytes": sum(p.stat().st_size for p in export.glob("*.safetensors")),
                   "files": sorted(p.name for p in export.iterdir())}

    hf_json = work / "transformers.json"
    evals = [[*cli, "eval", str(path), "--text", str(held_out), "--seq-len", str(setup["seq_len"]), *extra]
             for path, extra in ((export, ["--precision", "bf16"]), (run, ["--party", "0"]),
                                 (export, ["--precision", "fp32"]))]
    outputs = proof.step("5 transformers and pcmoe eval on held-out text", 75,
                         [*me, "transformers-eval", str(export), str(held_out), str(hf_json), name], *evals,
                         gpus=["0", "1", "2", "3"], capture=True)
    hf = json.loads(hf_json.read_text())
    engine_bf16, engine_run, engine_fp32 = (json.loads(out.strip().splitlines()[-1]) for out in outputs[1:])
    r["transformers_eval"] = hf
    r["pcmoe_eval"] = {"export_bf16": engine_bf16, "run_party0": engine_run, "export_fp32": engine_fp32}
    a = r["agreement"] = {
        "fp32_rel": abs(engine_fp32["loss"] / hf["fp32"]["loss"] - 1), "fp32_tolerance": 1e-4,
        "bf16_rel": abs(engine_bf16["loss"] / hf["bf16"]["loss"] - 1), "bf16_tolerance": 2e-2,
        "run_vs_export_rel": abs(engine_run["loss"] / engine_bf16["loss"] - 1),
        "all_keys_loaded": not hf["missing_keys"] and not hf["unexpected_keys"] and not hf["mismatched_keys"]}
    a["ok"] = a["all_keys_loaded"] and a["fp32_rel"] <= a["fp32_tolerance"] and a["bf16_rel"] <= a["bf16_tolerance"]
    proof.save()
    say(f"transformers {hf['bf16']['loss']:.5f} (bf16) {hf['fp32']['loss']:.5f} (fp32); pcmoe eval of the export "
        f"{engine_bf16['loss']:.5f} (bf16) {engine_fp32['loss']:.5f} (fp32), of the run {engine_run['loss']:.5f}; "
        f"relative differences {a['bf16_rel']:.2e} (bf16) {a['fp32_rel']:.2e} (fp32); every key loaded: "
        f"{a['all_keys_loaded']}; {'OK' if a['ok'] else 'NOT OK'}")
    for p, (load, s) in enumerate(zip(r["parties_load"], parties)):
        say(f"party {p}: set up (text, tokens, weights) in {load['seconds']:.1f} s, peak host RSS "
            f"{gib(load['peak_host_rss_bytes'])}, GPU "
            f"{gib(load['peak_device_bytes'])}; loss {s['initial_loss']:.3f} -> {s['final_loss']:.3f}")
    w = r["load_whole_model"]
    say(f"one process, the whole model: set up in {w['seconds']:.1f} s, peak host RSS {gib(w['peak_host_rss_bytes'])}"
        f", GPU {gib(w['peak_device_bytes'])}; results: {proof.path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("write", "load-whole", "transformers-eval"):
        {"write": write_checkpoint, "load-whole": load_whole, "transformers-eval": transformers_eval}[sys.argv[1]](
            *sys.argv[2:])
    else:
        main()
