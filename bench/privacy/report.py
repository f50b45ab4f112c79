"""The evaluation's report: results.json (every number), report.md (the tables) and privacy.png (attack success
and the victim's loss against the defence's noise)."""

import json
from pathlib import Path

__all__ = ["write_report", "plot"]


def write_report(results: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    p, m = results["preset"], results["config"]["model"]
    lines = [
        "# Privacy evaluation (measured)", "",
        f"`{command}` on {results['device']}, commit {results['commit']}, {results['date']}, "
        f"{results['seconds']:.0f} s. Raw numbers: `results.json`; threat model: `docs/privacy.md`.", "",
        f"Model: {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_experts']} experts top-{m['top_k']}, "
        f"vocab {m['vocab_size']}; 2 parties trained together for {p['steps']} steps (batch {p['batch_size']} x "
        f"{p['seq_len']} tokens). Attacked: {p['eval_sequences']} held-out sequences of the victim "
        f"({p['eval_sequences'] * p['seq_len']} tokens); the attacker's own text: {p['aux_sequences']} sequences.",
        "", "| attack | setting | target | tokens seen | token accuracy | BLEU-4 | 1-/2-/3-/4-gram precision | "
        "token set recall |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        seen = f"{r['seen']:.0%}" if "seen" in r else "-"
        grams = " / ".join(f"{x:.2f}" for x in r["ngram_precisions"])
        lines.append(f"| {r['attack']} | {r['setting']} | {r['target']} | {seen} | {r['token_accuracy']:.3f} | "
                     f"{r['bleu4']:.3f} | {grams} | {r['token_set_recall']:.2f} |")
    fedsgd = results["rows"][-1]
    lines += ["", f"Tokens seen: positions of which the attacker received at least one row. Token set recall: the "
              f"fraction of a sequence's distinct tokens found anywhere in the recovery (order ignored). FedSGD: "
              f"the embedding gradient gave the exact token set of {fedsgd['token_set_exact']:.0%} of the "
              f"{p['dlg_sequences']} attacked sequences (its token set recall); DLG ({p['dlg_steps']} steps) "
              "orders them (its accuracy and n-grams). Known layers: under shared initialisation the victim's "
              "starting backbone and the attacker's own, else the attacker's own; attack c reports whichever "
              "known head scores best (the worst case for the victim)."]
    c = results["clip"]
    lines += ["", f"Defence sweep (shared initialisation): dispatched hidden states clipped to L2 norm "
              f"{c['hidden']:.3g} and returned output gradients to {c['grad']:.3g} (the medians of the undefended "
              "rows), then Gaussian noise of std noise x clip per coordinate; victim loss = mean training loss of "
              "its last 10 steps, eval = held-out loss through the defended wire.", "",
              "| noise | victim train loss | victim eval loss | attack a accuracy | a BLEU-4 | attack c accuracy "
              "| c BLEU-4 |", "|---|---|---|---|---|---|---|"]
    for s in results["sweep"]:
        lines.append(f"| {s['noise']} | {s['final_loss']:.3f} | {s['eval_loss']:.3f} | {s['a']:.3f} | "
                     f"{s['a_bleu4']:.3f} | {s['c']:.3f} | {s['c_bleu4']:.3f} |")
    lines += ["", "![attack success against training loss](privacy.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    plot(results, out / "privacy.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["sweep"]
    noise = [s["noise"] for s in sweep]
    x = list(range(len(noise)))
    fedsgd = next(r for r in results["rows"] if r["attack"].startswith("FedSGD"))
    chance = results["rows"][0]["token_accuracy"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(x, [s["a"] for s in sweep], "o-", label="a. known layers (shared init)")
    left.plot(x, [s["c"] for s in sweep], "s-", label="c. gradient inversion (shared init)")
    left.axhline(fedsgd["token_accuracy"], color="red", ls="--", label="FedSGD + DLG, no defence")
    left.axhline(chance, color="gray", ls=":", label="chance (most frequent token)")
    left.set(xticks=x, xticklabels=[str(n) for n in noise], xlabel="noise multiplier", ylabel="token accuracy",
             ylim=(0, 1.05), title="attack success vs defence")
    left.legend(fontsize=8)
    right.plot(x, [s["final_loss"] for s in sweep], "o-", label="victim train loss")
    right.plot(x, [s["eval_loss"] for s in sweep], "s-", label="victim held-out loss")
    right.set(xticks=x, xticklabels=[str(n) for n in noise], xlabel="noise multiplier", ylabel="loss",
              title=f"cost: loss after {results['preset']['steps']} steps")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
