"""The ``pcmoe`` command.

    pcmoe train [--parties N] [--config FILE | --preset NAME] [--set SECTION.KEY=VALUE ...]
    pcmoe config show [--parties N] [--config FILE | --preset NAME] [--set SECTION.KEY=VALUE ...]
    pcmoe plot RUN_DIR [RUN_DIR ...] [--out PNG]
    pcmoe party --rank I --parties N (--rendezvous HOST:PORT | --peers HOST:PORT,...) [--config FILE] [--set ...]
    pcmoe export RUN_DIR --party I --out DIR [--pool [--rendezvous HOST:PORT]]   (export.py)
    pcmoe eval PATH [--party I] --text FILE                                       (inference.py)
    pcmoe generate PATH [--party I] --prompt TEXT
    pcmoe lm-eval --model pcmoe --model_args path=PATH,party=I --tasks ...      (harness.py; lm-eval's arguments)

`pcmoe train` launches one training process per party on this machine (what torchrun would, with a free port on
127.0.0.1): one GPU per party with NCCL when there are enough GPUs, else CPU processes over gloo
(`--set train.device=cuda` puts more parties than GPUs on shared GPUs, over gloo). With no arguments: 2 parties
train the `tiny` model on Tiny Shakespeare for a few minutes. It prints a start line, the parties' progress (drawn
from their metrics files, live in a terminal: progress.py) and the run's summary. `pcmoe train --help` lists every
option (config_text.py); `pcmoe config show` prints a run's whole configuration as TOML; `pcmoe plot` draws runs'
losses (plot.py).

`pcmoe party` runs party I alone, one party per host (multihost.py, docs/multihost.md). `pcmoe export` writes party
I's model as a transformers checkpoint folder (with --pool the parties pool their experts: a complete model),
`pcmoe eval` prints one JSON object with a model's mean next-token loss on FILE, `pcmoe generate` samples from a
model; PATH is a run folder or a transformers checkpoint folder. `pcmoe lm-eval` runs EleutherAI's
lm-evaluation-harness on such a model (the optional `lm-eval` package).

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
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .checkpoint import check_run_dir
from .config import add_config_arguments, load_config, parse_address
from .config_text import options_help, to_toml
from .faults import STOP_SIGNALS, ExitCode, die_with_parent, say

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


def launch(parties: int, args: list[str], env: dict | None = None, module: str = "pcmoe_engine.train",
           ranks: list[int] | None = None, rendezvous: tuple[str, int] | None = None,
           watch: Callable[[], None] | None = None, peer_timeout_s: float = 60.0, command: str | None = None) -> int:
    """Run ``python -m module *args`` once per party and wait for them all; returns the exit code (``_outcome``).
    By default every party runs here and they meet on a free port of 127.0.0.1; ``ranks`` and ``rendezvous``
    (party 0's host and port) run some of them here, the others elsewhere. ``watch`` is called while they run;
    ``command``: how the run was started, for the resume command a stopping party prints."""
    ranks = list(range(parties)) if ranks is None else ranks
    base = dict(os.environ if env is None else env)
    # On CPU the engine runs csrc_triton's PyTorch references, never Triton's (slow) interpreter.
    base.pop("TRITON_INTERPRET", None)
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), base.get("PYTHONPATH")]))
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(ranks))))
    base.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # a lost peer is one line, not c10d's warnings and stacks
    if command:
        base["PCMOE_COMMAND"] = command
    host, port = rendezvous or ("127.0.0.1", free_port())
    if host in ("127.0.0.1", "localhost"):
        base.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the parties are all on this machine: loopback only
    procs = []
    forwarded: list[int] = []

    def forward(signum, frame):
        forwarded.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # Only the main thread may set handlers: a caller launching runs from threads (bench/convergence.py) keeps its own.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS} if in_main_thread else {}
    killed = set()
    try:
        for local, party in enumerate(ranks):
            party_env = {**base, "RANK": str(party), "LOCAL_RANK": str(local), "WORLD_SIZE": str(parties),
                         "LOCAL_WORLD_SIZE": str(len(ranks)), "MASTER_ADDR": host, "MASTER_PORT": str(port)}
            # Its own session: a terminal's Ctrl-C reaches the launcher, which forwards it once.
            procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=party_env,
                                          start_new_session=True, preexec_fn=die_with_parent))
        deadline = None
        while None in (codes := [p.poll() for p in procs]):
            if deadline is None and (forwarded or any(codes)):
                # The others notice a failed party within peer_timeout_s and stop with their own line.
                grace = 10 if forwarded else peer_timeout_s + 10
                deadline = time.monotonic() + grace
            running = [local for local, code in enumerate(codes) if code is None]
            hung = deadline is not None and all(_suspended(procs[local].pid) for local in running)
            if hung or (deadline is not None and time.monotonic() > deadline):
                for local in running:
                    procs[local].kill()
                    killed.add(local)
                    why = "was stopped (SIGSTOP) and alone" if hung else f"still ran {grace:g} s after the first stop"
                    print(f"pcmoe: party {ranks[local]} {why}: killed", file=sys.stderr)
            if watch is not None:
                watch()
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.wait() for p in procs]
    for local, code in enumerate(codes):
        if code < 0 and local not in killed:
            print(f"pcmoe: party {ranks[local]} was killed by {signal.Signals(-code).name}", file=sys.stderr)
    return _outcome(codes, forwarded)


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
    if cfg.transport.kind != "torch":
        raise ValueError(f"transport.kind={cfg.transport.kind} connects parties on separate hosts: start each with "
                         "`pcmoe party` (docs/multihost.md)")
    from .metrics import start_line, summary_text
    from .progress import RunProgress

    check_run_dir(cfg)
    say(start_line(cfg))
    with RunProgress(cfg) as progress:
        code = launch(cfg.parties, [*_config_args(args), "--quiet"], watch=progress.poll,
                      peer_timeout_s=cfg.train.peer_timeout_s, command=shlex.join(["pcmoe", *args.argv]))
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


def _export(args) -> None:
    from .export import export_dtype, write
    from .hf import check_new_folder
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
    try:
        rendezvous = parse_address(args.rendezvous) if args.rendezvous else None
    except ValueError as e:
        raise ValueError(f"--rendezvous {e}: party 0's address and a free port on it, the same for every party") \
            from None
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


def _lm_eval(argv: list[str]) -> None:
    try:
        from .harness import main as lm_eval_main  # registers the model type "pcmoe" with lm-eval
    except ImportError as e:
        if e.name is None or not e.name.startswith("lm_eval"):
            raise
        sys.exit("pcmoe: error: pcmoe lm-eval needs the lm-eval package: pip install 'pcmoe[eval]'")
    try:
        lm_eval_main(argv)
    except ValueError as e:  # a bad model_args value (PCMoELM, inference.load_model): one line
        sys.exit(f"pcmoe: error: {e}")


def _party(args: argparse.Namespace) -> int:
    from .multihost import run_party  # imports torch: not for `pcmoe train`'s launcher

    os.environ["PCMOE_COMMAND"] = shlex.join(["pcmoe", *args.argv])  # what a stopping party says resumes it
    run_party(args.rank, args.parties, args.rendezvous, args.peers, args.config, args.overrides, args.preset)
    return 0  # party 0 printed the run's summary (train.main)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pcmoe", description="PC-MoE: collaborative training of MoE LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    width = min(120, shutil.get_terminal_size().columns - 2)
    train = commands.add_parser(
        "train", help="train with N local parties (one process each)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with N local parties, one process each (on CPU over gloo, or one GPU per party over NCCL).",
        epilog="Options of a run: in a TOML file (--config; `pcmoe config show` prints one to start from), or --set "
               "SECTION.KEY=VALUE.\nThe values below are the default run's (configs/tiny.toml); `pcmoe config show "
               "--preset small` prints another's.\n\n" + options_help(load_config(), width) + "\n\n" + EXIT_CODES)
    show = commands.add_parser("config", help="print a run's resolved configuration").add_subparsers(
        dest="config_command", required=True).add_parser(
        "show", help="print the resolved configuration as TOML (pcmoe train --config reads it back)")
    for command in (train, show):
        command.add_argument("--parties", type=int, help="number of parties (default: the config's, 2 for tiny)")
        add_config_arguments(command)
    plot = commands.add_parser("plot", help="draw runs' training and held-out losses against tokens into a PNG")
    plot.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders, e.g. runs/tiny-2p")
    plot.add_argument("--out", type=Path, metavar="PNG", help="the figure (default: loss.png in the first RUN_DIR)")
    party = commands.add_parser("party", help="run one party of a multi-host run (one per host)")
    add_config_arguments(party)
    party.add_argument("--rank", type=int, required=True, help="this party's rank, 0 .. N-1")
    party.add_argument("--parties", type=int, required=True, help="number of parties N")
    party.add_argument("--rendezvous", metavar="HOST:PORT",
                       help="transport torch: party 0's host and a free port there, the same for every party")
    party.add_argument("--peers", metavar="HOST:PORT,...",
                       help="transport tls (implied): every party's host:port in rank order, the same for every party")
    run = {"train": _train, "config": _config_show, "plot": _plot, "party": _party, **_model_commands(commands)}
    commands.add_parser("lm-eval", add_help=False, help="run lm-evaluation-harness on a model: pcmoe lm-eval --model "
                        "pcmoe --model_args path=PATH,party=I --tasks ... (the rest is lm-eval's command line)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # every later argument is lm-eval's: argparse must not read them
        return _lm_eval(argv[1:])
    args = parser.parse_args(argv)
    args.argv = argv  # how the run was started: a stopping party prints the command that resumes it
    try:
        code = run[args.command](args)
    except ValueError as e:
        parser.exit(ExitCode.REFUSED, f"pcmoe: error: {e}\n")
    if code:
        sys.exit(code)  # each party has printed its own line


if __name__ == "__main__":
    main()
