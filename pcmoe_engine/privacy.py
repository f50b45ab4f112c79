"""What a curious expert host can reconstruct of another party's text, with and without the defences, next to
the federated baseline (FedSGD) in which published gradient attacks succeed. One command:

    python -m pcmoe_engine.privacy --preset tiny [--out bench/results/privacy]

writes report.md, results.json and privacy.png under --out. docs/privacy.md states the threat model.

Two parties, the victim (0) and the attacker (1), train together in one process: two private backbones and
the routed experts split round-robin, each party with its own optimizer over its backbone and expert shard, as
``pcmoe train`` runs them. The dispatch is emulated pair by pair (``PartyExperts``): the rows a party routes
to the other party's experts get the wire's defences (``protocol.clip_and_noise``) and are what the host sees;
``test_privacy_harness_dispatch_equals_the_engine`` pins it to the engine's all-local result. The attacker then
watches the victim process its held-out text (forward and backward, as in a training step) and sees, per MoE
layer, the hidden states routed to its experts and the output gradients sent back for them. Attacks:

a. known layers (shared initialisation, the worst case): both parties fine-tune the same starting backbone,
   which the attacker knows. It runs that backbone, and its own, over its own text and labels every observed
   hidden state with the token of the nearest (cosine) state it produced at that layer;
b. learned inversion (private backbones): the attacker trains a linear decoder from its own backbone's hidden
   states to tokens on its own text and applies it to the victim's states;
c. gradient inversion: the output gradient of a pair is dL/d(moe output) of that token; mapped through a final
   norm and LM head the attacker knows (iDLG's label rule), its most negative logit names the next token.

FedSGD baseline: the victim shares its full-model gradient of one sequence (batch 1, as in the published
attacks) with the same attacker, which knows the shared model: the embedding gradient's nonzero rows give the
sequence's tokens, and DLG (soft tokens over those, cosine gradient matching) orders them.

Scores, on the victim's held-out text: token accuracy (position by position; tokens the attacker never saw
count as wrong) and BLEU-4 (clipped 1-4-gram precisions, geometric mean) of the recovered text.
"""

import argparse
import copy
import datetime
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import csrc_triton as ct

from . import source_commit
from .config import Config, DataConfig, ModelConfig, PrivacyConfig, TrainConfig, validate
from .data import Batches, encode, eval_batches, load_tokenizer, party_texts
from .model import Backbone, compute_loss
from .protocol import ExpertShard, clip_and_noise, owned_experts, owner_of
from .rng import seeded
from .party import build_optimizer, lr_at

__all__ = ["PRESETS", "Preset", "PartyExperts", "token_accuracy", "bleu", "token_set_recall", "collaborate",
           "observe", "nearest_neighbour_attack", "decoder_attack", "gradient_attack", "fedsgd_attack", "run",
           "main"]

VICTIM, ATTACKER = 0, 1


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
    device: str = "cpu"


PRESETS = {
    "tiny": Preset(model=dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                              expert_intermediate_size=128)),
    "base": Preset(model=dict(), seq_len=128, steps=600, eval_sequences=64, aux_sequences=1024,
                   noise=[0.0, 0.03, 0.1, 0.3, 1.0, 3.0], dlg_sequences=4, dlg_steps=200, device="auto"),
}


# ---------------------------------------------------------------------------------------------------------
# Scores


def token_accuracy(recovered: list[list[int]], true: list[list[int]]) -> float:
    """Fraction of positions where the recovered token is the true one."""
    hits = sum(r == t for rs, ts in zip(recovered, true, strict=True) for r, t in zip(rs, ts, strict=True))
    return hits / sum(len(ts) for ts in true)


