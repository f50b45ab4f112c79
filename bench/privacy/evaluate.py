"""What a curious expert host can reconstruct of another party's text, with and without the defences, next to
the federated baseline (FedSGD) in which published gradient attacks succeed. One command:

    python -m bench.privacy --preset tiny [--out bench/results/privacy]

writes report.md, results.json and privacy.png under --out. docs/privacy.md states the threat model.

Two parties, the victim (0) and the attacker (1), train together through the engine (``harness``: each a
``pcmoe_engine.Party`` in its own process, the real wire and its defences between them). The attacker then
watches the victim process its held-out text (forward and backward, as in a training step) and records, per
MoE layer, the hidden states routed to its experts and the output gradients sent back for them; the attacks
(``attacks``) work on that record. Scores (``scores``), on the victim's held-out text: token accuracy and
BLEU-4 of the recovered text. Runs: shared and private initialisation undefended, then a sweep of the
defence's noise under shared initialisation (the worst case), clipped at the medians of the undefended rows.
"""

import argparse
import datetime
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.common import source_commit
from pcmoe_engine.config import PrivacyConfig
from pcmoe_engine.data import encode, party_texts, tokenizer_for

from .attacks import decoder_attack, fedsgd_attack, gradient_attack, nearest_neighbour_attack
from .harness import ATTACKER, PRESETS, VICTIM, Collaboration, Preset, collaborate, config, windows
from .report import write_report
from .scores import scores, token_set_recall

__all__ = ["run", "main"]


