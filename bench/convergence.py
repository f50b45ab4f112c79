"""The convergence study (issue 14): PC-MoE against centralized and local-only training on four real English domains,
one per party (bench/corpora.py), the same model everywhere.

    python -m bench.convergence [--scale cpu|gpu] [--corpora DIR] [--out DIR] [--results DIR] [--budget-s S]
                                [--runs NAME,...] [--readme README.md]

Runs (``RUNS``; ``--runs`` picks some, and also takes the diagnostics ``pcmoe-4p-shared-init``,
``pcmoe-2p-shared-init``, ``central-party-batch``, ``central-2-party-batch`` and the ``-ft`` family below):

- ``central``: one process, the four domains' training splits pooled, batch 4 x B (the tokens per step of the
  four PC-MoE parties together); ``central-party-batch``: the same at batch B;
- ``central-2``: the same over the first two domains, batch 2 x B: the centralized run of ``pcmoe-2p``'s data;
  ``central-2-party-batch``: the same at batch B (one party's), so its backbone trains on as many tokens as a
  PC-MoE party's, half of them from the other domain;
- ``pcmoe-4p``, ``pcmoe-2p``: 4 (2) parties, party i on domain i, batch B each, each with its own backbone drawn
  from its own seed (the method); ``pcmoe-4p-shared-init`` (``-2p-``): every party starts from party 0's backbone;
- ``local-<domain>``: one party alone on its domain with the whole model, batch B;
- fine-tuning one public checkpoint together (the paper's setting: ``model.init_from``): ``central-2-ft``,
  ``pcmoe-2p-ft``, ``local-kernel-ft`` and ``local-manuals-ft`` are ``central-2``, ``pcmoe-2p`` and ``local-<domain>``
  with every party's backbone and experts read from ``public-checkpoint/`` under ``--out``. That is ``public-pretrain``
  (a run of its own, made first and once when a ``-ft`` run needs it): the scale's model at one party on Tiny
  Shakespeare (the engine's built-in corpus: public, none of the four domains) for half the study's steps at its
  batch, lr and warmup, then written by the engine's export (export.write) as a transformers folder. With
  ``model.init_from`` the engine noises the rows that cross by default (privacy.SHARED_START_NOISE), so
  ``pcmoe-2p-ft`` is the method as shipped, and ``pcmoe-2p-ft-no-noise`` the same with privacy.hidden_noise and
  grad_noise 0: the noise's cost apart from the method's; ``pcmoe-2p-ft-noise-0.1`` and ``-0.3`` the same at noises
  in between (what each point of docs/privacy.md's trade-off costs the collaboration). The checkpoint folder is
  remade where --out lacks it: bitwise the same with the same CPU threads (``calls.json`` records them), else not
  (remade with 2 threads instead of 1, its loss left the first's at step 11, in the 7th digit). Each -ft run records
  the sha256 of the checkpoint it started from (``public_checkpoint``) and is compared only with runs from the same.

Every run has the same steps, learning-rate schedule and seed: at a step, each party (and each domain of a
centralized run) has trained on the same number of tokens, B x seq_len per step.

Held-out loss, precisely. Each domain's text is cut into blocks and its last ``data.eval_fraction`` (5%) held out
exactly as the engine holds out a party's file (data.party_texts); the rest is the domain's training split. The
held-out split is encoded with the run's tokenizer; its first W windows of seq_len + 1 tokens (starting every
seq_len tokens, each a sequence of its own: ``Party.evaluate``'s windows) are the domain's evaluation set, the same
at every evaluation of every run. A party's held-out loss on a domain is the mean next-token cross-entropy (natural
log) of its model (its backbone with every party's experts, through the protocol as in training) over those W x
seq_len predictions; the union loss is the mean over the four domains (equal token counts: the mean over the union
of the four sets). Every party of every run is evaluated on every domain, at step 0 and every ``eval_every`` steps.
The evaluation reads every domain's held-out text in every party's process: a measurement, not the protocol.

Resumable. Under ``--out`` (git-ignored; default runs/convergence-<scale>) each run is a run folder as `pcmoe train`
writes one: party<i>/metrics.jsonl (every step's record, and every evaluation: ``eval_domains``, ``eval_union``),
party<i>/checkpoints/ and, when it is done, party<i>/summary.json; ``calls.json`` the wall time of each call that
advanced it. Rerunning continues every unfinished run from its checkpoint. ``--budget-s``: every run stops at a step
boundary, all its parties at the same step, and checkpoints, in time for the command to end within the budget; the
next call resumes. The results (``--results``, committed) are written at the end of every call:
convergence_<scale>.json (the configuration, every curve, each run's wall time and peak memory) and its figure; a
run marked complete there and absent from --out (a fresh machine) is kept as it is, not run again, whether or not
this call's ``--runs`` names it: a study can be run in phases, each on a machine of its own.

GPUs: runs are started greedily, in the order ``--runs`` names them, on the free GPUs (a run takes one per party;
with no GPU, one run at a time on the CPU); bench/README.md gives the device commands, phase by phase, and their
expected times.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.common import environment, source_commit

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("kernel", "manuals", "dictionary", "scripture")


@dataclass(frozen=True)
class Scale:
    """The model and schedule every run of a study shares."""
    label: str
    model: tuple[str, ...]  # --set model.* overrides
    seq_len: int
    batch: int  # sequences per party and step (B)
    steps: int
    lr: float
    warmup: int
    eval_every: int
    eval_windows: int  # W: evaluation windows per domain (a multiple of every run's batch size)
    checkpoint_every: int  # 0: at a budget stop and at the end only


SCALES = {
    # The target setting: the `small` preset (245 M parameters) on GPUs, bf16 autocast.
    "gpu": Scale("small preset on GPUs", ("preset=small",), seq_len=512, batch=16, steps=800, lr=1e-3, warmup=80,
                 eval_every=100, eval_windows=128, checkpoint_every=200),
    # A first look on a CPU: the `tiny` preset (4 layers, 8 experts, its 2,048-token BPE), fp32.
    "cpu": Scale("CPU-scale: tiny preset, NOT the issue's target setting", ("preset=tiny",), seq_len=128, batch=8,
                 steps=600, lr=3e-3, warmup=30, eval_every=100, eval_windows=64, checkpoint_every=0),
    # The pipeline in seconds (tests/test_convergence.py): its numbers mean nothing.
    "smoke": Scale("smoke test of the pipeline, numbers meaningless", ("vocab_size=300", "hidden_size=32",
                   "num_layers=2", "expert_intermediate_size=32"), seq_len=16, batch=2, steps=4, lr=1e-2, warmup=1,
                   eval_every=2, eval_windows=4, checkpoint_every=2),
}


@dataclass(frozen=True)
class Run:
    name: str
    kind: str  # central, pcmoe or local
    domains: tuple[str, ...]
    shared_init: bool = False
    party_batch: bool = False  # a centralized run at one party's batch (B), not every pooled domain's share of it
    public_init: bool = False  # every party starts from the public checkpoint (the -ft family)
    noise: float | None = None  # privacy.hidden_noise and grad_noise; None: the engine's (with model.init_from, 0.5)

    @property
    def parties(self) -> int:
        return len(self.domains) if self.kind == "pcmoe" else 1

    def steps(self, scale: Scale) -> int:
        """The public checkpoint is pretrained for half the study's steps: at the CPU scale, about one pass over
        Tiny Shakespeare's training split."""
        return scale.steps // 2 if self.kind == "public" else scale.steps

    def batch_size(self, scale: Scale) -> int:
        """A centralized run's batch holds every pooled domain's share: the parties' tokens per step together."""
        return scale.batch * (len(self.domains) if self.kind == "central" and not self.party_batch else 1)


