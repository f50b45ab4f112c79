"""The ``pcmoe`` command.

    pcmoe train [--parties N] [--config f.toml] [--set section.key=value ...]

launches one training process per party on this machine (what torchrun would, with a free port on
127.0.0.1): one GPU per party with NCCL when there are enough GPUs, else CPU processes over gloo
(`--set train.device=cuda` puts more parties than GPUs on shared GPUs, over gloo). With no arguments: 2 parties train the `tiny` model on Tiny Shakespeare for a few minutes.

    pcmoe party --rank I --parties N (--rendezvous HOST:PORT | --peers HOST:PORT,...) [--config f.toml] [--set ...]

runs party I alone, one party per host (multihost.py, docs/multihost.md).

    pcmoe export RUN_DIR --party I --out DIR [--pool [--rendezvous HOST:PORT]]   (export.py)
    pcmoe eval PATH [--party I] --text FILE                                       (inference.py)
    pcmoe generate PATH [--party I] --prompt TEXT

write party I's model as a transformers checkpoint folder (with --pool the parties pool their experts: a
complete model), print one JSON object with a model's mean next-token loss on FILE, and sample from a model;
PATH is a run folder or a transformers checkpoint folder.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .config import load_config

__all__ = ["main", "launch", "free_port"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the parties' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(parties: int, args: list[str], env: dict | None = None, module: str = "pcmoe_engine.train",
           ranks: list[int] | None = None, rendezvous: tuple[str, int] | None = None) -> int:
    """Run ``python -m module *args`` once per party; the first failure stops them all. By default every
    party runs here and they meet on a free port of 127.0.0.1; ``ranks`` and ``rendezvous`` (party 0's host and
    port) run some of them here, the others elsewhere."""
    ranks = list(range(parties)) if ranks is None else ranks
    base = dict(os.environ if env is None else env)
    # On CPU the engine runs csrc_triton's PyTorch references, never Triton's (slow) interpreter.
    base.pop("TRITON_INTERPRET", None)
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), base.get("PYTHONPATH")]))
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(ranks))))
    host, port = rendezvous or ("127.0.0.1", free_port())
    if host in ("127.0.0.1", "localhost"):
        base.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the parties are all on this machine: loopback only
    procs = []
    for local, party in enumerate(ranks):
        party_env = {**base, "RANK": str(party), "LOCAL_RANK": str(local), "WORLD_SIZE": str(parties),
                     "LOCAL_WORLD_SIZE": str(len(ranks)), "MASTER_ADDR": host, "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=party_env))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        failed = [130]
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait()
    return failed[0] if failed else 0


def _report(run_dir: Path) -> None:
    s = json.loads((run_dir / "summary.json").read_text())
    mib = 2**20
    print(f"\n{run_dir}: {s['parties']} part{'y' if s['parties'] == 1 else 'ies'}, preset {s['preset']}, "
          f"{s['steps']} steps")
    for i in range(s["parties"]):
        if i in s["parties_missing"]:
            continue
        print(f"  party {i}: loss {s['initial_loss'][i]:.3f} -> {s['final_loss'][i]:.3f}, eval {s['eval_loss'][i]:.3f}"
              f" | {s['tokens_per_s'][i] or 0:,.0f} tok/s | peak mem {s['peak_memory_bytes'][i] / mib:,.0f} MiB "
              f"({s['peak_memory_kind']}) | sent {s['bytes_sent'][i] / mib:,.1f} MiB, received "
              f"{s['bytes_received'][i] / mib:,.1f} MiB")
    if missing := s["parties_missing"]:
        print(f"  part{'y' if len(missing) == 1 else 'ies'} {', '.join(map(str, missing))}: no files here (on "
              "other hosts, each party's party<i>/ is in its own train.out_dir)")
    print(f"  total {s['tokens_per_s_total']:,.0f} tok/s; summary.json and metrics.jsonl are in {run_dir}")


def _export(args) -> None:
    from .export import export_dtype, write
    from .hf import check_new_folder
    from .rendezvous import parse_address
    from .runs import common_step, read_party

    saved = read_party(args.run_dir, args.party, args.step)
    check_new_folder(args.out)
    if not args.pool:
        if args.rendezvous:
            raise ValueError("--rendezvous is where the parties meet to pool their experts: add --pool, or drop it")
        out = write(saved, args.out, [saved.shard("cpu")], export_dtype(saved, args.dtype))
        ids, total = saved.state["expert_ids"], saved.model.num_experts
        print(f"party {args.party}: wrote {out}: its backbone and " + (
            f"all {total} experts (step {saved.step})" if len(ids) == total else
            f"its own {len(ids)} of the {total} experts (step {saved.step}): a partial checkpoint, which transformers "
            "cannot load whole; pcmoe eval and pcmoe generate read the run folder, or --pool writes a complete one"))
        return
    rendezvous = parse_address(args.rendezvous) if args.rendezvous else None
    step = args.step if args.step is not None or rendezvous else common_step(args.run_dir, saved.parties)
    worker = [args.run_dir, "--party", str(args.party), "--out", args.out, "--timeout", str(args.timeout),
              *(["--step", str(step)] if step is not None else []), *(["--dtype", args.dtype] if args.dtype else [])]
    env = {"TORCH_CPP_LOG_LEVEL": "FATAL", **os.environ}  # c10d's retry logs while a party is awaited
    code = launch(saved.parties, worker, env, module="pcmoe_engine.export", rendezvous=rendezvous,
                  ranks=[args.party] if rendezvous else None)
    if code:
        sys.exit(code)  # the failing party's process has said why


def _model_args(command) -> None:
    command.add_argument("path", help="a run folder, or a transformers checkpoint folder (e.g. a pooled export)")
    command.add_argument("--party", type=int, help="a run folder's party whose backbone is used (default 0)")
    command.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    command.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                         help="auto: bf16 autocast on a GPU, fp32 on the CPU")


def _eval(args) -> None:
    from .inference import evaluate, load_model

    if not Path(args.text).expanduser().is_file():
        raise ValueError(f"--text {args.text!r} is not a file: give a UTF-8 text file (optionally .gz)")
    if args.seq_len < 1 or args.batch_size < 1:
        raise ValueError("--seq-len and --batch-size must be at least 1")
    print(json.dumps(evaluate(load_model(args.path, args.party, args.device, args.precision), args.text,
                              args.seq_len, args.batch_size)))


def _generate(args) -> None:
    from .inference import generate, load_model

    if args.temperature < 0 or args.max_new_tokens < 0:
        raise ValueError("--temperature and --max-new-tokens must not be negative")
    model = load_model(args.path, args.party, args.device, args.precision)
    ids = generate(model, model.tokenizer.encode(args.prompt).ids, args.max_new_tokens, args.temperature, args.seed)
    print(model.tokenizer.decode(ids))


def _model_commands(commands) -> dict:
    """The commands on a trained model (export, eval, generate): name -> what runs it."""
    export = commands.add_parser("export", help="write a party's model as a transformers checkpoint folder")
    export.add_argument("run_dir")
    export.add_argument("--party", type=int, required=True, help="whose model: its backbone (and experts)")
    export.add_argument("--out", required=True, help="a new folder for the checkpoint")
    export.add_argument("--pool", action="store_true", help="the parties pool their experts so the model is "
                        "complete (all of them must run their export at once: docs/privacy.md)")
    export.add_argument("--rendezvous", metavar="HOST:PORT", help="with --pool, each party on its own host: "
                        "party 0's address and a free port, the same for every party")
    export.add_argument("--timeout", type=float, default=300.0, help="with --pool: seconds to wait for every party")
    export.add_argument("--step", type=int, help="the checkpoint's step (default: the latest; with --pool on one "
                        "machine, the latest every party has)")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: that of the checkpoint the run started from, else float32")
    evaluate = commands.add_parser("eval", help="a model's mean next-token loss on a text, as one JSON object")
    _model_args(evaluate)
    evaluate.add_argument("--text", required=True, help="a UTF-8 text file (optionally .gz)")
    evaluate.add_argument("--seq-len", type=int, default=1024, help="tokens per window (inference.py)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    generate = commands.add_parser("generate", help="sample a continuation of a prompt from a model")
    _model_args(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    generate.add_argument("--seed", type=int, default=0)
    return {"export": _export, "eval": _eval, "generate": _generate}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pcmoe", description="PC-MoE: collaborative training of MoE LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", help="TOML file (default: the packaged configs/tiny.toml)")
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override an option, e.g. --set train.steps=50 (repeatable)")
    train = commands.add_parser("train", parents=[config], help="train with N local parties (one process each)")
    train.add_argument("--parties", type=int, help="number of parties (default: the config's, 2 for tiny)")
    party = commands.add_parser("party", parents=[config], help="run one party of a multi-host run (one per host)")
    party.add_argument("--rank", type=int, required=True, help="this party's rank, 0 .. N-1")
    party.add_argument("--parties", type=int, required=True, help="number of parties N")
    party.add_argument("--rendezvous", metavar="HOST:PORT",
                       help="transport torch: party 0's host and a free port there, the same for every party")
    party.add_argument("--peers", metavar="HOST:PORT,...",
                       help="transport tls (implied): every party's host:port in rank order, the same for every party")
    model_commands = _model_commands(commands)
    args = parser.parse_args(argv)
    if args.command in model_commands:
        try:
            model_commands[args.command](args)
        except ValueError as e:
            parser.exit(2, f"pcmoe: error: {e}\n")
        return

    if args.command == "party":
        from .multihost import run_party  # imports torch: not for `pcmoe train`'s launcher

        try:
            cfg = run_party(args.rank, args.parties, args.rendezvous, args.peers, args.config, args.overrides)
        except ValueError as e:
            parser.exit(2, f"pcmoe: error: {e}\n")
        if args.rank == 0:
            _report(cfg.run_dir)
        return
    overrides = args.overrides + ([f"parties={args.parties}"] if args.parties is not None else [])
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as e:
        parser.exit(2, f"pcmoe: error: {e}\n")
    if cfg.transport.kind != "torch":
        parser.exit(2, f"pcmoe: error: transport.kind={cfg.transport.kind} connects parties on separate hosts: start "
                    "each with `pcmoe party` (docs/multihost.md)\n")
    train_args = (["--config", args.config] if args.config else []) + [a for o in overrides for a in ("--set", o)]
    code = launch(cfg.parties, train_args)
    if code:
        parser.exit(code, f"pcmoe: training failed (exit code {code})\n")
    _report(cfg.run_dir)


if __name__ == "__main__":
    main()
