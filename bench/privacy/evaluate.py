"""What a curious expert host can reconstruct of another party's text, with and without the defences, next to
the federated baseline (FedSGD) in which published gradient attacks succeed. One command:

    python -m bench.privacy --preset tiny [--out bench/results/privacy] [--phase NAME[,NAME]] [--redo]

writes report.md, results.json and privacy.png under --out. docs/privacy.md states the threat model.

Two parties, the victim (0) and the attacker (1), train together through the engine (``harness``: each a
``pcmoe_engine.Party`` in its own process, the real wire and its defences between them). The attacker then
watches the victim process its held-out text (forward and backward, as in a training step), once with the rows
in token order and once shuffled, and records per MoE layer the hidden states routed to its experts, their
expert masks and the output gradients sent back for them; the attacks (``attacks``, ``routing``, ``refine``)
work on that record. Scores (``scores``), on the victim's held-out text: token accuracy and BLEU-4.

The run is cut into phases, each one joint training run and its attacks, saved as it ends (``<out>/phases/
<name>.json``; the public model that the shared-initialisation phases fine-tune, trained once, in ``<out>/phases/
public.pt``), so a run that stops keeps what it measured and the next run of the command skips the phases that
are done (``--redo``: run them again; ``--phase``: only those): ``shared`` (shared initialisation, undefended,
with the FedSGD baseline), ``private`` (private initialisation, undefended), then ``noise=<x>`` per point of the
defence sweep (shared initialisation, the worst case: noise multiplier x on hidden states and returned output
gradients, clipped at each exchange's median norm, the rows shuffled), then the default defence's parts alone
(``PARTS``: its noise on the hidden states only, on the gradients only, its clipping only), then ``seed=<k>``,
``seed=<k>:noise=<default>`` and ``seed=<k>:private`` per seed of the preset's spread_seeds: the routing attack
undefended and every attack of the sweep at the default noise, under shared initialisation with train.seed k (a
data split, public model, in ``public-seed=<k>.pt``, and fine-tuning run of their own), and every attack of
``private`` at train.seed k, for their run-to-run spread. The report is written from whatever phases are
there.
"""

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.common import source_commit
from pcmoe_engine.config import SHARED_START_NOISE, PrivacyConfig
from pcmoe_engine.data import encode, party_texts, tokenizer_for

from .attacks import decoder_attack, fedsgd_attack, gradient_attack, nearest_neighbour_attack
from .harness import (ATTACKER, PRESETS, VICTIM, Collaboration, Preset, collaborate, config, finetuning, pretrain,
                      windows)
from .refine import refine_gradients, refine_hidden
from .report import SWEPT, write_report
from .routing import linked_attack, row_attack
from .scores import scores, token_set_recall

__all__ = ["PARTS", "phases", "part_defence", "run_phase", "main"]

NAMES = {"a": "a. nearest neighbour through known layers", "b": "b. learned inversion decoder",
         "c": "c. gradient inversion (iDLG label rule)",
         "d": "d. BiSR-style: a's guess refined through known layers (hidden states)",
         "e": "e. BiSR-style: c's guess refined through known layers (gradients)",
         "r_linked": "r. routing pattern, rows linked by position (in token order)",
         "r_row": "r. routing pattern, one row at a time (shuffled, the default)"}
TARGETS = {"a": "inputs", "b": "inputs", "c": "next tokens", "d": "inputs", "e": "next tokens", "r_linked": "inputs",
           "r_row": "inputs"}


# The default defence's parts one at a time (phases of their own): where its cost in held-out loss comes from
PARTS = (f"hidden={SHARED_START_NOISE}", f"grad={SHARED_START_NOISE}", "clip")
# The attacks on a private-initialisation run (d and e refine through known starting layers, which it has none of)
PRIVATE_ATTACKS = ("a", "b", "c", "r_linked", "r_row")


def phases(preset: Preset) -> list[str]:
    return ["shared", "private", *(f"noise={noise}" for noise in preset.noise if noise > 0), *PARTS,
            *(f"seed={seed}{suffix}" for seed in preset.spread_seeds
              for suffix in ("", f":noise={SHARED_START_NOISE}", ":private"))]


