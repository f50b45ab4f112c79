"""The evaluation's report, from the phases there are: results.json (every number), report.md (the tables, the
targets and what no attack here tries) and privacy.png (attack success and the victim's loss against the
defence's noise)."""

import json
from pathlib import Path

from pcmoe_engine.config import SHARED_START_NOISE

__all__ = ["routing_spread", "write_report", "plot"]

SWEPT = {"a": "a. known layers", "c": "c. gradients", "d": "d. BiSR hidden", "e": "e. BiSR gradients",
         "r_row": "r. routing, shuffled"}
NOT_TRIED = [
    "malicious hosts that deviate from the protocol (crafted outputs or gradients to steer the victim's backbone, "
    "dropped or replayed rows);",
    "attackers that know part of the victim's text, or its fine-tuned weights, and align its hidden space to their "
    "own (the known-layer attacks know only the shared starting weights and the attacker's own);",
    "linking shuffled rows across layers or steps through their hidden states or norms (attacks d and e are given "
    "every row's position instead, an upper bound that ignores the shuffle; r in token order is given the true "
    "alignment);",
    "averaging over many observations of the same text: each attack sees one forward and backward; the same "
    "held-out text crosses again at every evaluation, and training text at every epoch, with fresh noise;",
    "language-model priors on the recovered text (beam search over a pretrained LM), which published attacks use "
    "to turn partial recoveries into more text;",
    "the routing statistics alone (how often each expert is used, a topic signal), and timing or size side "
    "channels;",
    "what the final model memorises, and pooled experts after `pcmoe export --pool`.",
]


def _rows(results: dict) -> list[dict]:
    phases = results["phases"]
    rows = [results["chance"]]
    for name in ("shared", "private"):
        rows += [r for r in phases.get(name, {}).get("rows", []) if r["key"] != "fedsgd"]
    rows += [r for r in phases.get("shared", {}).get("rows", []) if r["key"] == "fedsgd"]
    return rows


def _sweep(results: dict) -> list[dict]:
    return sorted((p["sweep"] for p in results["phases"].values() if p.get("sweep")), key=lambda s: s["noise"])


