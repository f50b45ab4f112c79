"""One party's training process: ``torchrun --nproc-per-node N -m pcmoe_engine.train [--config f.toml]
[--set key=value ...]`` (or ``pcmoe train --parties N``, which launches these for you; or, one party per host,
``pcmoe party`` or ``torchrun --nnodes N``: docs/multihost.md).

The parties step in lockstep, each on its own batch. Each one's optimizer updates only its own backbone and
expert shard; the only traffic is the protocol's (see protocol.py). ``train`` is the loop: a ``Party``
(party.py) steps, and the loop decides when to log, evaluate and checkpoint. Writes, under the run directory:
party<i>/config.json, party<i>/metrics.jsonl, party<i>/summary.json, party<i>/checkpoints/; party 0 merges the
parties' files into metrics.jsonl and summary.json at the end (metrics.py).

``main`` is the process around it: it connects to the other parties, runs the watchdog (faults.py), and turns
whatever stops the party (bad input, a lost peer, divergence, memory, a stop signal) into one line and an exit
code (faults.ExitCode).
"""

import argparse
import os
import signal
import sys
import threading
import traceback
from datetime import timedelta

import torch.distributed as dist

from .checkpoint import prepare_party_dir, record_config
from .config import Config, add_config_arguments, load_config
from .faults import (SETUP_FACTOR, STOP_SIGNALS, Diverged, ExitCode, Interrupted, Progress, Watchdog, error_line,
                     exit_now, out_of_memory, resume_command, say)
from .metrics import MetricsLog, merge_run, start_line, summary_text, write_summary
from .party import Party, process_group_backend
from .tls import TLSMesh
from .transport import PeerFailure, TorchTransport, Transport

__all__ = ["main", "train", "open_transport"]


