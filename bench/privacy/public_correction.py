"""privacy.public_correction against the noise alone, under shared initialisation, per train.seed: the victim's
held-out loss and what the attacks of the defence sweep recover (docs/privacy.md, "The public-expert correction").

    python -m bench.privacy.public_correction --preset tiny --seeds 0,1,2,3 [--out bench/results/privacy]

Per seed, five joint fine-tunings of that seed's public model (evaluate.Setting: its data split and public model):
undefended; the default noise on hidden states and output gradients, without and with the correction; the default
noise on the hidden states only, without and with it (the correction acts on what the hidden states' noise does to
the outputs; the gradients' noise it leaves as it is). Each run is saved as it ends into
``<out>/public_correction_<preset>.json`` (with the commit, device and date); a rerun skips the runs there.
"""

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from bench.common import source_commit
from pcmoe_engine.config import SHARED_START_NOISE, PrivacyConfig

from .evaluate import Setting, _outcome, attack
from .harness import PRESETS, collaborate, finetuning
from .report import SWEPT

NOISE = SHARED_START_NOISE
RUNS = {"undefended": PrivacyConfig(hidden_noise=0.0, grad_noise=0.0),
        "default": PrivacyConfig(hidden_noise=NOISE, grad_noise=NOISE),
        "default+correction": PrivacyConfig(hidden_noise=NOISE, grad_noise=NOISE, public_correction=True),
        "hidden": PrivacyConfig(hidden_noise=NOISE, grad_noise=0.0),
        "hidden+correction": PrivacyConfig(hidden_noise=NOISE, grad_noise=0.0, public_correction=True)}


def summary(results: dict) -> list[str]:
    """Per seed and run: the held-out loss, its cost against the seed's undefended run and the strongest attack."""
    lines = ["| seed | run | held-out loss | cost | strongest attack (a, c, d, e, r) |", "|---|---|---|---|---|"]
    for key, run in results["runs"].items():
        seed, name = key.split("/")
        base = results["runs"].get(f"{seed}/undefended")
        cost = f"{run['eval_loss'] / base['eval_loss'] - 1:+.2%}" if base and name != "undefended" else "-"
        lines.append(f"| {seed} | {name} | {run['eval_loss']:.4f} | {cost} | {max(run[k] for k in SWEPT):.3f} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--out", type=Path, default=Path("bench/results/privacy"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"public_correction_{args.preset}.json"
    results = json.loads(path.read_text()) if path.exists() else {"preset": args.preset, "runs": {}}
    for seed in (int(s) for s in args.seeds.split(",")):
        cache = args.out / "phases" / ("public.pt" if seed == 0 else f"public-seed={seed}.pt")  # as evaluate.py's
        setting = Setting(PRESETS[args.preset], args.threads, cache, seed)
        for name, privacy in RUNS.items():
            if f"{seed}/{name}" in results["runs"]:
                continue
            started = time.perf_counter()
            run = collaborate(finetuning(setting.cfg, setting.preset), setting.public, privacy, setting.held_out,
                              setting.threads)
            rows, _ = attack(setting, run, "shared init", tuple(SWEPT))
            results["runs"][f"{seed}/{name}"] = {
                **_outcome(run, rows), "seen": {key: row["seen"] for key, row in rows.items()},
                "commit": source_commit(), "device": str(setting.device),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "seconds": time.perf_counter() - started}
            path.write_text(json.dumps(results, indent=1))
            print(summary({"runs": {k: v for k, v in results["runs"].items() if k.startswith(f"{seed}/")}})[-1],
                  flush=True)
    print("\n".join(summary(results)))


if __name__ == "__main__":  # not when a spawned party process imports this module as __mp_main__
    main()