def part_defence(name: str, s: "Setting") -> PrivacyConfig:
    """The defence of a PARTS phase: the default noise on the hidden states only (hidden=<x>) or on the output
    gradients only (grad=<x>), each clipped at its exchange's median norm as the default does; or the clipping
    alone without noise (clip), at the median row norms the undefended shared phase measured (the wire clips at
    each exchange's own median only when it adds noise)."""
    if name == "clip":
        shared = s.cache.parent / "shared.json"
        if not shared.exists():
            raise ValueError("phase clip clips at the median row norms the shared phase measured: run the shared "
                             "phase first (--phase shared)")
        norms = json.loads(shared.read_text())["row_norms"]
        return PrivacyConfig(hidden_clip=norms["hidden"], grad_clip=norms["grad"], hidden_noise=0.0, grad_noise=0.0)
    site, _, noise = name.partition("=")
    return PrivacyConfig(hidden_noise=float(noise) if site == "hidden" else 0.0,
                         grad_noise=float(noise) if site == "grad" else 0.0)


def phase_seed(name: str) -> int:
    """The train.seed a phase runs under: k for seed=<k>[:...], else 0."""
    return int(name.removeprefix("seed=").split(":")[0]) if name.startswith("seed=") else 0


class Setting:
    """What every phase of one train.seed shares: the configuration, the victim's held-out text and the
    attacker's own (the seed deals the text blocks to the parties)."""

    def __init__(self, preset: Preset, threads: int, cache: Path, seed: int = 0):
        self.preset, self.threads, self.cache, self.seed = preset, threads, cache, seed
        self.cfg = cfg = config(preset, seed)
        self.device = torch.device(cfg.train.device)
        tokenizer = tokenizer_for(cfg)
        victim_eval, attacker_text = party_texts(cfg, VICTIM)[1], party_texts(cfg, ATTACKER)[0]
        self.held_out = windows(encode(tokenizer, victim_eval), cfg.data.seq_len, preset.eval_sequences).to(self.device)
        self.aux = windows(encode(tokenizer, attacker_text), cfg.data.seq_len, preset.aux_sequences).to(self.device)
        self.inputs, self.targets = self.held_out[:, :-1], self.held_out[:, 1:]
        self.shape = tuple(self.inputs.shape)
        self.most_frequent = torch.bincount(self.aux.reshape(-1)).argmax().item()
        self.public_text = attacker_text
        self._public = None

    @property
    def public(self) -> dict:
        """The public model, trained on the attacker's own text (public, not the victim's) once per --out: kept in
        ``cache`` with the preset it was trained for, so a later phase in another process (a GPU call of its
        own) starts from the same weights without training them again."""
        if self._public is None:
            saved = torch.load(self.cache, map_location=self.device) if self.cache.exists() else {}
            if saved.get("preset") != asdict(self.preset) or saved.get("seed", 0) != self.seed:
                saved = {"preset": asdict(self.preset), "seed": self.seed, **pretrain(self.cfg, self.public_text)}
                torch.save(saved, self.cache)
            self._public = {part: saved[part] for part in ("backbone", "experts")}
        return self._public

    def chance(self) -> dict:
        """The baseline row: the attacker's most frequent token guessed at every position of the held-out text."""
        return {"attack": "chance (most frequent token)", "key": "chance", "setting": "-", "target": "inputs",
                **scores(torch.full(self.shape, self.most_frequent), self.inputs.cpu())}


def _first(watch: list[dict], tokens: int) -> list[dict]:
    """The watch's rows of the first ``tokens`` positions (the first sequences)."""
    kept = []
    for w in watch:
        pairs, rows = w["token"] < tokens, w["row_token"] < tokens
        kept.append({"layer": w["layer"], **{k: w[k][pairs] for k in ("pair", "token", "hidden", "grad")},
                     "row_token": w["row_token"][rows], "mask": w["mask"][rows]})
    return kept


