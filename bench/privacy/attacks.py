"""The attacks of a curious expert host on what it received (``harness.join``'s watch), and the federated
baseline. Each returns the recovered tokens, [sequences, seq_len], -1 where the host saw nothing.

a. known layers (shared initialisation, the worst case): both parties fine-tune the same starting backbone,
   which the attacker knows. It runs that backbone, and its own, over its own text and labels every observed
   hidden state with the token of the nearest (cosine) state it produced at that layer;
b. learned inversion (private backbones): the attacker trains a linear decoder from its own backbone's hidden
   states to tokens on its own text and applies it to the victim's states;
c. gradient inversion: the output gradient of a pair is dL/d(moe output) of that token; mapped through a final
   norm and LM head the attacker knows (iDLG's label rule), its most negative logit names the next token.

(refine.py refines a's and c's guesses through the known layers, d and e; routing.py reads the expert masks, r.)

FedSGD baseline: the victim shares its full-model gradient of one sequence (batch 1, as in the published
attacks) with the same attacker, which knows the shared model: the embedding gradient's nonzero rows give the
sequence's tokens, and DLG (soft tokens over those, cosine gradient matching) orders them.
"""

import copy

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pcmoe_engine.config import Config
from pcmoe_engine.model import Backbone, compute_loss

from .harness import VICTIM, Collaboration, all_experts

__all__ = ["trace", "hidden_states", "per_position", "assemble", "nearest_neighbour_attack", "decoder_attack",
           "gradient_attack", "fedsgd_attack"]


def trace(backbone: Backbone, shards, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per MoE layer of ``backbone`` on ``tokens`` (through every party's experts): every token's hidden state
    (what it would dispatch) and its routed experts ([tokens, top_k])."""
    states, expert_ids = [], []

    def capture(layer, x, weights, ids, concurrent=None):
        states.append(x.detach())
        expert_ids.append(ids.long())
        return full(layer, x, weights, ids, concurrent)

    full = all_experts(shards, backbone.cfg)
    with torch.no_grad():
        for i in range(0, tokens.shape[0], 64):
            backbone(tokens[i:i + 64], capture)
    num_layers = len(backbone.blocks)
    return ([torch.cat(states[layer::num_layers]) for layer in range(num_layers)],
            [torch.cat(expert_ids[layer::num_layers]) for layer in range(num_layers)])


def hidden_states(backbone: Backbone, shards, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The hidden state of every token at every MoE layer of ``backbone`` (what it would dispatch), through
    every party's experts."""
    return trace(backbone, shards, tokens)[0]


def per_position(watch: list[dict], key: str, num_tokens: int, layers: list[int]) -> dict[int, tuple]:
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


def assemble(guesses: dict[int, tuple], order: list[int], num_tokens: int, device) -> torch.Tensor:
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
    tables = [hidden_states(ref, shards, aux[:, :-1]) for ref in references]
    aux_tokens = aux[:, :-1].reshape(-1).repeat(len(references))
    guesses = {}
    for layer, (positions, rows) in per_position(watch, "hidden", num_tokens, layers).items():
        table = F.normalize(torch.cat([states[layer] for states in tables]), dim=-1)
        guesses[layer] = (positions, aux_tokens[(F.normalize(rows, dim=-1) @ table.T).argmax(1)])
    return assemble(guesses, layers, num_tokens, aux.device).view(shape)


def decoder_attack(watch, attacker: Backbone, shards, aux: torch.Tensor, shape) -> torch.Tensor:
    """(b) Per layer, a linear decoder from the attacker's own hidden states to tokens (ridge regression onto
    one-hot tokens, fitted on its own text), applied to the victim's rows; earliest layer first."""
    num_tokens = shape[0] * shape[1]
    layers = list(range(len(attacker.blocks)))
    states = hidden_states(attacker, shards, aux[:, :-1])
    labels = aux[:, :-1].reshape(-1)
    guesses = {}
    for layer, (positions, rows) in per_position(watch, "hidden", num_tokens, layers).items():
        x = F.pad(states[layer], (0, 1), value=1.0)  # a bias column
        one_hot_product = torch.zeros(x.shape[1], attacker.cfg.vocab_size, device=x.device).index_add_(1, labels, x.T)
        gram = x.T @ x + 1e-3 * x.shape[0] * torch.eye(x.shape[1], device=x.device)
        decoder = torch.linalg.solve(gram, one_hot_product)
        guesses[layer] = (positions, (F.pad(rows, (0, 1), value=1.0) @ decoder).argmax(1))
    return assemble(guesses, layers, num_tokens, aux.device).view(shape)


def gradient_attack(watch, reference: Backbone, shape) -> torch.Tensor:
    """(c) iDLG's label rule on the output gradients sent back to the host: through the reference's final
    norm and LM head, the next token is the one whose logit gradient is most negative; last layer first."""
    num_tokens = shape[0] * shape[1]
    layers = list(range(len(reference.blocks)))
    head = (reference.lm_head.weight * reference.norm.weight).detach()
    head = head / head.norm(dim=1, keepdim=True)
    guesses = {layer: (positions, (rows @ head.T).argmin(1))
               for layer, (positions, rows) in per_position(watch, "grad", num_tokens, layers).items()}
    return assemble(guesses, layers[::-1], num_tokens, head.device).view(shape)


def fedsgd_attack(run: Collaboration, cfg: Config, sequence: torch.Tensor, steps: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The federated baseline: the victim's full-model gradient of one sequence, known model (FedSGD shares
    it). Tokens from the embedding gradient's nonzero rows; their order by DLG (soft tokens over those rows,
    cosine gradient matching, Adam). Returns the recovered inputs and the recovered token set."""
    # On the CPU, where the experts and router run PyTorch code that has a double backward (DLG needs one).
    backbone = copy.deepcopy(run.backbones[VICTIM]).cpu()
    sequence = sequence.cpu()
    experts = all_experts(run.shards, cfg.model, torch.device("cpu"))
    params = [*backbone.parameters(), *experts.shard.parameters()]
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