def bleu(recovered: list[list[int]], true: list[list[int]], max_n: int = 4) -> tuple[float, list[float]]:
    """Corpus BLEU of recovered against true sequences (equal lengths: no brevity penalty) and its clipped
    n-gram precisions, n = 1..max_n. Unseen positions (-1) match nothing."""
    precisions = []
    for n in range(1, max_n + 1):
        matched = total = 0
        for rs, ts in zip(recovered, true, strict=True):
            grams = Counter(tuple(rs[i:i + n]) for i in range(len(rs) - n + 1) if -1 not in rs[i:i + n])
            truth = Counter(tuple(ts[i:i + n]) for i in range(len(ts) - n + 1))
            matched += sum(min(c, truth[g]) for g, c in grams.items())
            total += max(0, len(rs) - n + 1)
        precisions.append(matched / total if total else 0.0)
    score = math.exp(sum(math.log(p) for p in precisions) / max_n) if min(precisions) > 0 else 0.0
    return score, precisions


def token_set_recall(recovered: list[list[int]], true: list[list[int]]) -> float:
    """Per sequence, the fraction of its distinct tokens found anywhere in the recovered one (a bag of words,
    order ignored); averaged over sequences."""
    return sum(len(set(r) & set(t)) / len(set(t)) for r, t in zip(recovered, true, strict=True)) / len(true)


def _scores(recovered: torch.Tensor, true: torch.Tensor) -> dict:
    rec, tru = recovered.tolist(), true.tolist()
    score, precisions = bleu(rec, tru)
    return {"token_accuracy": token_accuracy(rec, tru), "bleu4": score, "ngram_precisions": precisions,
            "token_set_recall": token_set_recall(rec, tru)}


# ---------------------------------------------------------------------------------------------------------
# Two parties in one process


