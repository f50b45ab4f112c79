"""Where the tokens of a convergence-study run go: a diagnosis of router divergence between private
backbones (issue 14). ``python -m bench.convergence_routing --scale cpu [--runs pcmoe-4p,...]`` reads the run
folders bench/convergence.py left (--out) and writes bench/results/convergence/routing_<scale>.json.

For every party p of a run, its model at the latest checkpoint every party has (``step``: its own backbone and
router with every party's experts, ``inference.load_model`` on the run folder, in this one process: a measurement,
nothing crosses) routes each domain's evaluation windows (the study's held-out set). Averaged over the MoE layers unless said:

- ``own_local``: of party p's routing slots (top-k per token) on its own domain, the share that picks an expert p
  owns (expert e mod n == p). 1/n when the router is indifferent to ownership; near 1, the party has fallen back on
  its own experts and collaborates little.
- ``use``: on its own domain, the share of party p's routing slots that reach each expert (the experts' load);
  ``use_overlap[p][q]`` = sum over experts of min(use_p, use_q), 1 when two parties load the experts alike, 0 when
  they use disjoint experts (each expert then learns from one party's domain only: local training in disguise).
- ``agreement[d]``: on domain d, the mean over pairs of parties of |top-k of p ∩ top-k of q| / k for the same token:
  whether two parties' routers send the same text to the same experts; k / num_experts is chance.
  ``agreement_by_layer``: the same per MoE layer, over every domain.
"""

import argparse
import itertools
import json
from pathlib import Path

import torch

from bench.common import environment
from bench.convergence import DOMAINS, KNOWN, ROOT, SCALES, domain_tokens, run_config


@torch.no_grad()
def expert_ids(model, tokens: torch.Tensor, seq_len: int, windows: int, batch: int = 8) -> torch.Tensor:
    """[layers, windows * seq_len, k]: the experts each evaluation-window token is routed to, per MoE layer."""
    out = []
    for start in range(0, windows, batch):
        rows = [tokens[(start + i) * seq_len:(start + i) * seq_len + seq_len] for i in range(min(batch, windows - start))]
        _, routings = model.backbone(torch.stack(rows).to(model.device), model.experts)
        out.append(torch.stack([r.expert_ids.long() for r in routings]))
    return torch.cat(out, dim=1)


def routing_of_run(study_out: Path, scale_name: str, name: str, corpora: Path) -> dict:
    from pcmoe_engine.inference import load_model

    scale, run = SCALES[scale_name], KNOWN[name]
    cfg = run_config(scale, run, study_out)
    experts, n = cfg.model.num_experts, run.parties
    held_out = {d: domain_tokens(cfg, corpora, d, study_out / "tokens", "eval") for d in DOMAINS}
    ids = {}  # (party, domain) -> [layers, tokens, k]
    for party in range(n):
        model = load_model(study_out / name, party=party, device="cpu", precision="fp32")
        step = model.described["step"]
        for d in DOMAINS:
            ids[party, d] = expert_ids(model, held_out[d], scale.seq_len, scale.eval_windows)
    use = []
    own_local = []
    for party, d in enumerate(run.domains):
        mine = ids[party, d]
        counts = torch.bincount(mine.flatten(), minlength=experts).double()
        use.append((counts / counts.sum()).tolist())
        own_local.append(((mine % n) == party).double().mean().item())
    overlap = [[sum(min(a, b) for a, b in zip(use[p], use[q])) for q in range(n)] for p in range(n)]
    pairs = {d: torch.stack([(ids[p, d].unsqueeze(-1) == ids[q, d].unsqueeze(-2)).any(-1).double().mean((1, 2))
                             for p, q in itertools.combinations(range(n), 2)]) for d in DOMAINS}  # [pairs, layers]
    agreement = {d: pair.mean().item() for d, pair in pairs.items()}
    by_layer = torch.stack(list(pairs.values())).mean((0, 1)).tolist()
    return {"step": step, "own_local": own_local, "own_local_if_indifferent": 1 / n, "use": use, "use_overlap": overlap,
            "agreement": agreement, "agreement_by_layer": by_layer, "agreement_by_chance": cfg.model.top_k / experts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.convergence_routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=SCALES, default="gpu")
    parser.add_argument("--corpora", type=Path, default=ROOT / ".corpora")
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: runs/convergence-<scale>)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "convergence")
    parser.add_argument("--runs", default="pcmoe-4p,pcmoe-2p")
    args = parser.parse_args(argv)
    out = (args.out or ROOT / "runs" / f"convergence-{args.scale}").resolve()
    path = args.results / f"routing_{args.scale}.json"
    found = json.loads(path.read_text())["runs"] if path.is_file() else {}
    for name in args.runs.split(","):
        if KNOWN[name].kind != "pcmoe" or not (out / name).is_dir():
            print(f"convergence_routing: {name}: not a PC-MoE run, or no run folder under {out}: skipped")
            continue
        found[name] = routing = {**routing_of_run(out, args.scale, name, args.corpora), "environment": environment()}
        print(f"{name}: own-domain slots on own experts {[round(x, 3) for x in routing['own_local']]} "
              f"(indifferent: {routing['own_local_if_indifferent']:.3f}); agreement between parties "
              f"{ {d: round(a, 3) for d, a in routing['agreement'].items()} } (chance {routing['agreement_by_chance']:.3f})")
    args.results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"scale_name": args.scale, "definition": "bench/convergence_routing.py's docstring",
                                "runs": found}) + "\n")  # each run with the environment that measured it
    print(f"convergence_routing: wrote {path}")


if __name__ == "__main__":
    main()