RUNS = (Run("pcmoe-4p", "pcmoe", DOMAINS), Run("central", "central", DOMAINS),
        Run("central-2", "central", DOMAINS[:2]), Run("pcmoe-2p", "pcmoe", DOMAINS[:2]),
        *(Run(f"local-{d}", "local", (d,)) for d in DOMAINS))
PUBLIC = Run("public-pretrain", "public", ())  # the public checkpoint's run: Tiny Shakespeare, at one party
PUBLIC_CHECKPOINT = "public-checkpoint"  # its export, under --out
STAMP = "public_checkpoint.sha256"  # in a -ft run's folder (and public-pretrain's): the checkpoint it started from
DIAGNOSTICS = (Run("pcmoe-4p-shared-init", "pcmoe", DOMAINS, shared_init=True),
               Run("pcmoe-2p-shared-init", "pcmoe", DOMAINS[:2], shared_init=True),
               Run("central-party-batch", "central", DOMAINS, party_batch=True),
               Run("central-2-party-batch", "central", DOMAINS[:2], party_batch=True),
               PUBLIC, Run("central-2-ft", "central", DOMAINS[:2], public_init=True),
               Run("pcmoe-2p-ft", "pcmoe", DOMAINS[:2], public_init=True),
               Run("pcmoe-2p-ft-no-noise", "pcmoe", DOMAINS[:2], public_init=True, noise=0.0),
               *(Run(f"pcmoe-2p-ft-noise-{x}", "pcmoe", DOMAINS[:2], public_init=True, noise=x) for x in (0.1, 0.3)),
               *(Run(f"local-{d}-ft", "local", (d,), public_init=True) for d in DOMAINS[:2]))