def train(cfg: Config, rank: int, transport: Transport | None = None, quiet: bool = False,
          progress: Progress | None = None) -> dict:
    """Train as party ``rank`` of ``cfg.parties`` over ``transport`` (default: the process group, which is
    already up if there are several parties); ``quiet``: print nothing (`pcmoe train` shows the parties'
    progress from their metrics files); ``progress`` learns the Party once built, for the line the party prints
    if it stops. Returns its summary."""
    t = cfg.train
    prepare_party_dir(cfg, rank)
    party = Party(cfg, rank, transport)
    if progress is not None:
        progress.party = party
    if t.resume:
        checkpoint = party.resume()
        if not quiet:
            say(f"party {rank} | resumed from {checkpoint} at step {party.step_count}" if checkpoint else
                f"party {rank} | no checkpoint every party holds: starting from step 0")
    else:
        party.handshake()
    if progress is not None:
        progress.joined = True
    record_config(party.dir, cfg)
    log = MetricsLog(party, quiet)
    while party.step_count < t.steps:
        record = party.step()
        step = record["step"]
        log.write(record)
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
            log.write({"step": step, "eval_loss": party.evaluate()})
        if t.checkpoints and ((t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps):
            party.save()
    party.commit()
    eval_loss = party.evaluate()
    log.write({"step": party.step_count, "eval_loss": eval_loss})
    summary = party.summary(eval_loss)
    write_summary(party.dir / "summary.json", summary)
    log.close()
    party.close()
    return summary


def _stopped(e: BaseException, progress: Progress, watchdog: Watchdog | None) -> tuple[int, str, str]:
    """(exit code, the line to print, the state the heartbeat ends in) for whatever stopped this party."""
    if _received and not isinstance(e, (Interrupted, KeyboardInterrupt)):
        # A stop signal came, but another error surfaced first (a peer stopped by the same signal closed its
        # connections, or the signal interrupted a call that reports it its own way): the signal stopped it.
        e = Interrupted(_received[0])
    if isinstance(e, (Interrupted, KeyboardInterrupt)):
        signum = getattr(e, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        return 128 + signum, f"stopped by {name} {progress.status()}", f"signal:{name}"
    if isinstance(e, Diverged):
        return ExitCode.DIVERGED, str(e), "fail"
    if isinstance(e, ValueError):
        return ExitCode.BAD_INPUT, str(e), "fail"
    if isinstance(e, PeerFailure):  # over TLS (transport.kind=tls), which watches its peers itself
        return ExitCode.PEER_LOST, f"{e} {progress.status()}", "fail"
    if kind := out_of_memory(e):
        return ExitCode.OUT_OF_MEMORY, (
            f"out of {kind} memory at step {progress.step}: lower train.batch_size or data.seq_len (raise "
            "train.grad_accum to keep the tokens per step), set train.activation_checkpointing=true, or use a "
            "smaller model"), "fail"
    if "Duplicate GPU detected" in str(e):  # NCCL, at the first collective: two ranks on one device
        return ExitCode.BAD_INPUT, (
            "two parties are on one GPU, and NCCL needs a GPU per party: on one machine start them together "
            "(`pcmoe train --parties N`), or give each `pcmoe party` a GPU of its own (CUDA_VISIBLE_DEVICES), or "
            "set train.device=cpu"), "fail"
    if watchdog is not None:
        watchdog.blame()  # did a collective fail because a party stopped? then the watchdog ends this process
    traceback.print_exception(e)
    return ExitCode.BAD_INPUT, f"stopped by the error above ({type(e).__name__}) {progress.status()}", "fail"


_received: list[int] = []  # the stop signals this process got


def _on_signal(signum, frame):
    _received.append(signum)
    for s in STOP_SIGNALS:  # one is enough: the party is on its way out
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def open_transport(cfg: Config, rank: int, timeout_s: float) -> Transport:
    """Connect to the other parties within ``timeout_s``: the TLS mesh with transport.kind=tls, else
    torch.distributed's process group (its rendezvous from MASTER_ADDR and MASTER_PORT, as the launchers and
    torchrun set them)."""
    if cfg.transport.kind == "tls":
        return TLSMesh.from_config(cfg, rank, timeout_s)
    dist.init_process_group(process_group_backend(cfg), rank=rank, world_size=cfg.parties,
                            timeout=timedelta(seconds=timeout_s))
    return TorchTransport()


def _join(cfg: Config, rank: int, progress: Progress) -> tuple[Transport, Watchdog | None]:
    """Connect to the other parties; they have SETUP_FACTOR x train.peer_timeout_s to join. Over the process group
    a watchdog names a silent party after peer_timeout_s, and the collectives' own timeout is only the backstop.
    The TLS mesh has no shared store: it raises PeerFailure for a peer silent for its whole timeout."""
    timeout_s = SETUP_FACTOR * cfg.train.peer_timeout_s
    try:
        transport = open_transport(cfg, rank, timeout_s)
    except dist.DistError as e:
        error_line(rank, f"not every party joined within {timeout_s:g} s ({type(e).__name__}): start all "
                   f"{cfg.parties} parties, with the same --config and --set options")
        raise SystemExit(ExitCode.PEER_LOST) from None
    if cfg.transport.kind == "tls":
        return transport, None
    store = dist.distributed_c10d._get_default_store().clone()  # a connection of its own, for its own thread
    return transport, Watchdog(store, rank, cfg.parties, cfg.train.peer_timeout_s, progress)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pcmoe_engine.train", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors (pcmoe train's parties)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = load_config(args.config, args.overrides, parties=world if "WORLD_SIZE" in os.environ else None,
                          preset=args.preset)
    except ValueError as e:
        sys.exit(f"pcmoe: error: {e}")
    if cfg.parties != world:
        sys.exit(f"pcmoe: error: parties={cfg.parties} needs one process per party: run `pcmoe train --parties "
                 f"{cfg.parties}` or `torchrun --nproc-per-node {cfg.parties} -m pcmoe_engine.train`")
    if rank == 0 and not args.quiet:
        say(start_line(cfg))
    progress, transport, watchdog = Progress(resume_command(argv)), None, None
    previous = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
    try:
        if world > 1:
            transport, watchdog = _join(cfg, rank, progress)
        train(cfg, rank, transport, args.quiet, progress)
        if watchdog is not None:
            if not watchdog.claim("done"):
                _await_watchdog()
            watchdog.leave()  # party 0 also waits for the others' files: their heartbeats say done once written
        elif transport is not None:
            transport.barrier()  # carries no data: it only waits for every party's files
        if rank == 0:
            summary = merge_run(cfg)
            if not args.quiet:
                say(summary_text(summary, cfg.run_dir))
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 -- every other way out becomes one line and an exit code
        try:
            code, line, state = _stopped(e, progress, watchdog)
        except Interrupted as stop:  # the stop signal came while the party looked for the cause
            code, line, state = _stopped(stop, progress, None)
        if watchdog is not None and not watchdog.claim(state):
            _await_watchdog()
        error_line(rank, line)
        if watchdog is None:
            if transport is not None:
                transport.close()  # tells the other parties this one has gone
            raise SystemExit(code) from None
        watchdog.leave()
        exit_now(code)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if transport is not None:
        transport.close()


def _await_watchdog() -> None:
    """The watchdog has taken this process's way out (a lost peer): it prints the line and ends the process."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    threading.Event().wait()


if __name__ == "__main__":
    main()
