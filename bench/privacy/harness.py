"""Two parties training together through the engine itself, and what the host records.

``collaborate`` runs the victim (party 0) and the attacker (party 1) as two processes over gloo on 127.0.0.1
(on the CPU, or both on one GPU as ``train.device=cuda`` runs them): each is an engine ``Party`` with its own
data, backbone, expert shard and optimizer, stepping through the real ``Wire`` and ``DistributedExperts``
with the configured defences. Processes, not threads: the parties' blocking exchanges must run concurrently,
and in one process autograd's single worker thread per device would run both parties' backward exchanges.

After training, ``observe``: the victim processes held-out text as a training batch (forward and backward,
no update) while the attacker processes a batch of its own, and records through its wire's observer what
it receives from the victim ("hidden" rows with their "expert_mask", and "output_grad" rows in backward). A
hidden row comes once per (token, host) and its mask says which of the host's experts it went to, so the
host expands it into one row per (token, expert) pair, as its experts ran it. The victim knows which of its
(token, expert) pairs each pair row is (its wire order, ``DistributedExperts.plan``); ``join`` pairs the two
records row by row, offline. Nothing of the victim's but what crossed the wire
reaches the attacks, except where a report row says so (the FedSGD baseline, which shares the whole model).
"""

import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pcmoe_engine.cli import free_port
from pcmoe_engine.config import Config, DataConfig, ModelConfig, PrivacyConfig, TrainConfig
from pcmoe_engine.validate import validate
from pcmoe_engine.data import eval_batches
from pcmoe_engine.dispatch import expand
from pcmoe_engine.model import Backbone
from pcmoe_engine.party import Party, initial_backbone
from pcmoe_engine.protocol import DistributedExperts, ExpertShard, Wire

__all__ = ["VICTIM", "ATTACKER", "Preset", "PRESETS", "config", "windows", "Collaboration", "collaborate",
           "observe", "join", "all_experts"]

VICTIM, ATTACKER = 0, 1
OBSERVED_KINDS = ("hidden", "expert_mask", "output_grad")  # what the victim sends a host about its tokens


@dataclass
class Preset:
    model: dict  # ModelConfig overrides
    seq_len: int = 32
    batch_size: int = 8
    steps: int = 300  # joint training steps before the attacks
    lr: float = 3e-3
    eval_sequences: int = 16  # victim held-out sequences attacked
    aux_sequences: int = 256  # attacker's own sequences for its lookup tables and decoder
    noise: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3, 1.0, 3.0])  # defence sweep (noise multipliers)
    dlg_sequences: int = 4
    dlg_steps: int = 100
    device: str = "cpu"  # auto: both parties on this machine's GPU (over gloo) if it has one


PRESETS = {
    "tiny": Preset(model=dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                              expert_intermediate_size=128)),
    "base": Preset(model=dict(), seq_len=128, steps=600, eval_sequences=64, aux_sequences=1024,
                   noise=[0.0, 0.03, 0.1, 0.3, 1.0, 3.0], dlg_sequences=4, dlg_steps=200, device="auto"),
}


