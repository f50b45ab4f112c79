"""(r) The routing-pattern attack: what a host learns from which of its experts each row picked (the expert_mask
that comes with every row), per layer, with and without the shuffle.

The published anchor (arXiv 2602.04105): a transformer decoder over the router choices of ALL layers, all experts,
recovers 91.2% of tokens top-1. A host here sees only its own experts' choices (0 where a token picked none of
them and sent it no row), and whether it can tie a token's rows together across layers depends on their order:

- in token order (privacy.shuffle=false): at every layer the rows arrive in the order of the victim's tokens, so
  the host can line them up by position. The attacker is given the true alignment (an upper bound on what the
  order tells it): per position, its mask at every layer, in the sequence's context. A small transformer
  encoder over those features, trained on the attacker's own text routed by the routers it knows (under shared
  initialisation the starting backbone's and its own, else its own), names each token (``linked_attack``);
- shuffled (the default): a row is tied to no position and to no other row. The best guess from one row is the
  token most often routed to that mask at that layer in the attacker's own text (a lookup table: the Bayes
  choice for that single feature; ``row_attack``). Each guess is scored at its row's true position.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import assemble, trace

__all__ = ["host_masks", "RoutingInverter", "linked_attack", "row_attack"]


def host_masks(expert_ids: torch.Tensor, host: int, parties: int) -> torch.Tensor:
    """[tokens, top_k] routed experts -> [tokens]: the bits of the host's local experts each token picked (expert
    e is local expert e // parties of party e % parties), as the expert_mask rows say it."""
    local = torch.where(expert_ids % parties == host, 1 << (expert_ids // parties), 0)
    return local.sum(1)


def _own_features(references, shards, aux: torch.Tensor, host: int, parties: int) -> tuple[torch.Tensor, ...]:
    """The attacker's own text routed by each reference backbone: masks [sequences, seq_len, layers] (the
    references' sequences one after the other) and the tokens they are."""
    inputs = aux[:, :-1]
    masks = [torch.stack([host_masks(ids, host, parties) for ids in trace(ref, shards, inputs)[1]], -1)
             for ref in references]  # each [tokens, layers]
    return torch.cat(masks).view(-1, inputs.shape[1], masks[0].shape[1]), inputs.repeat(len(references), 1)


def _bits(masks: torch.Tensor, local_experts: int) -> torch.Tensor:
    """[..., layers] masks -> [..., layers * local_experts] 0/1 floats."""
    bits = (masks.unsqueeze(-1) >> torch.arange(local_experts, device=masks.device)) & 1
    return bits.flatten(-2).float()


class RoutingInverter(nn.Module):
    """Per position: its masks' bits at every layer and its position, embedded; a bidirectional transformer
    encoder over the sequence; a linear map to the vocabulary."""

    def __init__(self, features: int, seq_len: int, vocab: int, width: int = 64, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.position = nn.Embedding(seq_len, width)
        block = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        x = self.embed(bits) + self.position(torch.arange(bits.shape[1], device=bits.device))
        return self.head(self.encoder(x))


def linked_attack(watch_in_order: list[dict], references, shards, aux: torch.Tensor, shape, host: int, parties: int,
                  steps: int = 400, seed: int = 0) -> torch.Tensor:
    """Every position's token from its masks at every layer, linked by position (see the module's docstring);
    -1 where no layer sent the host a row."""
    cfg = references[0].cfg
    local = -(-cfg.num_experts // parties)
    masks, tokens = _own_features(references, shards, aux, host, parties)
    layers = masks.shape[-1]
    torch.manual_seed(seed)
    model = RoutingInverter(layers * local, shape[1], cfg.vocab_size).to(aux.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    features = _bits(masks, local)
    for _ in range(steps):
        batch = torch.randint(0, masks.shape[0], (32,), generator=gen).to(aux.device)
        loss = F.cross_entropy(model(features[batch]).flatten(0, 1), tokens[batch].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    observed = torch.zeros(shape[0] * shape[1], layers, dtype=torch.int64, device=aux.device)
    for w in watch_in_order:
        observed[w["row_token"], w["layer"]] = w["mask"]
    model.eval()
    with torch.no_grad():
        guess = model(_bits(observed.view(*shape, layers), local)).argmax(-1).flatten()
    return torch.where(observed.any(1), guess, -1).view(shape)


def row_attack(watch: list[dict], references, shards, aux: torch.Tensor, shape, host: int, parties: int
               ) -> tuple[torch.Tensor, dict[int, tuple]]:
    """Each row's token from its own mask alone: the token most often behind that (layer, mask) in the attacker's
    own text (else its most frequent token). Returns the recovery (earliest layer first; -1 unseen) and each
    layer's guesses (positions, tokens)."""
    masks, tokens = _own_features(references, shards, aux, host, parties)
    vocab, labels = references[0].cfg.vocab_size, tokens.flatten()
    fallback = torch.bincount(labels, minlength=vocab).argmax()
    guesses = {}
    for w in watch:
        own = masks[..., w["layer"]].flatten()
        values, index = torch.unique(torch.cat([own, w["mask"]]), return_inverse=True)
        counts = torch.zeros(values.numel(), vocab, dtype=torch.int64, device=aux.device)
        counts.index_put_((index[:own.numel()], labels), torch.ones_like(labels), accumulate=True)
        table = torch.where(counts.sum(1) > 0, counts.argmax(1), fallback)
        guesses[w["layer"]] = (w["row_token"], table[index[own.numel():]])
    return assemble(guesses, sorted(guesses), shape[0] * shape[1], aux.device).view(shape), guesses