def attack(s: Setting, run: Collaboration, setting: str, which: tuple[str, ...]) -> tuple[dict, dict]:
    """The attacks ``which`` on ``run``: their rows (scores) and details (the routing attack per layer)."""
    p, cfg, watch, shape = s.preset, s.cfg, run.watch, s.shape
    shared = setting == "shared init"
    known = [run.start, run.backbones[ATTACKER]] if shared else [run.backbones[ATTACKER]]
    recovered, details = {}, {}
    best = lambda guesses, truth: max(guesses, key=lambda r: (r == truth).float().mean().item())  # noqa: E731
    if "a" in which or "d" in which:
        recovered["a"] = nearest_neighbour_attack(watch, known, run.shards, s.aux, shape)
    if "b" in which:
        recovered["b"] = decoder_attack(watch, run.backbones[ATTACKER], run.shards, s.aux, shape)
    if "c" in which or "e" in which:  # per known head; scored with the best (the worst case for the victim)
        heads = [gradient_attack(watch, ref, shape) for ref in known]
        recovered["c"] = best(heads, s.targets)
    count = p.refine_sequences
    part = (count, shape[1])
    if "d" in which:
        first = _first(watch, count * shape[1])
        recovered["d"] = best([refine_hidden(first, ref, run.shards, recovered["a"][:count], part, p.refine_steps)
                               for ref in known], s.inputs[:count])
    if "e" in which:
        first = _first(watch, count * shape[1])
        recovered["e"] = best([refine_gradients(first, ref, run.shards, head[:count], part, p.refine_steps)
                               for ref, head in zip(known, heads, strict=True)], s.targets[:count])
    host = (ATTACKER, cfg.parties)
    if "r_linked" in which:
        recovered["r_linked"] = linked_attack(run.watch_in_order, known, run.shards, s.aux, shape, *host,
                                              p.routing_steps, s.seed)
    if "r_row" in which:
        recovered["r_row"], guesses = row_attack(watch, known, run.shards, s.aux, shape, *host)
        truth = s.inputs.reshape(-1)
        details["r_row_per_layer"] = [
            {"layer": layer, "rows": positions.numel(), "accuracy": (tokens == truth[positions]).float().mean().item(),
             "chance": (truth[positions] == s.most_frequent).float().mean().item()}
            for layer, (positions, tokens) in sorted(guesses.items())]
    seen = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=s.device)
    for w in watch:
        seen[w["token"]] = True
    rows = {}
    for key in which:
        truth = s.inputs if TARGETS[key] == "inputs" else s.targets
        sequences = count if key in ("d", "e") else shape[0]
        rows[key] = {"attack": NAMES[key], "key": key, "setting": setting, "target": TARGETS[key],
                     "sequences": sequences, "seen": seen.view(shape)[:sequences].float().mean().item(),
                     **scores(recovered[key].cpu(), truth[:sequences].cpu())}
    return rows, details


def _fedsgd(s: Setting, run: Collaboration) -> dict:
    """The federated baseline on the shared-init run's victim (FedSGD shares one model; which one is moot)."""
    recovered, bags = [], []
    for sequence in s.held_out[:s.preset.dlg_sequences]:
        tokens, bag = fedsgd_attack(run, s.cfg, sequence, s.preset.dlg_steps)
        recovered.append(tokens)
        bags.append(bag.tolist())
    true = s.inputs[:s.preset.dlg_sequences].cpu()
    # The attacker knows the token set itself, not just what the ordered recovery kept of it.
    return {"attack": "FedSGD: embedding-gradient rows + DLG", "key": "fedsgd", "setting": "shared model, batch 1",
            "target": "inputs", "sequences": len(bags), "seen": 1.0, **scores(torch.stack(recovered), true),
            "token_set_recall": token_set_recall(bags, true.tolist()),
            "token_set_exact": sum(set(b) == set(t) for b, t in zip(bags, true.tolist())) / len(bags)}


def _outcome(run: Collaboration, rows: dict) -> dict:
    """A defended run's cost (the victim's training and held-out loss) and each attack's success against it."""
    return {"final_loss": sum(run.losses[-10:]) / len(run.losses[-10:]), "eval_loss": run.eval_loss,
            **{key: rows[key]["token_accuracy"] for key in rows},
            **{f"{key}_bleu4": rows[key]["bleu4"] for key in rows}}


