"""The ``pcmoe`` command.

    pcmoe train [--parties N] [--config f.toml] [--set section.key=value ...]

launches one training process per party on this machine (what torchrun would, with a free port on
127.0.0.1): one GPU per party with NCCL when there are enough GPUs, else CPU processes over gloo
(`--set train.device=cuda` puts more parties than GPUs on shared GPUs, over gloo). With no arguments: 2 parties train the `tiny` model on Tiny Shakespeare for a few minutes.

    pcmoe party --rank I --parties N (--rendezvous HOST:PORT | --peers HOST:PORT,...) [--config f.toml] [--set ...]

runs party I alone, one party per host (multihost.py, docs/multihost.md).
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


def launch(parties: int, train_args: list[str], env: dict | None = None) -> int:
    """Run ``python -m pcmoe_engine.train *train_args`` once per party; the first failure stops them all."""
    base = dict(os.environ if env is None else env)
    # On CPU the engine runs csrc_triton's PyTorch references, never Triton's (slow) interpreter.
    base.pop("TRITON_INTERPRET", None)
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), base.get("PYTHONPATH")]))
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parties)))
    base.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the parties are all on this machine: loopback only
    port = str(free_port())
    procs = []
    for party in range(parties):
        party_env = {**base, "RANK": str(party), "LOCAL_RANK": str(party), "WORLD_SIZE": str(parties),
                     "LOCAL_WORLD_SIZE": str(parties), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "pcmoe_engine.train", *train_args], env=party_env))
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
    args = parser.parse_args(argv)

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