KNOWN = {run.name: run for run in (*RUNS, *DIAGNOSTICS)}


def run_config(scale: Scale, run: Run, out: Path):
    from pcmoe_engine.config import load_config

    batch = run.batch_size(scale)
    # The public model is named a transformers family to be exported as one: the tiny preset is exactly Mixtral's
    # architecture (the name changes no weight or computation); a -ft run reads its model from the checkpoint.
    public = ["model.family=mixtral"] if run.kind == "public" else []
    public += [f"model.init_from={out / PUBLIC_CHECKPOINT}"] if run.public_init else []
    noise = [] if run.noise is None else [f"privacy.hidden_noise={run.noise}", f"privacy.grad_noise={run.noise}"]
    return load_config(None, [
        *(f"model.{o}" for o in scale.model), *public, *noise, f"parties={run.parties}",
        f"data.seq_len={scale.seq_len}",
        f"train.batch_size={batch}", f"train.steps={run.steps(scale)}", f"train.lr={scale.lr}",
        f"train.warmup_steps={scale.warmup}", f"train.eval_batches={scale.eval_windows // batch}",
        "train.keep_checkpoints=1", f"train.out_dir={out}", f"train.name={run.name}", "train.resume=true",
        # Rows in token order: the secret order (privacy.shuffle) changes no result but the order of the experts'
        # gradient sums, and a run that starts in a later call would draw another, so it would not repeat bitwise.
        "privacy.shuffle=false"])


# --- data --------------------------------------------------------------------------------------------------------

def domain_tokens(cfg, corpora: Path, domain: str, cache: Path, split: str) -> torch.Tensor:
    """A domain's training (``split="train"``) or held-out ("eval") tokens (the module docstring), encoded once per
    tokenizer and kept in ``cache`` (int32), each split in a file of its own: a party reads only what it uses."""
    from pcmoe_engine.config import Config, DataConfig
    from pcmoe_engine.data import encode, party_texts, tokenizer_for

    tokenizer = tokenizer_for(cfg)
    paths = {s: cache / f"{domain}-{tokenizer.get_vocab_size()}.{s}.pt" for s in ("train", "eval")}
    if not all(path.is_file() for path in paths.values()):
        source = corpora / f"{domain}.txt.gz"
        if not source.is_file():
            sys.exit(f"convergence: error: {source} does not exist: make the corpora with `python bench/corpora.py "
                     f"--out {corpora}` (bench/README.md), or point --corpora at them")
        texts = party_texts(Config(parties=1, data=DataConfig(party_paths=[str(source)])), 0)
        cache.mkdir(parents=True, exist_ok=True)
        for (name, path), text in zip(paths.items(), texts):
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(encode(tokenizer, text).to(torch.int32), tmp)
            os.replace(tmp, path)
    return torch.load(paths[split])


# --- one party of one run (a process: python -m bench.convergence --worker RUN, launched per party) ----------------

