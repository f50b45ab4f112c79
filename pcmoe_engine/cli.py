"""The ``pcmoe`` command.

    pcmoe train [--parties N] [--config f.toml] [--set section.key=value ...]

launches one training process per party on this machine (what torchrun would, with a free port on
127.0.0.1): one GPU per party with NCCL when there are enough GPUs, else CPU processes over gloo
(`--set train.device=cuda` puts more parties than GPUs on shared GPUs, over gloo). With no arguments: 2 parties train the `tiny` model on Tiny Shakespeare for a few minutes.

The launcher checks the run folder before any party starts, forwards SIGINT, SIGTERM and SIGHUP to the
parties, and takes them with it if it dies (even by SIGKILL). A party that fails is noticed by the others
themselves (faults.py), which print their own line; the launcher only kills a party stopped by SIGSTOP once it
is alone, or any still running train.peer_timeout_s + 10 s after the first failure, and exits with the code
that says what happened (faults.ExitCode).
"""

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .checkpoint import check_run_dir
from .config import load_config
from .faults import STOP_SIGNALS, ExitCode, die_with_parent

__all__ = ["main", "launch", "free_port", "EXIT_CODES"]

EXIT_CODES = """exit codes:
  0    the run finished
  1    a party refused its configuration, data, checkpoint or run folder (its one line says what to change)
  2    the command line or configuration was refused before any party started
  3    a party was lost (killed, hung, cut off, or it failed): every other party printed the command that
       resumes the run from the last checkpoint every party holds
  4    the run diverged: non-finite losses or gradients (train.nonfinite, train.nonfinite_patience)
  5    a party ran out of memory (its line says what to lower)
  128+N  stopped by signal N (130: SIGINT, 143: SIGTERM, 129: SIGHUP); resume with the command printed"""


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the parties' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outcome(codes: list[int], forwarded: list[int]) -> int:
    """The launcher's exit code: a party's own failure first, then a stop signal it forwarded; any party killed
    or lost otherwise is a lost peer (the run resumes)."""
    own = [code for code in codes if 0 < code < 128 and code != ExitCode.PEER_LOST]
    if own:
        return own[0]
    if forwarded:
        return 128 + forwarded[0]
    return ExitCode.PEER_LOST if any(codes) else ExitCode.OK


def _suspended(pid: int) -> bool:
    """Stopped by SIGSTOP (Linux: state T): such a party cannot end by itself."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def launch(parties: int, train_args: list[str], env: dict | None = None, peer_timeout_s: float = 60.0,
           command: str | None = None) -> int:
    """Run ``python -m pcmoe_engine.train *train_args`` once per party and wait for them all; returns the exit
    code (``_outcome``). ``command``: how the run was started, for the resume command a stopping party prints."""
    base = dict(os.environ if env is None else env)
    # On CPU the engine runs csrc_triton's PyTorch references, never Triton's (slow) interpreter.
    base.pop("TRITON_INTERPRET", None)
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), base.get("PYTHONPATH")]))
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parties)))
    base.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the parties are all on this machine: loopback only
    base.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # a lost peer is one line, not c10d's warnings and stacks
    if command:
        base["PCMOE_COMMAND"] = command
    port = str(free_port())
    procs = []
    forwarded: list[int] = []

    def forward(signum, frame):
        forwarded.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    killed = set()
    try:
        for party in range(parties):
            party_env = {**base, "RANK": str(party), "LOCAL_RANK": str(party), "WORLD_SIZE": str(parties),
                         "LOCAL_WORLD_SIZE": str(parties), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            # Its own session: a terminal's Ctrl-C reaches the launcher, which forwards it once.
            procs.append(subprocess.Popen([sys.executable, "-m", "pcmoe_engine.train", *train_args], env=party_env,
                                          start_new_session=True, preexec_fn=die_with_parent))
        deadline = None
        while None in (codes := [p.poll() for p in procs]):
            if deadline is None and (forwarded or any(codes)):
                # The others notice a failed party within peer_timeout_s and stop with their own line.
                grace = 10 if forwarded else peer_timeout_s + 10
                deadline = time.monotonic() + grace
            running = [party for party, code in enumerate(codes) if code is None]
            hung = deadline is not None and all(_suspended(procs[party].pid) for party in running)
            if hung or (deadline is not None and time.monotonic() > deadline):
                for party in running:
                    procs[party].kill()
                    killed.add(party)
                    why = "was stopped (SIGSTOP) and alone" if hung else f"still ran {grace:g} s after the first stop"
                    print(f"pcmoe: party {party} {why}: killed", file=sys.stderr)
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.wait() for p in procs]
    for party, code in enumerate(codes):
        if code < 0 and party not in killed:
            print(f"pcmoe: party {party} was killed by {signal.Signals(-code).name}", file=sys.stderr)
    return _outcome(codes, forwarded)


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
    print(f"  total {s['tokens_per_s_total']:,.0f} tok/s; summary.json and metrics.jsonl are in {run_dir}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pcmoe", description="PC-MoE: collaborative training of MoE LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train with N local parties (one process each)", epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--parties", type=int, help="number of parties (default: the config's, 2 for tiny)")
    train.add_argument("--config", help="TOML file (default: the packaged configs/tiny.toml)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override an option, e.g. --set train.steps=50 (repeatable)")
    args = parser.parse_args(argv)

    overrides = args.overrides + ([f"parties={args.parties}"] if args.parties is not None else [])
    try:
        cfg = load_config(args.config, overrides)
        check_run_dir(cfg)
    except ValueError as e:
        parser.exit(ExitCode.REFUSED, f"pcmoe: error: {e}\n")
    train_args = (["--config", args.config] if args.config else []) + [a for o in overrides for a in ("--set", o)]
    code = launch(cfg.parties, train_args, peer_timeout_s=cfg.train.peer_timeout_s,
                  command=shlex.join(["pcmoe", *argv]))
    if code:
        sys.exit(code)  # each party has printed its own line
    _report(cfg.run_dir)


if __name__ == "__main__":
    main()