def _stat(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def routing_spread(results: dict) -> list[dict]:
    """The routing attack's run-to-run spread under shared initialisation, per noise (0 and the default) measured at
    more than one train.seed: each run's shuffled and token-order accuracy, chance and held-out loss (seed 0: the
    shared and noise=<default> phases; seed k: the seed=<k> phases), and their mean, min and max; for the default,
    also its held-out loss cost against the undefended run of the same seed (``cost``), where two seeds have both."""
    phases, spread = results["phases"], []
    for noise in (0.0, SHARED_START_NOISE):
        runs = [{"seed": p["seed"], "chance": p["chance"]["token_accuracy"],
                 **{r["key"]: r["token_accuracy"] for r in p["rows"]},
                 **({"eval_loss": p["eval_loss"]} if "eval_loss" in p else {})}
                for p in phases.values() if p.get("seed") is not None and not p.get("private") and p["noise"] == noise]
        zero = phases.get("shared" if noise == 0 else f"noise={noise}")
        if zero is not None:  # seed 0: the undefended phase's routing rows, or the default's sweep point
            found = {r["key"]: r["token_accuracy"] for r in zero["rows"] if r["key"] in ("r_row", "r_linked")}
            sweep = zero.get("sweep") or {}
            runs.insert(0, {"seed": 0, "chance": results["chance"]["token_accuracy"],
                            **(found or {key: sweep[key] for key in SWEPT if key in sweep}),
                            **({"eval_loss": sweep["eval_loss"]} if "eval_loss" in sweep else {})})
        if len(runs) > 1:
            summary = {key: _stat(values) for key in ("r_row", "r_linked", "chance")
                       if len(values := [run[key] for run in runs if key in run]) == len(runs)}
            spread.append({"noise": noise, "seeds": [run["seed"] for run in runs], "runs": runs, **summary})
    if len(spread) == 2:
        undefended = {run["seed"]: run["eval_loss"] for run in spread[0]["runs"] if "eval_loss" in run}
        for run in spread[1]["runs"]:
            if "eval_loss" in run and run["seed"] in undefended:
                run["cost"] = run["eval_loss"] / undefended[run["seed"]] - 1
        if len(costs := [run["cost"] for run in spread[1]["runs"] if "cost" in run]) > 1:
            spread[1]["cost"] = {**_stat(costs), "runs": len(costs)}
    return spread


def _spread(stat: dict) -> str:
    return f"{stat['mean']:.1%} ({stat['min']:.1%} to {stat['max']:.1%})"


def _cost_over_seeds(results: dict) -> str:
    """The end of the shared target's line: the default's cost and routing attack over the seeds' runs, if any."""
    default = next((p for p in results.get("routing_spread", []) if p["noise"] == SHARED_START_NOISE), {})
    if "cost" not in default:
        return ", not checked on a separate run."
    cost = default["cost"]
    line = (f". Over {cost['runs']} runs (train.seed {', '.join(map(str, default['seeds']))}, each against the "
            f"undefended run of its seed) it costs {cost['mean']:+.1%} on the mean ({cost['min']:+.1%} to "
            f"{cost['max']:+.1%}) and the routing attack recovers {_spread(default['r_row'])}")
    full = [run for run in default["runs"] if "cost" in run and all(key in run for key in SWEPT)]
    if not full:
        return line + "; the attacks on hidden states and gradients ran at seed 0 only."
    strongest = [max(run[key] for key in SWEPT) for run in full]
    held = sum(top <= 0.10 and run["cost"] <= 0.02 for top, run in zip(strongest, full))
    return (line + f"; the strongest of every attack per run {_spread(_stat(strongest))}; both bounds hold in "
            f"{held} of these {len(full)} runs.")


def _private_over_seeds(results: dict) -> str:
    """The end of the private target's line: each run's strongest attack (seed 0: the private phase; seed k:
    seed=<k>:private), where more than one run measured them."""
    phases = results["phases"]
    runs = [(0, phases["private"]["rows"], results["chance"]["token_accuracy"])] if "private" in phases else []
    runs += [(p["seed"], p["rows"], p["chance"]["token_accuracy"]) for p in phases.values() if p.get("private")]
    if len(runs) < 2:
        return ""
    strongest = [max(r["token_accuracy"] for r in rows) for _, rows, _ in runs]
    held = sum(value <= 0.05 for value in strongest)
    below = sum(value <= chance for value, (_, _, chance) in zip(strongest, runs))
    return (f" Over {len(runs)} runs (train.seed {', '.join(str(seed) for seed, _, _ in runs)}) the strongest attack "
            f"of each recovers {_spread(_stat(strongest))}; <= 5% in {held} of the {len(runs)}, at or below the "
            f"run's own chance in {below}.")


def _targets(results: dict) -> list[str]:
    """Each target of issue 15, the number measured against it and its setting."""
    phases, chance = results["phases"], results["chance"]["token_accuracy"]
    lines = []
    private = [r for r in phases.get("private", {}).get("rows", [])]
    if private:
        worst = max(private, key=lambda r: r["token_accuracy"])
        met = "met" if worst["token_accuracy"] <= 0.05 else "NOT met"
        lines.append(f"- Private initialisation, every attack <= 5% of tokens: {met}. The strongest, "
                     f"{worst['attack']}, recovers {worst['token_accuracy']:.1%} (undefended)."
                     + ("" if met == "met" else " "
                        f"What stands in the way: guessing the most frequent token alone scores {chance:.1%} on this "
                        "text, so an attack that learns nothing from the wire but falls back on frequent tokens "
                        "clears 5%; " + ("every attack here stays at or below that chance level."
                                         if worst["token_accuracy"] <= chance else
                                         f"the strongest is {(worst['token_accuracy'] - chance) * 100:.1f} points "
                                         "above it."))
                     + _private_over_seeds(results))
    sweep = {s["noise"]: s for s in _sweep(results)}
    if 0.0 in sweep and SHARED_START_NOISE in sweep:
        base, default = sweep[0.0], sweep[SHARED_START_NOISE]
        attacks = {k: default[k] for k in SWEPT if k in default}
        key = max(attacks, key=attacks.get)
        cost = default["eval_loss"] / base["eval_loss"] - 1
        met = "met" if attacks[key] <= 0.10 and cost <= 0.02 else "NOT met"
        lines.append(f"- Shared initialisation, every attack <= 10% at a default defence that costs <= 2% held-out "
                     f"loss: {met}. At the default (noise {SHARED_START_NOISE:g} on hidden states and output "
                     f"gradients, clipped at each exchange's median, rows shuffled), the strongest attack, "
                     f"{SWEPT[key]}, recovers {attacks[key]:.1%}; the victim's held-out loss is "
                     f"{default['eval_loss']:.3f} against {base['eval_loss']:.3f} undefended ({cost:+.1%}). The "
                     "default was chosen from this sweep (one run per point)"
                     + _cost_over_seeds(results))
    routing = [r for name in ("shared", "private") for r in phases.get(name, {}).get("rows", [])
               if r["key"] == "r_row"]
    spread = {point["noise"]: point for point in results.get("routing_spread", [])}
    if 0.0 in spread:
        undefended, default = spread[0.0], spread.get(SHARED_START_NOISE)
        margin = undefended["chance"]["mean"] + 0.05 - undefended["r_row"]["mean"]
        above = sum(run["r_row"] > run["chance"] + 0.05 for run in undefended["runs"])
        split = 0 < above < len(undefended["runs"])  # runs on both sides of the bound
        lines.append(f"- Routing pattern with the shuffle, no better than chance + 5 points: "
                     f"{'met' if margin >= 0 else 'NOT met'} undefended on the mean of {len(undefended['runs'])} runs "
                     f"(shared init, train.seed {', '.join(map(str, undefended['seeds']))}), by "
                     f"{abs(margin) * 100:.1f} points: "
                     f"mean (range) {_spread(undefended['r_row'])} against chance {_spread(undefended['chance'])}; "
                     f"{above} of the {len(undefended['runs'])} runs are above their own chance + 5 points"
                     + (", so the verdict is inside the run-to-run spread" if split else "")
                     + ("." if default is None else
                        f"; at the default defence with init_from (noise {SHARED_START_NOISE:g}), "
                        f"{_spread(default['r_row'])} over {len(default['runs'])} runs against chance "
                        f"{_spread(default['chance'])}."))
    elif routing:
        worst = max(routing, key=lambda r: r["token_accuracy"])
        met = "met" if worst["token_accuracy"] <= chance + 0.05 else "NOT met"
        at_default = sweep.get(SHARED_START_NOISE, {}).get("r_row")
        lines.append(f"- Routing pattern with the shuffle, no better than chance + 5 points: {met} undefended: "
                     f"{worst['token_accuracy']:.1%} ({worst['setting']}) against chance {chance:.1%}"
                     + ("." if at_default is None else
                        f"; {at_default:.1%} at the default defence with init_from (noise {SHARED_START_NOISE:g}: "
                        "it does not touch the masks, so the difference is the routing of a victim trained through "
                        "noise, or run-to-run variation; one run each, not separated here)."))
    return lines


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["routing_spread"] = routing_spread(results)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    p, m, phases = results["preset"], results["config"]["model"], results["phases"]
    lines = ["# Privacy evaluation (measured)", "",
             "Raw numbers: `results.json`; threat model: `docs/privacy.md`. Each phase is one joint training run and "
             "its attacks, run by:", "", "| phase | command | device | commit | date | seconds |",
             "|---|---|---|---|---|---|"]
    for name, phase in phases.items():
        lines.append(f"| {name} | `{phase['command']}` | {phase['device']} | {phase['commit']} | {phase['date']} | "
                     f"{phase['seconds']:.0f} |")
    if results["missing"]:
        lines += ["", f"Not run yet: {', '.join(results['missing'])}."]
    lines += ["", f"Model: {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_experts']} experts top-"
              f"{m['top_k']}, vocab {m['vocab_size']}; batch {p['batch_size']} x {p['seq_len']} tokens. Private "
              f"initialisation: 2 parties, each from its own seed, trained together for {p['steps']} steps. Shared "
              f"initialisation: a public model (trained {p['steps']} steps by one party on the attacker's own text), "
              f"fine-tuned together for {p['finetune_steps']} steps. The rows shuffled (the default). Attacked: "
              f"{p['eval_sequences']} held-out sequences of the victim ({p['eval_sequences'] * p['seq_len']} tokens; "
              f"d and e: the first {p['refine_sequences']}); the attacker's own text: {p['aux_sequences']} "
              "sequences.", "", "## What a curious host recovers, undefended", "",
              "| attack | setting | target | tokens seen | token accuracy | BLEU-4 | 1-/2-/3-/4-gram precision | "
              "token set recall |", "|---|---|---|---|---|---|---|---|"]
    for r in _rows(results):
        seen = f"{r['seen']:.0%}" if "seen" in r else "-"
        grams = " / ".join(f"{x:.2f}" for x in r["ngram_precisions"])
        lines.append(f"| {r['attack']} | {r['setting']} | {r['target']} | {seen} | {r['token_accuracy']:.3f} | "
                     f"{r['bleu4']:.3f} | {grams} | {r['token_set_recall']:.2f} |")
    lines += ["", "Tokens seen: positions of which the attacker received at least one row. Token set recall: the "
              "fraction of a sequence's distinct tokens found anywhere in the recovery (order ignored). Known layers: "
              "under shared initialisation the victim's starting backbone and the attacker's own, else the "
              "attacker's own; c, d and e report whichever known layers score best (the worst case for the victim). "
              "d and e are given each row's position (the optimisation runs whole sequences through the known "
              "layers), which the shuffle hides from a real host: an upper bound. r in token order is given the "
              "true alignment of its rows to positions (an upper bound on what the order tells)."]
    fedsgd = next((r for r in _rows(results) if r["key"] == "fedsgd"), None)
    if fedsgd:
        lines += ["", f"FedSGD: the embedding gradient gave the exact token set of {fedsgd['token_set_exact']:.0%} of "
                  f"the {fedsgd['sequences']} attacked sequences (its token set recall); DLG ({p['dlg_steps']} steps) "
                  "orders them (its accuracy and n-grams)."]
    lines += ["", "## The routing-pattern attack", "",
              "The published anchor (arXiv 2602.04105): a transformer decoder over the router choices of all layers "
              "and all experts recovers 91.2% of tokens top-1. A host here sees one bit per expert of its own for "
              "each row it receives (`expert_mask`). In token order it can line up a token's rows across layers; "
              "shuffled, each row stands alone: its best guess is the token most often behind that mask at that "
              "layer in its own text. Per layer, shuffled (rows received, accuracy on them, and how often the most "
              "frequent token is right on the same rows):", "",
              "| setting | layer | rows | accuracy | most frequent token on those rows |", "|---|---|---|---|---|"]
    for name in ("shared", "private"):
        for layer in phases.get(name, {}).get("details", {}).get("r_row_per_layer", []):
            lines.append(f"| {name} init | {layer['layer']} | {layer['rows']} | {layer['accuracy']:.3f} | "
                         f"{layer['chance']:.3f} |")
    if results["routing_spread"]:
        lines += ["", "Run to run (shared initialisation; seed = train.seed, which deals the text blocks to the "
                  "parties (the victim's held-out text, the attacker's own) and seeds the public model, the "
                  "fine-tuning and the token-order inverter; the rows' order and noise come from each run's fresh "
                  "secret). Token accuracy per run, then mean (min to max):", "",
                  "| noise | seed | r shuffled | r token order | chance (most frequent token) |",
                  "|---|---|---|---|---|"]
        for point in results["routing_spread"]:
            for run in point["runs"]:
                linked = f"{run['r_linked']:.3f}" if "r_linked" in run else "-"
                lines.append(f"| {point['noise']:g} | {run['seed']} | {run['r_row']:.3f} | {linked} | "
                             f"{run['chance']:.3f} |")
            linked = _spread(point["r_linked"]) if "r_linked" in point else "-"
            lines.append(f"| {point['noise']:g} | {len(point['runs'])} runs | {_spread(point['r_row'])} | {linked} | "
                         f"{_spread(point['chance'])} |")
    sweep = _sweep(results)
    if sweep:
        base = sweep[0] if sweep[0]["noise"] == 0 else None
        lines += ["", "## Defence sweep (shared initialisation, the worst case)", "",
                  "Noise multiplier x on dispatched hidden states and returned output gradients: each row clipped to "
                  "the median norm of its exchange's rows, then Gaussian noise of std x times that per coordinate, "
                  "drawn once per (token, host); rows shuffled. Victim loss = mean training loss of its last 10 "
                  "steps; eval = held-out loss through the defended wire. Token accuracy of each attack:", "",
                  "| noise | victim train loss | victim eval loss | eval vs undefended | "
                  + " | ".join(SWEPT.values()) + " |", "|---" * (4 + len(SWEPT)) + "|"]
        for s in sweep:
            cost = f"{s['eval_loss'] / base['eval_loss'] - 1:+.1%}" if base else "-"
            mark = " (default with init_from)" if s["noise"] == SHARED_START_NOISE else ""
            lines.append(f"| {s['noise']:g}{mark} | {s['final_loss']:.3f} | {s['eval_loss']:.3f} | {cost} | "
                         + " | ".join(f"{s[k]:.3f}" if k in s else "-" for k in SWEPT) + " |")
        lines += ["", "![attack success against the defence](privacy.png)"]
    lines += _parts(results, sweep)
    lines += ["", "## Targets (issue 15)", "", *_targets(results), "", "## What no attack here tries", "",
              *(f"- {item}" for item in NOT_TRIED), ""]
    (out / "report.md").write_text("\n".join(lines))
    if sweep:
        plot(results, out / "privacy.png")


PART_NAMES = {f"hidden={SHARED_START_NOISE}": "noise on the hidden states only",
              f"grad={SHARED_START_NOISE}": "noise on the output gradients only",
              "clip": "clipping only (at the shared phase's median row norms), no noise"}


def _parts(results: dict, sweep: list[dict]) -> list[str]:
    """The default defence next to its parts alone (the PARTS phases): what of its held-out loss each costs."""
    parts = [p["part"] for p in results["phases"].values() if p.get("part")]
    if not parts:
        return []
    points = {s["noise"]: s for s in sweep}
    base, default = points.get(0.0), points.get(SHARED_START_NOISE)
    lines = ["", "## The default defence, part by part", "",
             f"The default (noise {SHARED_START_NOISE:g} on hidden states and output gradients, each clipped at its "
             "exchange's median norm) against each of its parts alone, one run each, shared initialisation:", "",
             "| defence | victim train loss | victim eval loss | eval vs undefended | " + " | ".join(SWEPT.values())
             + " |", "|---" * (4 + len(SWEPT)) + "|"]
    named = [("the default, whole", default)] if default else []
    named += [(PART_NAMES[p["part"]], p) for p in sorted(parts, key=lambda p: list(PART_NAMES).index(p["part"]))]
    for label, point in named:
        cost = f"{point['eval_loss'] / base['eval_loss'] - 1:+.1%}" if base else "-"
        lines.append(f"| {label} | {point['final_loss']:.3f} | {point['eval_loss']:.3f} | {cost} | "
                     + " | ".join(f"{point[k]:.3f}" if k in point else "-" for k in SWEPT) + " |")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = _sweep(results)
    noise = [s["noise"] for s in sweep]
    x = list(range(len(noise)))
    fedsgd = next((r for r in _rows(results) if r["key"] == "fedsgd"), None)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in SWEPT.items():
        left.plot(x, [s.get(key, float("nan")) for s in sweep], "o-", label=label)
    if fedsgd:
        left.axhline(fedsgd["token_accuracy"], color="red", ls="--", label="FedSGD + DLG, no defence")
    left.axhline(results["chance"]["token_accuracy"], color="gray", ls=":", label="chance (most frequent token)")
    left.set(xticks=x, xticklabels=[f"{n:g}" for n in noise], xlabel="noise multiplier", ylabel="token accuracy",
             ylim=(0, 1.05), title="attack success vs defence (shared init)")
    left.legend(fontsize=7)
    right.plot(x, [s["final_loss"] for s in sweep], "o-", label="victim train loss")
    right.plot(x, [s["eval_loss"] for s in sweep], "s-", label="victim held-out loss")
    right.set(xticks=x, xticklabels=[f"{n:g}" for n in noise], xlabel="noise multiplier", ylabel="loss",
              title=f"cost: loss after {results['preset']['steps']} steps")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