def config(preset: Preset) -> Config:
    """The engine configuration of a preset's two parties (fp32, no checkpoints)."""
    model = {**asdict(ModelConfig()), **preset.model}
    device = preset.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    train = TrainConfig(steps=preset.steps, batch_size=preset.batch_size, lr=preset.lr,
                        warmup_steps=max(1, preset.steps // 10), eval_batches=2, checkpoints=False, device=device,
                        precision="fp32")
    return validate(Config(parties=2, model=ModelConfig(**model), data=DataConfig(seq_len=preset.seq_len),
                           train=train))


def windows(tokens: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """The first ``count`` consecutive windows of seq_len + 1 tokens."""
    if count * (seq_len + 1) > tokens.numel():
        raise ValueError(f"{count} sequences of {seq_len + 1} tokens need more than the {tokens.numel()} tokens "
                         "there are: lower the preset's sequence counts or seq_len")
    return torch.cat([x for x, _ in eval_batches(tokens, seq_len + 1, count, 1)])


def all_experts(shards: list[ExpertShard], cfg: ModelConfig, device: torch.device | None = None
                ) -> DistributedExperts:
    """Every party's experts in this process (on ``device``, default the shards'): the engine's one-party path
    over the shards put together. For a model known whole (as FedSGD shares it), and for the attacker's own
    text through the experts (whose outputs it gets from the protocol anyway)."""
    whole = ExpertShard(cfg).to(device or shards[0].w_down[0].device)
    with torch.no_grad():
        for shard in shards:
            for layer, (gate_up, down) in enumerate(zip(shard.w_gate_up, shard.w_down, strict=True)):
                whole.w_gate_up[layer][shard.expert_ids] = gate_up.to(whole.w_gate_up[layer].device)
                whole.w_down[layer][shard.expert_ids] = down.to(whole.w_down[layer].device)
    return DistributedExperts(whole, Wire())


def observe(party: Party, observed: torch.Tensor) -> dict:
    """One forward and backward as in a training step, without the update: the victim on ``observed``
    ([sequences, seq_len + 1] windows), the attacker on a batch of its own. The victim returns ``sent``: per
    MoE layer, the pair (token * top_k + choice) of each row it sent to the attacker, in the order sent; the
    attacker ``received``: per (kind, layer), the rows of OBSERVED_KINDS its wire received from the victim."""
    received = {}

    def record(kind: str, layer: int, rows: torch.Tensor, recv_splits: list[int]) -> None:
        if kind in OBSERVED_KINDS:
            start = sum(recv_splits[:VICTIM])
            received[kind, layer] = rows[start:start + recv_splits[VICTIM]].detach().clone()

    if party.rank == ATTACKER:
        party.wire.observer = record
        batch = party.batches.next()
    else:
        batch = observed[:, :-1], observed[:, 1:]
    _, routings = party.forward_backward(*batch)
    party.wire.observer = None
    party.optimizer.zero_grad(set_to_none=True)
    if party.rank == ATTACKER:
        return {"received": received}
    sent = []
    for routing in routings:  # the pairs hosted by the attacker, in wire order
        plan = party.experts.plan(routing.expert_ids)
        sent.append(plan.sorted_pair[plan.offsets[ATTACKER]:plan.offsets[ATTACKER + 1]].long())
    return {"sent": sent}


def join(sent: list[torch.Tensor], received: dict, top_k: int) -> list[dict]:
    """The attacker's view of the victim's batch: per MoE layer that hosted any of its pairs, the pair and the
    token (flat position) of each pair row, the hidden row received for it and the output gradient."""
    watch = []
    for layer, pairs in enumerate(sent):
        rows, grad, mask = received["hidden", layer], received["output_grad", layer], received["expert_mask", layer]
        local_experts = max(1, mask.shape[1] * 8)  # an upper bound suffices: bits past the host's experts are 0
        pair_row, _ = expand(mask, local_experts, grad.shape[0])
        hidden = rows[pair_row]
        if not hidden.shape[0] == grad.shape[0] == pairs.numel():
            raise RuntimeError(f"layer {layer}: the victim sent {pairs.numel()} rows, the attacker received "
                               f"{hidden.shape[0]} hidden and {grad.shape[0]} gradient rows")
        if pairs.numel():
            pairs = pairs.to(hidden.device)
            watch.append({"layer": layer, "pair": pairs, "token": pairs // top_k, "hidden": hidden, "grad": grad})
    return watch


@dataclass
class Collaboration:
    """The outcome of a joint training run, as the attacks need it."""
    backbones: list[Backbone]
    shards: list[ExpertShard]
    start: Backbone  # the victim's starting backbone (the attacker's too, under shared initialisation)
    losses: list[float]  # the victim's training loss per step
    eval_loss: float  # the victim's held-out loss at the end, through the defended wire
    watch: list[dict]  # what the attacker saw of the victim's observed batch (``join``)


def _party(rank: int, cfg: Config, shared_init: bool, observed: torch.Tensor, scratch: str, port: int,
           threads: int) -> None:
    """One party's process: train, evaluate, observe, and leave what the evaluation needs in ``scratch``."""
    torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # both parties are on this machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cfg.parties)
    try:
        party = Party(cfg, rank)
        if shared_init:
            party.load_backbone(initial_backbone(cfg, VICTIM).state_dict())
        losses = [party.step()["loss"] for _ in range(cfg.train.steps)]
        eval_loss = party.evaluate()
        seen = observe(party, observed)
        torch.save({"backbone": party.backbone.state_dict(), "experts": party.shard.state_dict(), "losses": losses,
                    "eval_loss": eval_loss, **seen}, Path(scratch) / f"party{rank}.pt")
    finally:
        dist.destroy_process_group()


def collaborate(cfg: Config, shared_init: bool, privacy: PrivacyConfig, observed: torch.Tensor,
                threads: int = 1) -> Collaboration:
    """Train both parties together for cfg.train.steps, each on its own text, with ``privacy``'s defences on
    the wire; under ``shared_init`` both backbones start from the victim's initial weights, else each from
    its own seed. Then the attacker observes the victim processing ``observed`` (see ``observe``)."""
    cfg = replace(cfg, privacy=privacy)
    device = torch.device(cfg.train.device)
    with tempfile.TemporaryDirectory(prefix="pcmoe-privacy-") as scratch:
        cfg = replace(cfg, train=replace(cfg.train, out_dir=scratch))
        mp.spawn(_party, args=(cfg, shared_init, observed.cpu(), scratch, free_port(), threads), nprocs=cfg.parties)
        states = [torch.load(Path(scratch) / f"party{p}.pt", map_location=device, weights_only=False)
                  for p in range(cfg.parties)]
    backbones, shards = [], []
    for rank, state in enumerate(states):
        backbone, shard = Backbone(cfg.model), ExpertShard(cfg.model, rank, cfg.parties)
        backbone.load_state_dict(state["backbone"])
        shard.load_state_dict(state["experts"])
        backbones.append(backbone.to(device))
        shards.append(shard.to(device))
    victim, attacker = states[VICTIM], states[ATTACKER]
    return Collaboration(backbones, shards, initial_backbone(cfg, VICTIM).to(device), victim["losses"],
                         victim["eval_loss"], join(victim["sent"], attacker["received"], cfg.model.top_k))
