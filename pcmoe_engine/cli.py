"""The ``pcmoe`` command.

    pcmoe train [--parties N] [--config FILE | --preset NAME] [--set SECTION.KEY=VALUE ...]
    pcmoe config show [--parties N] [--config FILE | --preset NAME] [--set SECTION.KEY=VALUE ...]
    pcmoe plot RUN_DIR [RUN_DIR ...] [--out PNG]

`pcmoe train` launches one training process per party on this machine (what torchrun would, with a free port on
127.0.0.1): one GPU per party with NCCL when there are enough GPUs, else CPU processes over gloo
(`--set train.device=cuda` puts more parties than GPUs on shared GPUs, over gloo). With no arguments: 2 parties
train the `tiny` model on Tiny Shakespeare for a few minutes. It prints a start line, the parties' progress (drawn
from their metrics files, live in a terminal: progress.py) and the run's summary. `pcmoe train --help` lists every
option (config_text.py); `pcmoe config show` prints a run's whole configuration as TOML; `pcmoe plot` draws runs'
losses (plot.py).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .config import add_config_arguments, load_config
from .config_text import options_help, to_toml

__all__ = ["main", "launch", "free_port"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the parties' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(parties: int, train_args: list[str], env: dict | None = None, watch: Callable[[], None] | None = None
           ) -> int:
    """Run ``python -m pcmoe_engine.train *train_args`` once per party; the first failure stops them all.
    ``watch`` is called while they run, every 0.2 s."""
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
            if watch is not None:
                watch()
            time.sleep(0.2)
    except KeyboardInterrupt:
        failed = [130]
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait()
    return failed[0] if failed else 0


def _overrides(args: argparse.Namespace) -> list[str]:
    return args.overrides + ([f"parties={args.parties}"] if args.parties is not None else [])


def _config_args(args: argparse.Namespace) -> list[str]:
    """The config arguments as given (--config or --preset, then --set), for the party processes."""
    source = ["--config", args.config] if args.config else ["--preset", args.preset] if args.preset else []
    return source + [a for o in _overrides(args) for a in ("--set", o)]


def _load(args: argparse.Namespace):
    return load_config(args.config, _overrides(args), preset=args.preset)


def _train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from .metrics import say, start_line, summary_text  # torch: only for a run
    from .progress import RunProgress

    say(start_line(cfg))
    with RunProgress(cfg) as progress:
        code = launch(cfg.parties, [*_config_args(args), "--quiet"], watch=progress.poll)
    if not code:
        say(summary_text(json.loads((cfg.run_dir / "summary.json").read_text()), cfg.run_dir))
    return code


def _config_show(args: argparse.Namespace) -> int:
    cfg = _load(args)
    given = " ".join(_config_args(args))
    sys.stdout.write(to_toml(cfg, f"pcmoe config show{' ' + given if given else ''}: the resolved configuration.\n"
                                  "Save it to a file and run it: pcmoe train --config FILE"))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .plot import plot_runs

    print(f"wrote {plot_runs(args.run_dirs, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pcmoe", description="PC-MoE: collaborative training of MoE LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    width = min(120, shutil.get_terminal_size().columns - 2)
    train = commands.add_parser(
        "train", help="train with N local parties (one process each)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with N local parties, one process each (on CPU over gloo, or one GPU per party over NCCL).",
        epilog="Options of a run: in a TOML file (--config; `pcmoe config show` prints one to start from), or --set "
               "SECTION.KEY=VALUE.\nThe values below are the default run's (configs/tiny.toml); `pcmoe config show "
               "--preset small` prints another's.\n\n" + options_help(load_config(), width))
    show = commands.add_parser("config", help="print a run's resolved configuration").add_subparsers(
        dest="config_command", required=True).add_parser(
        "show", help="print the resolved configuration as TOML (pcmoe train --config reads it back)")
    for command in (train, show):
        command.add_argument("--parties", type=int, help="number of parties (default: the config's, 2 for tiny)")
        add_config_arguments(command)
    plot = commands.add_parser("plot", help="draw runs' training and held-out losses against tokens into a PNG")
    plot.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders, e.g. runs/tiny-2p")
    plot.add_argument("--out", type=Path, metavar="PNG", help="the figure (default: loss.png in the first RUN_DIR)")
    args = parser.parse_args(argv)
    try:
        code = {"train": _train, "config": _config_show, "plot": _plot}[args.command](args)
    except ValueError as e:
        parser.exit(2, f"pcmoe: error: {e}\n")
    if code:
        parser.exit(code, f"pcmoe: training failed (exit code {code})\n")


if __name__ == "__main__":
    main()