def worker(args) -> None:
    from pcmoe_engine.faults import say
    from pcmoe_engine.metrics import MetricsLog, write_summary
    from pcmoe_engine.party import Party, initial_backbone
    from pcmoe_engine.train import open_transport

    scale, run, rank = SCALES[args.scale], KNOWN[args.worker], int(os.environ.get("RANK", 0))
    cfg = run_config(scale, run, args.out)
    mine = run.domains if run.kind == "central" else run.domains[rank:rank + 1]
    windows = scale.eval_windows * scale.seq_len + 1
    held_out = {d: domain_tokens(cfg, args.corpora, d, args.out / "tokens", "eval")[:windows].long() for d in DOMAINS}
    tokens = None  # the public run: the engine's own split of data.corpus (Tiny Shakespeare)
    if mine:
        train = torch.cat([domain_tokens(cfg, args.corpora, d, args.out / "tokens", "train") for d in mine]).long()
        tokens = (train, held_out[mine[0]])
    transport = open_transport(cfg, rank, 600) if run.parties > 1 else None
    party = Party(cfg, rank, transport, tokens=tokens)
    if run.shared_init:
        party.load_backbone(initial_backbone(cfg, 0).state_dict())
    party.resume()
    log = MetricsLog(party, quiet=True)

    def evaluate() -> None:
        losses = {d: party.evaluate(held_out[d]) for d in DOMAINS}
        union = sum(losses.values()) / len(losses)
        own = losses[mine[0]] if mine else party.evaluate()
        log.write({"step": party.step_count, "eval_loss": own, "eval_domains": losses,
                   "eval_union": union})
        say(f"{run.name} party {rank} | step {party.step_count} | held out: "
              + ", ".join(f"{d} {v:.3f}" for d, v in losses.items()) + f" | union {union:.3f}")

    if party.step_count == 0:
        evaluate()
    last = 0.0
    while party.step_count < cfg.train.steps:
        started = time.time()
        if _stop(started + 2 * last > args.deadline, party.device, run.parties):
            party.save()
            say(f"{run.name} party {rank} | stopped at step {party.step_count} (budget): resumes there")
            break
        log.write(party.step())
        step = party.step_count
        if step % scale.eval_every == 0 or step == cfg.train.steps:
            evaluate()
        if (scale.checkpoint_every and step % scale.checkpoint_every == 0) or step == cfg.train.steps:
            party.save()
        last = time.time() - started
    if party.step_count == cfg.train.steps:
        write_summary(party.dir / "summary.json", party.summary(None))
    log.close()
    if transport is not None:
        transport.close()


