"""What the secret row shuffle (privacy.shuffle) costs, two ways:

    PYTHONPATH=. python bench/shuffle_cost.py --parties 2 --rounds 20 [--set ...] [--out FILE]
    PYTHONPATH=. python bench/shuffle_cost.py --op-only --tokens 8192 --top-k 8 --experts 64 --parties 4

1. steps: ``--parties`` engine Parties (one process each, over gloo on CPUs, NCCL with a GPU each) train the
   configured model, alternating one step with the shuffle and one without, ``--rounds`` times: the median step
   time of each (the first round, warm-up, left out). Same parties, weights and machine state for both, so the
   difference is the shuffle's (plus noise: the report gives both medians and the spread).
2. op (rank 0, on its device): the shuffle alone at one MoE layer's shapes (a micro-batch's tokens x top-k over
   the model's experts and parties): the secret order and the shuffled plan and rows, against the routing work
   the layer does anyway (the wire order and the dispatched rows), medians over repeats. ``--op-only``: only
   this, in this process (on the GPU if there is one), at the shapes given.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment  # noqa: E402
from pcmoe_engine.cli import free_port  # noqa: E402
from pcmoe_engine.config import load_config  # noqa: E402
from pcmoe_engine.dispatch import dispatch_rows, owners, plan_pairs, rows_per_owner, shuffle  # noqa: E402
from pcmoe_engine.party import Party, process_group_backend  # noqa: E402
from pcmoe_engine.protocol import Wire  # noqa: E402


def _timed(fn, device: torch.device, repeats: int = 50) -> float:
    """Median seconds of fn() over ``repeats`` calls after 5 warm-up calls."""
    times = []
    for i in range(repeats + 5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_cost(tokens: int, top_k: int, experts: int, parties: int, device: torch.device) -> dict:
    """Seconds of one layer's routing work (wire order, dispatched rows) and of the shuffle on top of it."""
    ids = torch.rand(tokens, experts, device=device).argsort(1)[:, :top_k].int()
    plan = plan_pairs(ids, parties, experts)
    counts = rows_per_owner(ids, parties, True).tolist()
    rows = dispatch_rows(ids, plan, parties, experts, True, sum(counts))
    wire = Wire(0, parties)

    def routing():
        p = plan_pairs(ids, parties, experts)
        return dispatch_rows(ids, p, parties, experts, True, sum(counts))

    routing_s = _timed(routing, device)
    shuffle_s = _timed(lambda: shuffle(plan, rows, wire.permutation(owners(counts, device))), device)
    return {"tokens": tokens, "top_k": top_k, "experts": experts, "parties": parties, "device": str(device),
            "routing_s": routing_s, "shuffle_s": shuffle_s}


def _party(rank: int, overrides: list[str], parties: int, rounds: int, port: int, out: str) -> None:
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(parties))
    cfg = load_config(None, [*overrides, f"train.steps={2 * rounds}", "train.checkpoints=false"], parties=parties)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // parties))
    dist.init_process_group(process_group_backend(cfg), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=parties)
    try:
        party = Party(cfg, rank)
        times = {True: [], False: []}
        for round_ in range(rounds):
            for shuffled in (True, False):
                party.wire.shuffle = shuffled
                seconds = party.step()["step_time_s"]
                if round_:
                    times[shuffled].append(seconds)
        result = {"party": rank, "shuffled_s": times[True], "unshuffled_s": times[False]}
        if rank == 0:
            m = cfg.model
            tokens = cfg.train.batch_size * cfg.data.seq_len
            result["op"] = op_cost(tokens, m.top_k, m.num_experts, parties, party.device)
            result["config"] = cfg.to_dict()
        Path(out, f"party{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parties", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20, help="steps with and steps without the shuffle")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--op-only", action="store_true", help="only the shuffle op, at --tokens, --top-k, --experts")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    args = parser.parse_args(argv)
    if args.op_only:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        op = op_cost(args.tokens, args.top_k, args.experts, args.parties, device)
        print(json.dumps(op))
        if args.out:
            Path(args.out).write_text(json.dumps({**environment(), "benchmark": "shuffle-op", "op": op}, indent=1))
        return
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    scratch = Path(args.out).with_suffix(".parts") if args.out else Path("/tmp/pcmoe-shuffle-cost")
    scratch.mkdir(parents=True, exist_ok=True)
    mp.spawn(_party, args=(args.overrides, args.parties, args.rounds, free_port(), str(scratch)), nprocs=args.parties)
    parts = [json.loads((scratch / f"party{p}.json").read_text()) for p in range(args.parties)]
    op = parts[0].pop("op")
    report = {**environment(), "benchmark": "shuffle-cost", "rounds": args.rounds, "config": parts[0].pop("config"),
              "per_party": parts, "op": op}
    for p in parts:
        on, off = statistics.median(p["shuffled_s"]), statistics.median(p["unshuffled_s"])
        spread = statistics.quantiles(p["unshuffled_s"], n=4)
        p.update(median_shuffled_s=on, median_unshuffled_s=off, overhead=on / off - 1)
        print(f"party {p['party']}: step {on * 1e3:.1f} ms shuffled, {off * 1e3:.1f} ms not "
              f"({on / off - 1:+.1%}; unshuffled quartiles {spread[0] * 1e3:.1f}-{spread[2] * 1e3:.1f} ms)")
    print(f"op at {op['tokens']} tokens x top-{op['top_k']} of {op['experts']} experts, {op['parties']} parties on "
          f"{op['device']}: shuffle {op['shuffle_s'] * 1e6:.0f} us, the layer's routing work "
          f"{op['routing_s'] * 1e6:.0f} us")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        for p in scratch.iterdir():
            p.unlink()
        scratch.rmdir()


if __name__ == "__main__":
    main()