class PartyExperts:
    """One party's routed experts in one process, pair by pair: experts of every shard, and the pairs routed
    to another party's experts treated as the wire treats them (defended out, gradients defended back).

    With ``watch`` set, records what the other party sees of this one: per layer, the token of each pair it
    hosts, the hidden row it receives and (after backward) the output gradient it is sent.
    """

    def __init__(self, shards: list[ExpertShard], party: int, privacy: PrivacyConfig, seed: int):
        self.shards, self.party, self.privacy = shards, party, privacy
        parties, num_experts = len(shards), shards[0].num_experts
        device = shards[0].w_down[0].device
        order = [e for p in range(parties) for e in owned_experts(p, parties, num_experts)]
        self.position = torch.empty(num_experts, dtype=torch.int64, device=device)
        self.position[order] = torch.arange(num_experts, device=device)
        self.generator = torch.Generator(device).manual_seed(seeded(seed, "privacy", party).initial_seed())
        self.watch: list | None = None

    def weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert's weights of a layer, in global expert order."""
        gate_up = torch.cat([s.w_gate_up[layer] for s in self.shards])[self.position]
        down = torch.cat([s.w_down[layer] for s in self.shards])[self.position]
        return gate_up, down

    def __call__(self, layer, x, weights, expert_ids, concurrent=None):
        tokens, k = expert_ids.shape
        expert = expert_ids.reshape(-1).long()
        away = owner_of(expert, len(self.shards)) != self.party
        rows = x.repeat_interleave(k, dim=0)  # pair (t, j) is row t * k + j
        p = self.privacy
        if p.hidden_clip > 0:  # the host computes on the noisy rows; the gradient passes straight through
            sent = rows.detach().clone()
            sent[away] = clip_and_noise(sent[away], p.hidden_clip, p.hidden_noise, self.generator)
            rows = rows + (sent - rows.detach())
        y = ct.grouped_mlp(rows, expert, *self.weights(layer))
        if self.watch is not None and away.any():
            seen = {"layer": layer, "token": away.nonzero()[:, 0] // k, "hidden": rows.detach()[away]}
            self.watch.append(seen)
            if y.requires_grad:  # the gradient the host gets: after the defence below
                y.register_hook(lambda grad, seen=seen: seen.update(grad=grad[away].detach().clone()))
        if p.grad_clip > 0:
            y = _DefendGrad.apply(y, away, p.grad_clip, p.grad_noise, self.generator)
        out = (y.view(tokens, k, -1) * weights.unsqueeze(-1).to(y.dtype)).sum(1)
        return out, concurrent() if concurrent is not None else None


class _DefendGrad(torch.autograd.Function):
    """Identity forward; backward clips and noises the gradients of the rows bound for other parties."""

    @staticmethod
    def forward(ctx, y, away, clip, noise, generator):
        ctx.defence = away, clip, noise, generator
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        away, clip, noise, generator = ctx.defence
        grad = grad.clone()
        grad[away] = clip_and_noise(grad[away], clip, noise, generator)
        return grad, None, None, None, None


@dataclass
class Collaboration:
    """The outcome of a joint training run, as the attacks need it."""
    backbones: list[Backbone]
    shards: list[ExpertShard]
    start: Backbone  # the victim's starting backbone (the attacker's too, under shared initialisation)
    losses: list[float]  # the victim's training loss per step
    eval_loss: float  # the victim's held-out loss at the end, through the defended wire


def _config(preset: Preset) -> Config:
    model = {**asdict(ModelConfig()), **preset.model}
    return validate(Config(parties=2, model=ModelConfig(**model), data=DataConfig(seq_len=preset.seq_len),
                           train=TrainConfig(steps=preset.steps, batch_size=preset.batch_size, lr=preset.lr,
                                             warmup_steps=max(1, preset.steps // 10))))


def collaborate(cfg: Config, texts: list[torch.Tensor], eval_tokens: torch.Tensor, shared_init: bool,
                privacy: PrivacyConfig, device: torch.device) -> Collaboration:
    """Train both parties together for cfg.train.steps, each on its own text; under ``shared_init`` both
    backbones start from the same weights (the victim's), else each from its own seed."""
    t = cfg.train
    backbones, shards, experts, optimizers, batches = [], [], [], [], []
    for party in range(cfg.parties):
        backbone = Backbone(cfg.model)
        backbone.init_weights(seeded(t.seed, "backbone", VICTIM if shared_init else party))
        shard = ExpertShard(cfg.model, party, cfg.parties)
        shard.init_weights(t.seed)
        backbones.append(backbone.to(device))
        shards.append(shard.to(device))
        batches.append(Batches(texts[party], cfg.data.seq_len, t.batch_size, seed=(t.seed, "data", party)))
    start = copy.deepcopy(backbones[VICTIM])
    for party in range(cfg.parties):
        experts.append(PartyExperts(shards, party, privacy, t.seed))
        optimizers.append(build_optimizer(cfg, (backbones[party], shards[party])))
    losses = []
    for step in range(1, t.steps + 1):
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
        for party in range(cfg.parties):  # every party's backward first: the expert gradients sum over parties
            inputs, targets = (b.to(device) for b in batches[party].next())
            logits, routings = backbones[party](inputs, experts[party])
            loss = compute_loss(logits, targets, routings, t.aux_loss_coef, t.z_loss_coef)
            loss.total.backward()
            if party == VICTIM:
                losses.append(loss.ce.item())
        for party, optimizer in enumerate(optimizers):
            torch.nn.utils.clip_grad_norm_([*backbones[party].parameters(), *shards[party].parameters()],
                                           t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        ce = []
        for x, y in eval_batches(eval_tokens, cfg.data.seq_len, t.batch_size, 2):
            logits, routings = backbones[VICTIM](x.to(device), experts[VICTIM])
            ce.append(compute_loss(logits, y.to(device), routings, 0, 0).ce.item())
    return Collaboration(backbones, shards, start, losses, sum(ce) / len(ce))


# ---------------------------------------------------------------------------------------------------------
# What the host sees, and the attacks on it


def observe(run: Collaboration, cfg: Config, inputs: torch.Tensor, targets: torch.Tensor,
            privacy: PrivacyConfig) -> list[dict]:
    """The attacker's view of the victim processing (inputs, targets) as a training batch: per hosted pair,
    the layer, the token's flat position, the hidden row received and the output gradient sent back."""
    experts = PartyExperts(run.shards, VICTIM, privacy, seed=cfg.train.seed + 1)
    experts.watch = []
    logits, routings = run.backbones[VICTIM](inputs, experts)
    compute_loss(logits, targets, routings, cfg.train.aux_loss_coef, cfg.train.z_loss_coef).total.backward()
    for module in (*run.backbones, *run.shards):
        module.zero_grad(set_to_none=True)
    return experts.watch


def _states(backbone: Backbone, shards, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The hidden state of every token at every MoE layer of ``backbone`` (what it would dispatch)."""
    states = []

    def capture(layer, x, weights, expert_ids, concurrent=None):
        states.append(x.detach())
        return full(layer, x, weights, expert_ids, concurrent)

    full = PartyExperts(shards, VICTIM, PrivacyConfig(), seed=0)
    with torch.no_grad():
        for i in range(0, tokens.shape[0], 64):
            backbone(tokens[i:i + 64], capture)
    num_layers = len(backbone.blocks)
    return [torch.cat(states[layer::num_layers]) for layer in range(num_layers)]


def _per_position(watch: list[dict], key: str, num_tokens: int, layers: list[int]) -> dict[int, tuple]:
    """Per layer: (positions seen, the mean observed row of each): a host that gets a token twice (two of its
    experts chosen) averages the copies."""
    seen = {}
    for layer in layers:
        parts = [w for w in watch if w["layer"] == layer]
        if not parts:
            continue
        token = torch.cat([w["token"] for w in parts])
        rows = torch.cat([w[key] for w in parts]).float()
        sums = torch.zeros(num_tokens, rows.shape[1], device=rows.device).index_add_(0, token, rows)
        counts = torch.bincount(token, minlength=num_tokens)
        positions = counts.nonzero()[:, 0]
        seen[layer] = (positions, sums[positions] / counts[positions, None])
    return seen


def _assemble(guesses: dict[int, tuple], order: list[int], num_tokens: int, device) -> torch.Tensor:
    """One guess per position, from the first layer in ``order`` that saw it; -1 where none did."""
    recovered = torch.full((num_tokens,), -1, dtype=torch.int64, device=device)
    for layer in reversed(order):
        if layer in guesses:
            positions, tokens = guesses[layer]
            recovered[positions] = tokens
    return recovered


def nearest_neighbour_attack(watch, references: list[Backbone], shards, aux: torch.Tensor, shape) -> torch.Tensor:
    """(a) Label each observed hidden row with the token of the most similar state the reference backbones
    produce on the attacker's own text at the same layer; earliest layer first."""
    num_tokens = shape[0] * shape[1]
    layers = list(range(len(references[0].blocks)))
    tables = [_states(ref, shards, aux[:, :-1]) for ref in references]
    aux_tokens = aux[:, :-1].reshape(-1).repeat(len(references))
    guesses = {}
    for layer, (positions, rows) in _per_position(watch, "hidden", num_tokens, layers).items():
        table = F.normalize(torch.cat([states[layer] for states in tables]), dim=-1)
        guesses[layer] = (positions, aux_tokens[(F.normalize(rows, dim=-1) @ table.T).argmax(1)])
    return _assemble(guesses, layers, num_tokens, aux.device).view(shape)


def decoder_attack(watch, attacker: Backbone, shards, aux: torch.Tensor, shape) -> torch.Tensor:
    """(b) Per layer, a linear decoder from the attacker's own hidden states to tokens (ridge regression onto
    one-hot tokens, fitted on its own text), applied to the victim's rows; earliest layer first."""
    num_tokens = shape[0] * shape[1]
    layers = list(range(len(attacker.blocks)))
    states = _states(attacker, shards, aux[:, :-1])
    labels = aux[:, :-1].reshape(-1)
    guesses = {}
    for layer, (positions, rows) in _per_position(watch, "hidden", num_tokens, layers).items():
        x = F.pad(states[layer], (0, 1), value=1.0)  # a bias column
        one_hot_product = torch.zeros(x.shape[1], attacker.cfg.vocab_size, device=x.device).index_add_(1, labels, x.T)
        gram = x.T @ x + 1e-3 * x.shape[0] * torch.eye(x.shape[1], device=x.device)
        decoder = torch.linalg.solve(gram, one_hot_product)
        guesses[layer] = (positions, (F.pad(rows, (0, 1), value=1.0) @ decoder).argmax(1))
    return _assemble(guesses, layers, num_tokens, aux.device).view(shape)


def gradient_attack(watch, reference: Backbone, shape) -> torch.Tensor:
    """(c) iDLG's label rule on the output gradients sent back to the host: through the reference's final
    norm and LM head, the next token is the one whose logit gradient is most negative; last layer first."""
    num_tokens = shape[0] * shape[1]
    layers = list(range(len(reference.blocks)))
    head = (reference.lm_head.weight * reference.norm.weight).detach()
    head = head / head.norm(dim=1, keepdim=True)
    guesses = {layer: (positions, (rows @ head.T).argmin(1))
               for layer, (positions, rows) in _per_position(watch, "grad", num_tokens, layers).items()}
    return _assemble(guesses, layers[::-1], num_tokens, head.device).view(shape)


def fedsgd_attack(run: Collaboration, cfg: Config, sequence: torch.Tensor, steps: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The federated baseline: the victim's full-model gradient of one sequence, known model (FedSGD shares
    it). Tokens from the embedding gradient's nonzero rows; their order by DLG (soft tokens over those rows,
    cosine gradient matching, Adam). Returns the recovered inputs and the recovered token set."""
    # On the CPU, where the experts and router run PyTorch code that has a double backward (DLG needs one).
    backbone, shards = copy.deepcopy(run.backbones[VICTIM]).cpu(), [copy.deepcopy(s).cpu() for s in run.shards]
    sequence = sequence.cpu()
    experts = PartyExperts(shards, VICTIM, PrivacyConfig(), seed=0)
    params = [*backbone.parameters(), *shards[0].parameters(), *shards[1].parameters()]
    t = cfg.train
    inputs, targets = sequence[None, :-1], sequence[None, 1:]

    def loss_of(logits, routings, target):
        return compute_loss(logits, target, routings, t.aux_loss_coef, t.z_loss_coef).total

    true = torch.autograd.grad(loss_of(*backbone(inputs, experts), targets), params)
    bag = (true[0].abs().sum(1) > 0).nonzero()[:, 0]  # params[0] is the embedding: rows of the tokens fed in
    length, vocab = inputs.shape[1], cfg.model.vocab_size
    # Soft tokens for the inputs and the last target, over the recovered set; the embedding's output replaced.
    scores = torch.zeros(length + 1, bag.numel(), device=sequence.device, requires_grad=True)
    optimizer = torch.optim.Adam([scores], lr=0.1)
    soft = {}  # the soft inputs' embedding gradient is the soft analogue of the victim's (weights not detached)
    hook = backbone.embed.register_forward_hook(
        lambda module, args, out: (soft["tokens"][:length] @ module.weight[bag])[None])
    true_flat = torch.cat([g.flatten() for g in true])
    for _ in range(steps):
        soft["tokens"] = scores.softmax(-1)
        soft_targets = torch.zeros(length, vocab, device=scores.device).index_copy(1, bag, soft["tokens"][1:])
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            logits, routings = backbone(inputs, experts)
        aux = compute_loss(logits, targets, routings, t.aux_loss_coef, t.z_loss_coef)  # routing terms only
        loss = (F.cross_entropy(logits.view(-1, vocab), soft_targets) + t.aux_loss_coef * aux.load_balancing
                + t.z_loss_coef * aux.z)
        dummy = torch.autograd.grad(loss, params, create_graph=True)
        distance = 1 - F.cosine_similarity(torch.cat([g.flatten() for g in dummy]), true_flat, dim=0)
        optimizer.zero_grad()
        distance.backward(inputs=[scores])
        optimizer.step()
    hook.remove()
    return bag[scores[:length].argmax(-1)], bag


# ---------------------------------------------------------------------------------------------------------
# The evaluation


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _windows(tokens: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """The first ``count`` consecutive windows of seq_len + 1 tokens."""
    if count * (seq_len + 1) > tokens.numel():
        raise ValueError(f"{count} sequences of {seq_len + 1} tokens need more than the {tokens.numel()} tokens "
                         "there are: lower the preset's sequence counts or seq_len")
    return torch.cat([x for x, _ in eval_batches(tokens, seq_len + 1, count, 1)])


def run(preset: Preset, log=lambda message: print(message, flush=True)) -> dict:
    """Every attack and the defence sweep; returns the results (the report's numbers)."""
    cfg = _config(preset)
    device = _device(preset.device)
    tokenizer = load_tokenizer(cfg.data, cfg.model.vocab_size)
    (victim_text, victim_eval), (attacker_text, _) = (party_texts(cfg, p) for p in (VICTIM, ATTACKER))
    texts = [encode(tokenizer, victim_text), encode(tokenizer, attacker_text)]
    held_out = _windows(encode(tokenizer, victim_eval), cfg.data.seq_len, preset.eval_sequences).to(device)
    aux = _windows(texts[ATTACKER], cfg.data.seq_len, preset.aux_sequences).to(device)
    inputs, targets = held_out[:, :-1], held_out[:, 1:]
    shape = tuple(inputs.shape)
    most_frequent = torch.bincount(aux.reshape(-1)).argmax()
    results = {"preset": asdict(preset), "config": cfg.to_dict(), "rows": [], "sweep": []}
    results["rows"].append({"attack": "chance (most frequent token)", "setting": "-", "target": "inputs",
                            **_scores(torch.full(shape, most_frequent.item()), inputs.cpu())})

    def attack_rows(run_: Collaboration, setting: str, privacy: PrivacyConfig, which: tuple[str, ...]) -> dict:
        watch = observe(run_, cfg, inputs, targets, privacy)
        seen = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=device)
        for w in watch:
            seen[w["token"]] = True
        known = [run_.start, run_.backbones[ATTACKER]] if setting == "shared init" else [run_.backbones[ATTACKER]]
        rows = {}
        if "a" in which:
            rows["a"] = ("a. nearest neighbour through known layers", "inputs",
                         nearest_neighbour_attack(watch, known, run_.shards, aux, shape))
        if "b" in which:
            rows["b"] = ("b. learned inversion decoder", "inputs",
                         decoder_attack(watch, run_.backbones[ATTACKER], run_.shards, aux, shape))
        if "c" in which:  # scored with whichever known head does best: the worst case for the victim
            best = max((gradient_attack(watch, ref, shape) for ref in known),
                       key=lambda r: (r == targets).float().mean().item())
            rows["c"] = ("c. gradient inversion (iDLG label rule)", "next tokens", best)
        out = {}
        for key, (name, target, recovered) in rows.items():
            truth = inputs if target == "inputs" else targets
            out[key] = {"attack": name, "setting": setting, "target": target, "seen": seen.float().mean().item(),
                        **_scores(recovered.cpu(), truth.cpu())}
        return out

    started = time.perf_counter()
    runs = {}
    for setting, shared in (("shared init", True), ("private init", False)):
        runs[setting] = collaborate(cfg, texts, encode(tokenizer, victim_eval), shared, PrivacyConfig(), device)
        log(f"{setting}: victim loss {runs[setting].losses[0]:.3f} -> {runs[setting].losses[-1]:.3f} "
            f"({time.perf_counter() - started:.0f} s)")
        for row in attack_rows(runs[setting], setting, PrivacyConfig(), ("a", "b", "c")).values():
            results["rows"].append(row)
            log(f"  {row['attack']:<45} {row['token_accuracy']:.3f} acc, BLEU-4 {row['bleu4']:.3f}")

    # The federated baseline on the shared-init run's victim (FedSGD shares one model; which one is moot).
    recovered, bags = [], []
    for sequence in held_out[:preset.dlg_sequences]:
        tokens, bag = fedsgd_attack(runs["shared init"], cfg, sequence, preset.dlg_steps)
        recovered.append(tokens)
        bags.append(bag.tolist())
    true = inputs[:preset.dlg_sequences].cpu()
    # The attacker knows the token set itself, not just what the ordered recovery kept of it.
    results["rows"].append({"attack": "FedSGD: embedding-gradient rows + DLG", "setting": "shared model, batch 1",
                            "target": "inputs", "seen": 1.0, **_scores(torch.stack(recovered), true),
                            "token_set_recall": token_set_recall(bags, true.tolist()),
                            "token_set_exact": sum(set(b) == set(t) for b, t in zip(bags, true.tolist())) / len(bags)})
    row = results["rows"][-1]
    log(f"  {row['attack']:<45} {row['token_accuracy']:.3f} acc, BLEU-4 {row['bleu4']:.3f}")

    # Defence sweep, shared initialisation (the worst case): clip at the median norm of the undefended rows.
    watch = observe(runs["shared init"], cfg, inputs, targets, PrivacyConfig())
    hidden_clip = torch.cat([w["hidden"] for w in watch]).norm(dim=1).median().item()
    grad_clip = torch.cat([w["grad"] for w in watch]).norm(dim=1).median().item()
    results["clip"] = {"hidden": hidden_clip, "grad": grad_clip}
    for noise in preset.noise:
        privacy = PrivacyConfig(hidden_clip, noise, grad_clip, noise) if noise > 0 else PrivacyConfig()
        run_ = runs["shared init"] if noise == 0 else collaborate(cfg, texts, encode(tokenizer, victim_eval),
                                                                 True, privacy, device)
        scored = attack_rows(run_, "shared init", privacy, ("a", "c"))
        point = {"noise": noise, "final_loss": sum(run_.losses[-10:]) / len(run_.losses[-10:]),
                 "eval_loss": run_.eval_loss, "a": scored["a"]["token_accuracy"], "a_bleu4": scored["a"]["bleu4"],
                 "c": scored["c"]["token_accuracy"], "c_bleu4": scored["c"]["bleu4"]}
        results["sweep"].append(point)
        log(f"noise {noise}: victim loss {point['final_loss']:.3f} (eval {point['eval_loss']:.3f}), attack a "
            f"{point['a']:.3f}, c {point['c']:.3f} ({time.perf_counter() - started:.0f} s)")
    results["seconds"] = time.perf_counter() - started
    return results


# ---------------------------------------------------------------------------------------------------------
# Report


def write_report(results: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    p, m = results["preset"], results["config"]["model"]
    lines = [
        "# Privacy evaluation (measured)", "",
        f"`{command}` on {results['device']}, commit {results['commit']}, {results['date']}, "
        f"{results['seconds']:.0f} s. Raw numbers: `results.json`; threat model: `docs/privacy.md`.", "",
        f"Model: {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_experts']} experts top-{m['top_k']}, "
        f"vocab {m['vocab_size']}; 2 parties trained together for {p['steps']} steps (batch {p['batch_size']} x "
        f"{p['seq_len']} tokens). Attacked: {p['eval_sequences']} held-out sequences of the victim "
        f"({p['eval_sequences'] * p['seq_len']} tokens); the attacker's own text: {p['aux_sequences']} sequences.",
        "", "| attack | setting | target | tokens seen | token accuracy | BLEU-4 | 1-/2-/3-/4-gram precision | "
        "token set recall |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        seen = f"{r['seen']:.0%}" if "seen" in r else "-"
        grams = " / ".join(f"{x:.2f}" for x in r["ngram_precisions"])
        lines.append(f"| {r['attack']} | {r['setting']} | {r['target']} | {seen} | {r['token_accuracy']:.3f} | "
                     f"{r['bleu4']:.3f} | {grams} | {r['token_set_recall']:.2f} |")
    fedsgd = results["rows"][-1]
    lines += ["", f"Tokens seen: positions of which the attacker received at least one row. Token set recall: the "
              f"fraction of a sequence's distinct tokens found anywhere in the recovery (order ignored). FedSGD: "
              f"the embedding gradient gave the exact token set of {fedsgd['token_set_exact']:.0%} of the "
              f"{p['dlg_sequences']} attacked sequences (its token set recall); DLG ({p['dlg_steps']} steps) "
              "orders them (its accuracy and n-grams). Known layers: under shared initialisation the victim's "
              "starting backbone and the attacker's own, else the attacker's own; attack c reports whichever "
              "known head scores best (the worst case for the victim)."]
    c = results["clip"]
    lines += ["", f"Defence sweep (shared initialisation): dispatched hidden states clipped to L2 norm "
              f"{c['hidden']:.3g} and returned output gradients to {c['grad']:.3g} (the medians of the undefended "
              "rows), then Gaussian noise of std noise x clip per coordinate; victim loss = mean training loss of "
              "its last 10 steps, eval = held-out loss through the defended wire.", "",
              "| noise | victim train loss | victim eval loss | attack a accuracy | a BLEU-4 | attack c accuracy "
              "| c BLEU-4 |", "|---|---|---|---|---|---|---|"]
    for s in results["sweep"]:
        lines.append(f"| {s['noise']} | {s['final_loss']:.3f} | {s['eval_loss']:.3f} | {s['a']:.3f} | "
                     f"{s['a_bleu4']:.3f} | {s['c']:.3f} | {s['c_bleu4']:.3f} |")
    lines += ["", "![attack success against training loss](privacy.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    _plot(results, out / "privacy.png")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["sweep"]
    noise = [s["noise"] for s in sweep]
    x = list(range(len(noise)))
    fedsgd = next(r for r in results["rows"] if r["attack"].startswith("FedSGD"))
    chance = results["rows"][0]["token_accuracy"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(x, [s["a"] for s in sweep], "o-", label="a. known layers (shared init)")
    left.plot(x, [s["c"] for s in sweep], "s-", label="c. gradient inversion (shared init)")
    left.axhline(fedsgd["token_accuracy"], color="red", ls="--", label="FedSGD + DLG, no defence")
    left.axhline(chance, color="gray", ls=":", label="chance (most frequent token)")
    left.set(xticks=x, xticklabels=[str(n) for n in noise], xlabel="noise multiplier", ylabel="token accuracy",
             ylim=(0, 1.05), title="attack success vs defence")
    left.legend(fontsize=8)
    right.plot(x, [s["final_loss"] for s in sweep], "o-", label="victim train loss")
    right.plot(x, [s["eval_loss"] for s in sweep], "s-", label="victim held-out loss")
    right.set(xticks=x, xticklabels=[str(n) for n in noise], xlabel="noise multiplier", ylabel="loss",
              title=f"cost: loss after {results['preset']['steps']} steps")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pcmoe_engine.privacy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)} (default tiny, CPU)")
    parser.add_argument("--out", default="bench/results/privacy", help="report directory")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the matrices are small, more threads mostly contend)")
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.exit(2, f"pcmoe.privacy: error: unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}\n")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.exit(2, "pcmoe.privacy: error: the report's plot needs matplotlib: pip install 'pcmoe[bench]'\n")
    if args.threads < 1:
        parser.exit(2, f"pcmoe.privacy: error: --threads={args.threads} must be at least 1\n")
    torch.set_num_threads(args.threads)
    os.environ.pop("TRITON_INTERPRET", None)  # CPU tensors run csrc_triton's PyTorch references
    preset = PRESETS[args.preset]
    try:
        results = run(preset)
    except ValueError as e:
        parser.exit(2, f"pcmoe.privacy: error: {e}\n")
    device = _device(preset.device)
    results.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                   commit=source_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   torch=torch.__version__, threads=torch.get_num_threads())
    command = " ".join(["python -m pcmoe_engine.privacy", *(argv if argv is not None else sys.argv[1:])])
    write_report(results, Path(args.out), command)
    print(f"report: {Path(args.out) / 'report.md'}")


if __name__ == "__main__":
    main()