def run_phase(name: str, s: Setting, log) -> dict:
    """One phase: its joint training run and attacks; the phase's results."""
    started = time.perf_counter()
    result = {"phase": name, "rows": [], "sweep": None, "details": {}}
    if name in ("shared", "private") or name.endswith(":private"):  # seed=<k>:private: private's spread over seeds
        setting = "shared init" if name == "shared" else "private init"
        if name == "shared":
            run = collaborate(finetuning(s.cfg, s.preset), s.public, PrivacyConfig(), s.held_out, s.threads)
        else:
            run = collaborate(s.cfg, None, PrivacyConfig(), s.held_out, s.threads)
        log(f"{setting}: victim loss {run.losses[0]:.3f} -> {run.losses[-1]:.3f} "
            f"({time.perf_counter() - started:.0f} s)")
        which = ("a", "b", "c", "d", "e", "r_linked", "r_row") if name == "shared" else PRIVATE_ATTACKS
        rows, result["details"] = attack(s, run, setting, which)
        result["rows"] = list(rows.values())
        if name == "shared":
            result["rows"].append(_fedsgd(s, run))
            result["sweep"] = {"noise": 0.0, **_outcome(run, {k: rows[k] for k in SWEPT})}
            result["row_norms"] = {kind: torch.cat([w[kind] for w in run.watch]).norm(dim=1).median().item()
                                   for kind in ("hidden", "grad")}
        elif name != "private":
            result.update(seed=s.seed, private=True, chance=s.chance())
    elif name.startswith("seed="):  # the routing attack's spread over seeds, and the default defence's
        noise = float(name.partition(":noise=")[2] or 0)
        run = collaborate(finetuning(s.cfg, s.preset), s.public, PrivacyConfig(hidden_noise=noise, grad_noise=noise),
                          s.held_out, s.threads)
        which = ("r_linked", "r_row") if noise == 0 else tuple(SWEPT)
        rows, result["details"] = attack(s, run, "shared init", which)
        result.update(rows=list(rows.values()), seed=s.seed, noise=noise, chance=s.chance(), eval_loss=run.eval_loss)
    elif name in PARTS:
        run = collaborate(finetuning(s.cfg, s.preset), s.public, part_defence(name, s), s.held_out, s.threads)
        rows, result["details"] = attack(s, run, "shared init", tuple(SWEPT))
        result["part"] = {"part": name, **_outcome(run, rows)}
    else:
        noise = float(name.removeprefix("noise="))
        run = collaborate(finetuning(s.cfg, s.preset), s.public, PrivacyConfig(hidden_noise=noise, grad_noise=noise),
                          s.held_out, s.threads)
        rows, result["details"] = attack(s, run, "shared init", tuple(SWEPT))
        result["sweep"] = {"noise": noise, **_outcome(run, rows)}
    for row in result["rows"]:
        log(f"  {row['attack']:<72} {row['token_accuracy']:.3f} acc, BLEU-4 {row['bleu4']:.3f}")
    point = result["sweep"] or result.get("part")
    if point is not None:
        log(f"{name}: victim loss {point['final_loss']:.3f} (eval {point['eval_loss']:.3f}), attacks "
            + ", ".join(f"{k} {point[k]:.3f}" for k in SWEPT))
    result["seconds"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.privacy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)} (default tiny, CPU)")
    parser.add_argument("--out", default="bench/results/privacy", help="report directory")
    parser.add_argument("--phase", default="", help="comma-separated phases to run (default: every phase not done)")
    parser.add_argument("--redo", action="store_true", help="run the phases again even where their results exist")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (default 1: the matrices are small, more threads "
                             "mostly contend)")
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.exit(2, f"bench.privacy: error: unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}\n")
    preset = PRESETS[args.preset]
    names = phases(preset)
    chosen = [n for n in args.phase.split(",") if n] or names
    if unknown := [n for n in chosen if n not in names]:
        parser.exit(2, f"bench.privacy: error: unknown phase(s) {', '.join(unknown)}: the {args.preset} preset has "
                       f"{', '.join(names)}\n")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.exit(2, "bench.privacy: error: the report's plot needs matplotlib: pip install 'pcmoe[bench]'\n")
    if args.threads < 1:
        parser.exit(2, f"bench.privacy: error: --threads={args.threads} must be at least 1\n")
    torch.set_num_threads(args.threads)
    os.environ.pop("TRITON_INTERPRET", None)  # CPU tensors run csrc_triton's PyTorch references
    out = Path(args.out)
    done = out / "phases"
    done.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m bench.privacy", *(argv if argv is not None else sys.argv[1:])])
    log = lambda message: print(message, flush=True)  # noqa: E731
    try:
        settings = {0: Setting(preset, args.threads, done / "public.pt")}
        for name in chosen:
            path = done / f"{name}.json"
            if path.exists() and not args.redo:
                log(f"{name}: done already ({path}); --redo runs it again")
                continue
            seed = phase_seed(name)
            if seed not in settings:
                settings[seed] = Setting(preset, args.threads, done / f"public-seed={seed}.pt", seed)
            result = run_phase(name, settings[seed], log)
            device = settings[seed].device
            result.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                          commit=source_commit(), command=command, torch=torch.__version__,
                          date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            path.write_text(json.dumps(result, indent=1) + "\n")
    except ValueError as e:
        parser.exit(2, f"bench.privacy: error: {e}\n")
    results = {"preset": asdict(preset), "config": settings[0].cfg.to_dict(), "chance": settings[0].chance(),
               "phases": {n: json.loads((done / f"{n}.json").read_text()) for n in names
                          if (done / f"{n}.json").exists()},
               "missing": [n for n in names if not (done / f"{n}.json").exists()]}
    write_report(results, out)
    print(f"report: {out / 'report.md'}")
