"""Two parties training together through the engine itself, and what the host records.

``collaborate`` runs the victim (party 0) and the attacker (party 1) as two processes over gloo on 127.0.0.1
(on the CPU, or both on one GPU as ``train.device=cuda`` runs them): each is an engine ``Party`` with its own
data, backbone, expert shard and optimizer, stepping through the real ``Wire`` and ``DistributedExperts``
with the configured defences. Processes, not threads: the parties' blocking exchanges must run concurrently,
and in one process autograd's single worker thread per device would run both parties' backward exchanges.

After training, ``observe``, twice: the victim processes held-out text as a training batch (forward and
backward, no update) while the attacker processes a batch of its own, and records through its wire's observer
what it receives from the victim ("hidden" rows with their "expert_mask", and "output_grad" rows in backward):
once with the victim's rows in its plain wire order (token order) and once in the secret shuffled order
(privacy.shuffle, the default). A hidden row comes once per (token, host) and its mask says which of the host's
experts it went to, so the host expands it into one row per (token, expert) pair, as its experts ran it. The
victim knows which of its (token, expert) pairs each pair row is (the plan it sent with,
``DistributedExperts.plan_observer``); ``join`` pairs the two records row by row, offline. Nothing of the
victim's but what crossed the wire reaches the attacks, except where a report row says so (the FedSGD baseline,
which shares the whole model, and the positions that attacks d and e are given).
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
from pcmoe_engine.faults import exit_now
from pcmoe_engine.dispatch import expand
from pcmoe_engine.model import Backbone
from pcmoe_engine.party import Party, initial_backbone
from pcmoe_engine.protocol import DistributedExperts, ExpertShard, Wire

__all__ = ["VICTIM", "ATTACKER", "Preset", "PRESETS", "config", "finetuning", "pretrain", "windows", "Collaboration",
           "collaborate", "observe", "join", "all_experts"]

VICTIM, ATTACKER = 0, 1
OBSERVED_KINDS = ("hidden", "expert_mask", "output_grad")  # what the victim sends a host about its tokens


@dataclass
class Preset:
    model: dict  # ModelConfig overrides
    seq_len: int = 32
    batch_size: int = 8
    steps: int = 300  # training steps of the public model, and of the private-init run (from scratch)
    lr: float = 3e-3
    finetune_steps: int = 100  # joint fine-tuning steps from the public model (shared initialisation)
    finetune_lr: float = 1e-3
    eval_sequences: int = 16  # victim held-out sequences attacked
    aux_sequences: int = 256  # attacker's own sequences for its lookup tables and decoder
    # the defence sweep's noise multipliers
    noise: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3, 0.5, 0.7, 1.0, 3.0])
    dlg_sequences: int = 4
    dlg_steps: int = 100
    refine_sequences: int = 16  # victim sequences attacks d and e optimise (the first ones)
    refine_steps: int = 100  # their optimisation steps
    routing_steps: int = 400  # training steps of the routing attack's inverter
    # train.seed of the extra runs that measure the run-to-run spread (phases seed=<k>[...]): each a new data split
    # (victim's held-out text, attacker's text), public model, fine-tuning order and inverter, or private start
    spread_seeds: list[int] = field(default_factory=list)
    device: str = "cpu"  # auto: both parties on this machine's GPU (over gloo) if it has one


PRESETS = {
    "tiny": Preset(model=dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                              expert_intermediate_size=128), spread_seeds=[1, 2, 3]),
    "base": Preset(model=dict(), seq_len=128, steps=600, finetune_steps=200, eval_sequences=64, aux_sequences=1024,
                   noise=[0.0, 0.1, 0.3, 0.5, 1.0], dlg_sequences=4, dlg_steps=200, refine_sequences=4,
                   spread_seeds=[1, 2], device="auto"),
}


def config(preset: Preset, seed: int = 0) -> Config:
    """The engine configuration of a preset's two parties (fp32, no checkpoints), train.seed ``seed``."""
    model = {**asdict(ModelConfig()), **preset.model}
    device = preset.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    train = TrainConfig(steps=preset.steps, batch_size=preset.batch_size, lr=preset.lr,
                        warmup_steps=max(1, preset.steps // 10), eval_batches=8, checkpoints=False, device=device,
                        precision="fp32", seed=seed)
    return validate(Config(parties=2, model=ModelConfig(**model), data=DataConfig(seq_len=preset.seq_len),
                           train=train))


def finetuning(cfg: Config, preset: Preset) -> Config:
    """The configuration of the parties' joint fine-tuning of a public model."""
    steps = preset.finetune_steps
    return replace(cfg, train=replace(cfg.train, steps=steps, lr=preset.finetune_lr, warmup_steps=max(1, steps // 10)))


def pretrain(cfg: Config, text: str) -> dict:
    """The public model both parties fine-tune under shared initialisation: one party (nothing crosses) trains
    the model from its seed on ``text`` for cfg.train.steps. Its backbone and every expert (state dicts)."""
    with tempfile.TemporaryDirectory(prefix="pcmoe-public-") as scratch:
        path = Path(scratch) / "public.txt"
        path.write_text(text)
        one = validate(replace(cfg, parties=1, data=replace(cfg.data, party_paths=[str(path)]),
                               train=replace(cfg.train, out_dir=scratch)))
        party = Party(one, 0)
        for _ in range(one.train.steps):
            party.step()
        return {"backbone": party.backbone.state_dict(), "experts": party.shard.state_dict()}


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


def observe(party: Party, observed: torch.Tensor, shuffle: bool) -> dict:
    """One forward and backward as in a training step, without the update: the victim on ``observed``
    ([sequences, seq_len + 1] windows), its rows in the secret order or not (``shuffle``), the attacker on a batch
    of its own. The victim returns ``sent``: per MoE layer, the pair (token * top_k + choice) of each pair row it
    sent the attacker, in the order sent; the attacker ``received``: per (kind, layer), the rows of OBSERVED_KINDS
    its wire received from the victim."""
    received, sent = {}, {}

    def record(kind: str, layer: int, rows: torch.Tensor, recv_splits: list[int]) -> None:
        if kind in OBSERVED_KINDS:
            start = sum(recv_splits[:VICTIM])
            received[kind, layer] = rows[start:start + recv_splits[VICTIM]].detach().clone()

    def plan_sent(layer: int, plan, rows) -> None:  # the pairs hosted by the attacker, in the order sent
        sent[layer] = plan.sorted_pair[plan.offsets[ATTACKER]:plan.offsets[ATTACKER + 1]].long()

    if party.rank == ATTACKER:
        party.wire.observer = record
        batch = party.batches.next()
    else:
        party.experts.plan_observer = plan_sent
        default, party.wire.shuffle = party.wire.shuffle, shuffle
        batch = observed[:, :-1], observed[:, 1:]
    party.forward_backward(*batch)
    party.wire.observer = party.experts.plan_observer = None
    party.optimizer.zero_grad(set_to_none=True)
    if party.rank == ATTACKER:
        return {"received": received}
    party.wire.shuffle = default
    return {"sent": [sent[layer] for layer in sorted(sent)]}


def join(sent: list[torch.Tensor], received: dict, top_k: int) -> list[dict]:
    """The attacker's view of the victim's batch: per MoE layer that hosted any of its pairs, in the order the
    rows arrived: each pair row's pair, token (flat position), hidden row and output gradient, and each hidden
    row's token and ``mask`` (the bits of the host's local experts it picked, as an integer)."""
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
            token = pairs // top_k
            row_token = torch.empty(rows.shape[0], dtype=torch.int64, device=hidden.device)
            row_token[pair_row] = token
            value = sum(mask[:, j].long() << (8 * j) for j in range(mask.shape[1]))
            watch.append({"layer": layer, "pair": pairs, "token": token, "hidden": hidden, "grad": grad,
                          "row_token": row_token, "mask": value})
    return watch

@dataclass
class Collaboration:
    """The outcome of a joint training run, as the attacks need it."""
    backbones: list[Backbone]
    shards: list[ExpertShard]
    start: Backbone  # the victim's starting backbone (the attacker's too, under shared initialisation)
    losses: list[float]  # the victim's training loss per step
    eval_loss: float  # the victim's held-out loss at the end, through the defended wire
    watch: list[dict]  # what the attacker saw of the victim's observed batch, rows shuffled (``join``)
    watch_in_order: list[dict]  # the same batch observed with the victim's rows in token order


def _start_from(party: Party, start: dict) -> None:
    """The party's backbone and its own experts from ``start`` (a backbone and a whole shard, as pretrain's)."""
    party.load_backbone(start["backbone"])
    with torch.no_grad():
        for name, weights in party.shard.named_parameters():
            weights.copy_(start["experts"][name][party.shard.expert_ids])
    if party.cfg.privacy.public_correction:
        layers = range(len(party.shard.w_down))
        party.experts.public_experts = tuple([start["experts"][f"{part}.{layer}"].to(party.device) for layer in layers]
                                             for part in ("w_gate_up", "w_down"))


def _party(rank: int, cfg: Config, start: dict | None, observed: torch.Tensor, scratch: str, port: int,
           threads: int) -> None:
    """One party's process: train, evaluate, observe, and leave what the evaluation needs in ``scratch``."""
    torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # both parties are on this machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cfg.parties)
    try:
        party = Party(cfg, rank)
        if start is not None:
            _start_from(party, start)
        losses = [party.step()["loss"] for _ in range(cfg.train.steps)]
        eval_loss = party.evaluate()
        seen = {order: observe(party, observed, order == "shuffled") for order in ("in_order", "shuffled")}
        torch.save({"backbone": party.backbone.state_dict(), "experts": party.shard.state_dict(), "losses": losses,
                    "eval_loss": eval_loss, "seen": seen}, Path(scratch) / f"party{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_now(0)


def collaborate(cfg: Config, start: dict | None, privacy: PrivacyConfig, observed: torch.Tensor,
                threads: int = 1) -> Collaboration:
    """Train both parties together for cfg.train.steps, each on its own text, with ``privacy``'s defences on
    the wire: both from ``start`` (shared initialisation: a public model's backbone and experts, ``pretrain``),
    or, without it, each backbone from its own seed (private initialisation). Then the attacker observes the
    victim processing ``observed`` (see ``observe``)."""
    cfg = replace(cfg, privacy=privacy)
    device = torch.device(cfg.train.device)
    with tempfile.TemporaryDirectory(prefix="pcmoe-privacy-") as scratch:
        cfg = replace(cfg, train=replace(cfg.train, out_dir=scratch))
        start_cpu = None if start is None else {part: {k: v.cpu() for k, v in state.items()}
                                                 for part, state in start.items()}
        mp.spawn(_party, args=(cfg, start_cpu, observed.cpu(), scratch, free_port(), threads), nprocs=cfg.parties)
        states = [torch.load(Path(scratch) / f"party{p}.pt", map_location=device, weights_only=False)
                  for p in range(cfg.parties)]
    backbones, shards = [], []
    for rank, state in enumerate(states):
        backbone, shard = Backbone(cfg.model), ExpertShard(cfg.model, rank, cfg.parties)
        backbone.load_state_dict(state["backbone"])
        shard.load_state_dict(state["experts"])
        backbones.append(backbone.to(device))
        shards.append(shard.to(device))
    initial = initial_backbone(cfg, VICTIM)
    if start is not None:
        initial.load_state_dict(start["backbone"])
    victim, attacker = states[VICTIM], states[ATTACKER]
    watch = {order: join(victim["seen"][order]["sent"], attacker["seen"][order]["received"], cfg.model.top_k)
             for order in ("shuffled", "in_order")}
    return Collaboration(backbones, shards, initial.to(device), victim["losses"], victim["eval_loss"],
                         watch["shuffled"], watch["in_order"])