def run(preset: Preset, log=lambda message: print(message, flush=True), threads: int = 1) -> dict:
    """Every attack and the defence sweep; returns the results (the report's numbers). Each joint training
    run is two party processes of ``threads`` CPU threads each."""
    cfg = config(preset)
    device = torch.device(cfg.train.device)
    tokenizer = tokenizer_for(cfg)
    victim_eval, attacker_text = party_texts(cfg, VICTIM)[1], party_texts(cfg, ATTACKER)[0]
    held_out = windows(encode(tokenizer, victim_eval), cfg.data.seq_len, preset.eval_sequences).to(device)
    aux = windows(encode(tokenizer, attacker_text), cfg.data.seq_len, preset.aux_sequences).to(device)
    inputs, targets = held_out[:, :-1], held_out[:, 1:]
    shape = tuple(inputs.shape)
    most_frequent = torch.bincount(aux.reshape(-1)).argmax()
    results = {"preset": asdict(preset), "config": cfg.to_dict(), "rows": [], "sweep": []}
    results["rows"].append({"attack": "chance (most frequent token)", "setting": "-", "target": "inputs",
                            **scores(torch.full(shape, most_frequent.item()), inputs.cpu())})

    def attack_rows(run_: Collaboration, setting: str, which: tuple[str, ...]) -> dict:
        watch = run_.watch
        seen = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=device)
        for w in watch:
            seen[w["token"]] = True
        known = [run_.start, run_.backbones[ATTACKER]] if setting == "shared init" else [run_.backbones[ATTACKER]]
        rows = {}
        if "a" in which:
            rows["a"] = ("a. nearest neighbour through known layers", "inputs",
                         nearest_neighbour_attack(watch, known, run_.shards, aux, shape))
        if "b" in which:
            rows["b"] = ("b. learned inversion decoder", "inputs",
                         decoder_attack(watch, run_.backbones[ATTACKER], run_.shards, aux, shape))
        if "c" in which:  # scored with whichever known head does best: the worst case for the victim
            best = max((gradient_attack(watch, ref, shape) for ref in known),
                       key=lambda r: (r == targets).float().mean().item())
            rows["c"] = ("c. gradient inversion (iDLG label rule)", "next tokens", best)
        out = {}
        for key, (name, target, recovered) in rows.items():
            truth = inputs if target == "inputs" else targets
            out[key] = {"attack": name, "setting": setting, "target": target, "seen": seen.float().mean().item(),
                        **scores(recovered.cpu(), truth.cpu())}
        return out

    started = time.perf_counter()
    runs = {}
    for setting, shared in (("shared init", True), ("private init", False)):
        runs[setting] = collaborate(cfg, shared, PrivacyConfig(), held_out, threads)
        log(f"{setting}: victim loss {runs[setting].losses[0]:.3f} -> {runs[setting].losses[-1]:.3f} "
            f"({time.perf_counter() - started:.0f} s)")
        for row in attack_rows(runs[setting], setting, ("a", "b", "c")).values():
            results["rows"].append(row)
            log(f"  {row['attack']:<45} {row['token_accuracy']:.3f} acc, BLEU-4 {row['bleu4']:.3f}")

    # The federated baseline on the shared-init run's victim (FedSGD shares one model; which one is moot).
    recovered, bags = [], []
    for sequence in held_out[:preset.dlg_sequences]:
        tokens, bag = fedsgd_attack(runs["shared init"], cfg, sequence, preset.dlg_steps)
        recovered.append(tokens)
        bags.append(bag.tolist())
    true = inputs[:preset.dlg_sequences].cpu()
    # The attacker knows the token set itself, not just what the ordered recovery kept of it.
    results["rows"].append({"attack": "FedSGD: embedding-gradient rows + DLG", "setting": "shared model, batch 1",
                            "target": "inputs", "seen": 1.0, **scores(torch.stack(recovered), true),
                            "token_set_recall": token_set_recall(bags, true.tolist()),
                            "token_set_exact": sum(set(b) == set(t) for b, t in zip(bags, true.tolist())) / len(bags)})
    row = results["rows"][-1]
    log(f"  {row['attack']:<45} {row['token_accuracy']:.3f} acc, BLEU-4 {row['bleu4']:.3f}")

    # Defence sweep, shared initialisation (the worst case): clip at the median norm of the undefended rows.
    watch = runs["shared init"].watch
    hidden_clip = torch.cat([w["hidden"] for w in watch]).norm(dim=1).median().item()
    grad_clip = torch.cat([w["grad"] for w in watch]).norm(dim=1).median().item()
    results["clip"] = {"hidden": hidden_clip, "grad": grad_clip}
    for noise in preset.noise:
        privacy = PrivacyConfig(hidden_clip, noise, grad_clip, noise) if noise > 0 else PrivacyConfig()
        run_ = runs["shared init"] if noise == 0 else collaborate(cfg, True, privacy, held_out, threads)
        scored = attack_rows(run_, "shared init", ("a", "c"))
        point = {"noise": noise, "final_loss": sum(run_.losses[-10:]) / len(run_.losses[-10:]),
                 "eval_loss": run_.eval_loss, "a": scored["a"]["token_accuracy"], "a_bleu4": scored["a"]["bleu4"],
                 "c": scored["c"]["token_accuracy"], "c_bleu4": scored["c"]["bleu4"]}
        results["sweep"].append(point)
        log(f"noise {noise}: victim loss {point['final_loss']:.3f} (eval {point['eval_loss']:.3f}), attack a "
            f"{point['a']:.3f}, c {point['c']:.3f} ({time.perf_counter() - started:.0f} s)")
    results["seconds"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.privacy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)} (default tiny, CPU)")
    parser.add_argument("--out", default="bench/results/privacy", help="report directory")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (default 1: the matrices are small, more threads "
                             "mostly contend)")
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.exit(2, f"bench.privacy: error: unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}\n")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.exit(2, "bench.privacy: error: the report's plot needs matplotlib: pip install 'pcmoe[bench]'\n")
    if args.threads < 1:
        parser.exit(2, f"bench.privacy: error: --threads={args.threads} must be at least 1\n")
    torch.set_num_threads(args.threads)
    os.environ.pop("TRITON_INTERPRET", None)  # CPU tensors run csrc_triton's PyTorch references
    preset = PRESETS[args.preset]
    try:
        results = run(preset, threads=args.threads)
    except ValueError as e:
        parser.exit(2, f"bench.privacy: error: {e}\n")
    device = torch.device(results["config"]["train"]["device"])
    results.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                   commit=source_commit(),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   torch=torch.__version__, threads=torch.get_num_threads())
    command = " ".join(["python -m bench.privacy", *(argv if argv is not None else sys.argv[1:])])
    write_report(results, Path(args.out), command)
    print(f"report: {Path(args.out) / 'report.md'}")