def _stop(late: bool, device: torch.device, parties: int) -> bool:
    """Whether to stop now: if any party is late, all stop at this step (one flag, max over the parties)."""
    if parties == 1:
        return late
    import torch.distributed as dist

    flag = torch.tensor([float(late)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# --- the study: runs on the GPUs, results -----------------------------------------------------------------------

def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _digest(folder: Path) -> str:
    """The public checkpoint's identity: the sha256 of its weights (a remade one may differ: the module docstring)."""
    sha = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        sha.update(path.read_bytes())
    return sha.hexdigest()[:16]


def run_state(scale: Scale, run: Run, out: Path) -> dict | None:
    """What --out holds of a run: its curves, peak memory, wall time and whether it is complete; None if nothing."""
    folder = out / run.name
    parties = [_read_jsonl(folder / f"party{p}" / "metrics.jsonl") for p in range(run.parties)]
    if not any(parties):
        return None
    calls = json.loads((folder / "calls.json").read_text()) if (folder / "calls.json").is_file() else []
    steps = [[r for r in records if "loss" in r] for records in parties]
    cfg = run_config(scale, run, out)
    noise = cfg.privacy.resolved(bool(cfg.model.init_from))
    return {
        "kind": run.kind, "parties": run.parties, "domains": list(run.domains), "shared_init": run.shared_init,
        "public_init": run.public_init, "noise": {"hidden": noise.hidden_noise, "output_grad": noise.grad_noise},
        "public_checkpoint": (folder / STAMP).read_text() if (folder / STAMP).is_file() else None,
        "batch_size": run.batch_size(scale), "tokens_per_step": run.batch_size(scale) * scale.seq_len,
        "steps_done": min(len(s) for s in steps),
        "complete": all((folder / f"party{p}" / "summary.json").is_file() for p in range(run.parties)),
        "wall_s": sum(c["seconds"] for c in calls), "calls": calls,
        "peak_memory_bytes": [max((r["peak_memory_bytes"] for r in s), default=None) for s in steps],
        "peak_memory_kind": "gpu_max_allocated" if any("cuda" in c.get("device", "") for c in calls) else "cpu_max_rss",
        "config": cfg.to_dict(),
        "train_loss": [[[r["step"], r["loss"]] for r in s] for s in steps],
        "grad_norms": [[[r["grad_norm"], r["expert_grad_norm"]] for r in s] for s in steps],  # before clipping
        "expert_load": [[r["expert_load"] for r in s[-max(1, len(s) // 10):]] for s in steps],
        "evals": [[{"step": r["step"], "domains": r["eval_domains"], "union": r["eval_union"]}
                   for r in records if "eval_domains" in r] for records in parties],
    }


def public_checkpoint(scale_name: str, args, deadline: float) -> bool:
    """Make the -ft runs' public checkpoint under --out unless it is there: run (or resume) ``public-pretrain``,
    then export its party 0 with the engine's export, written whole or not at all. Whether it is there now."""
    from pcmoe_engine.export import export_dtype, write
    from pcmoe_engine.runs import read_party

    folder = args.out / PUBLIC_CHECKPOINT
    if folder.is_dir():
        return True
    if not (args.out / PUBLIC.name / "party0" / "summary.json").is_file():
        gpus = [0] if torch.cuda.device_count() else []
        print(f"convergence: {PUBLIC.name}: pretraining the public checkpoint on Tiny Shakespeare", flush=True)
        _launch_run(scale_name, PUBLIC, args, gpus, deadline)
        if not (args.out / PUBLIC.name / "party0" / "summary.json").is_file():
            return False  # stopped by the budget (or failed, as it said): the next call resumes it
    saved = read_party(args.out / PUBLIC.name, 0)
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    write(saved, tmp, [saved.shard("cpu")], export_dtype(saved))
    os.replace(tmp, folder)
    (args.out / PUBLIC.name / STAMP).write_text(_digest(folder))
    print(f"convergence: wrote {folder} ({PUBLIC.name}, step {saved.step})", flush=True)
    return True


def _launch_run(scale_name: str, run: Run, args, gpus: list[int], deadline: float) -> None:
    from pcmoe_engine.cli import launch

    env = dict(os.environ)
    stamp = args.out / run.name / STAMP
    if run.public_init and not stamp.is_file():  # its first call: the checkpoint it starts from
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(_digest(args.out / PUBLIC_CHECKPOINT))
    if gpus:  # indexes into this process's visible GPUs, which a CUDA_VISIBLE_DEVICES of its own may restrict
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[g] if visible else str(g) for g in gpus)
    started = time.time()
    code = launch(run.parties, ["--worker", run.name, "--scale", scale_name, "--out", str(args.out), "--corpora",
                                str(args.corpora), "--deadline", str(deadline)], env=env, module="bench.convergence")
    calls_path = args.out / run.name / "calls.json"
    calls = json.loads(calls_path.read_text()) if calls_path.is_file() else []
    device = f"cuda x {len(gpus)}" if gpus else "cpu"
    calls.append({"seconds": time.time() - started, "exit": code, "device": device, "date": time.strftime("%F %T"),
                  "commit": source_commit(), "threads": torch.get_num_threads()})  # the workers' (the same env)
    calls_path.parent.mkdir(parents=True, exist_ok=True)
    calls_path.write_text(json.dumps(calls, indent=1) + "\n")
    if code:
        print(f"convergence: {run.name} exited with {code}: see its output above; rerun to continue", flush=True)


def schedule(scale_name: str, runs: list[Run], args, deadline: float) -> None:
    """Start runs greedily, in order, on the free GPUs (one per party); without GPUs one at a time on the CPU."""
    free = list(range(torch.cuda.device_count()))
    capacity = len(free)
    pending, active, lock = list(runs), [], threading.Lock()

    def start(run: Run, gpus: list[int]) -> None:
        try:
            _launch_run(scale_name, run, args, gpus, deadline)
        finally:
            with lock:
                free.extend(gpus)

    while pending or active:
        active = [t for t in active if t.is_alive()]
        with lock:
            for run in list(pending):
                if capacity and run.parties > capacity:
                    print(f"convergence: {run.name} needs {run.parties} GPUs, this machine has {capacity}: skipped")
                    pending.remove(run)
                elif (capacity and run.parties <= len(free)) or (not capacity and not active):
                    gpus = [free.pop(0) for _ in range(run.parties)] if capacity else []
                    pending.remove(run)
                    thread = threading.Thread(target=start, args=(run, gpus))
                    thread.start()
                    active.append(thread)
        if time.time() > deadline:
            pending.clear()  # what has not started waits for the next call
        time.sleep(0.5)


def results(scale_name: str, runs: list[Run], args, previous: dict) -> dict:
    scale = SCALES[scale_name]
    same_scale = previous.get("scale") == json.loads(json.dumps(asdict(scale)))  # as the file holds it: lists
    kept = previous.get("runs", {}) if same_scale else {}
    out = {}  # the runs of this call and those of earlier calls (phases: other --runs, other machines), in RUNS order
    for run in (run for name, run in KNOWN.items() if name in kept or run in runs):
        state = run_state(scale, run, args.out)
        if state is None or (not state["complete"] and kept.get(run.name, {}).get("complete")):
            state = kept.get(run.name)
        if state is not None:  # "diagnostic" from the run's name, for runs kept from earlier calls too
            out[run.name] = {**state, "diagnostic": run in DIAGNOSTICS}
    return {"study": "issue 14: PC-MoE against centralized and local-only training", "scale_name": scale_name,
            "label": scale.label, "scale": asdict(scale), "domains": list(DOMAINS),
            "eval": {"windows_per_domain": scale.eval_windows, "seq_len": scale.seq_len,
                     "predictions_per_domain": scale.eval_windows * scale.seq_len,
                     "definition": "bench/convergence.py's docstring"},
            "environment": environment(), "runs": out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=SCALES, default="gpu")
    parser.add_argument("--corpora", type=Path, default=None,
                        help="the folder of <domain>.txt.gz (default: .corpora if present, else ~/.cache/pcmoe/corpora)")
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: runs/convergence-<scale>)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "convergence")
    parser.add_argument("--budget-s", type=float, default=math.inf, help="stop every run in time to end within this")
    parser.add_argument("--reserve-s", type=float, default=60.0,
                        help="of the budget, kept for the last checkpoints and the results (default 60)")
    parser.add_argument("--runs", default=",".join(run.name for run in RUNS), help="comma-separated run names")
    parser.add_argument("--readme", type=Path, help="rewrite this README's convergence section from the results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    default_corpora = ROOT / ".corpora"
    args.corpora = args.corpora or (default_corpora if default_corpora.is_dir()
                                    else Path.home() / ".cache" / "pcmoe" / "corpora")
    args.out = (args.out or ROOT / "runs" / f"convergence-{args.scale}").resolve()
    if args.worker:
        return worker(args)

    from bench.convergence_report import rewrite_readme, write_figure

    started = time.time()
    unknown = [name for name in args.runs.split(",") if name not in KNOWN]
    if unknown:
        sys.exit(f"convergence: error: unknown run(s) {', '.join(unknown)}: choose among {', '.join(KNOWN)}")
    runs = [KNOWN[name] for name in args.runs.split(",")]
    if any(run.public_init for run in runs) and PUBLIC not in runs:
        runs.insert(0, PUBLIC)
    path = args.results / f"convergence_{args.scale}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    done = {name for name, state in results(args.scale, runs, args, previous)["runs"].items() if state["complete"]}
    todo = [run for run in runs if run.name not in done and run is not PUBLIC]
    deadline = started + args.budget_s - args.reserve_s
    public = (PUBLIC in runs and PUBLIC.name not in done) or any(run.public_init for run in todo)
    if public:  # refused before anything runs
        from pcmoe_engine.hf_config import hf_config

        try:
            hf_config(run_config(SCALES[args.scale], PUBLIC, args.out).model)
        except ValueError as e:
            sys.exit(f"convergence: error: the -ft runs start from a transformers checkpoint of the {args.scale} "
                     f"scale's model, which is none: {e}")
    if todo or public:  # encoded here once, before the parties start (each would encode every domain)
        # The public checkpoint carries the bundled BPE, so a -ft run's tokens are the from-scratch runs'.
        cfg = run_config(SCALES[args.scale], PUBLIC if public else todo[0], args.out)
        for domain in DOMAINS:
            domain_tokens(cfg, args.corpora, domain, args.out / "tokens", "eval")
    if public and not public_checkpoint(args.scale, args, deadline):
        todo = [run for run in todo if not run.public_init]
    print(f"convergence: {SCALES[args.scale].label}; done: {', '.join(sorted(done)) or 'none'}; to run: "
          f"{', '.join(run.name for run in todo) or 'none'}", flush=True)
    schedule(args.scale, todo, args, deadline)
    study = results(args.scale, runs, args, previous)
    args.results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(study) + "\n")
    figure = write_figure(study, path.with_suffix(".png"))
    print(f"convergence: wrote {path} and {figure} ({time.time() - started:.0f} s)")
    if args.readme:
        print(f"convergence: {rewrite_readme(args.readme, study)}")

if __name__ == "__main__":
    main()
