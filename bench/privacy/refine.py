"""(d, e) BiSR-style refinement (Chen et al., CCS'24: a learned guess, then optimisation through the known
layers). Under shared initialisation the host knows the layers that produced what it received, up to the
victim's fine-tuning. Starting from a learned guess, it optimises soft input tokens (a distribution over the
vocabulary per position, through the known embedding) so that the known layers reproduce what it observed:

d. on hidden states: the cosine distance between the known backbone's hidden state and the observed row, at
   every (MoE layer, position) the host received a row for; initialised with attack a's guess;
e. on returned gradients: the same soft tokens serve as inputs and, shifted by one, as the targets; the known
   model's gradient of the loss w.r.t. each MoE layer's routed output (the residual stream's gradient after
   that layer, which an output-gradient row is up to its routing weight) against the observed rows, by cosine
   (a double backward: on the CPU, where the experts run PyTorch code that has one); initialised with
   attack c's guess of the next tokens.

Attention mixes the positions of a sequence, so the optimisation needs each row's position: these attacks are
given the true positions of the rows, which the shuffle hides from a real host. They are an upper bound on this
attack, measured whatever the row order.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pcmoe_engine.model import Backbone

from .attacks import per_position
from .harness import all_experts

__all__ = ["refine_hidden", "refine_gradients"]


def _soft_forward(backbone: Backbone, experts, logits: torch.Tensor):
    """``backbone`` on the soft tokens softmax(logits) [sequences, seq_len, vocab]: per MoE layer the hidden states
    and the routed outputs ([tokens, hidden] each), and the LM logits."""
    states, outputs = [], []

    def capture(layer, x, weights, ids, concurrent=None):
        out, side = experts(layer, x, weights, ids, concurrent)
        states.append(x)
        outputs.append(out)
        return out, side

    soft = logits.softmax(-1)
    hook = backbone.embed.register_forward_hook(lambda module, args, out: soft @ module.weight)
    try:
        lm, _ = backbone(torch.zeros(soft.shape[:2], dtype=torch.int64, device=soft.device), capture)
    finally:
        hook.remove()
    return states, outputs, lm


def _initial_logits(guess: torch.Tensor, shape, vocab: int) -> torch.Tensor:
    """Logits that put about 88% of each position's mass on its guess (uniform where the guess is -1)."""
    logits = torch.zeros(*shape, vocab, device=guess.device)
    seen = guess >= 0
    logits[seen, guess[seen]] = math.log(vocab) + 2
    return logits.requires_grad_()


def _mismatch(rows: list[torch.Tensor], observed: dict[int, tuple]) -> torch.Tensor:
    """Mean cosine distance between the model's rows and the observed ones, over every observed (layer, position)."""
    distances = [1 - F.cosine_similarity(rows[layer][positions], target, dim=-1)
                 for layer, (positions, target) in observed.items()]
    return torch.cat(distances).mean()


def _frozen(backbone: Backbone, device) -> Backbone:
    model = copy.deepcopy(backbone).to(device)
    model.requires_grad_(False)
    return model


def refine_hidden(watch, reference: Backbone, shards, guess: torch.Tensor, shape, steps: int, lr: float = 0.3
                  ) -> torch.Tensor:
    """(d) Soft inputs optimised so that ``reference``'s hidden states match the observed rows; from ``guess``."""
    device = guess.device
    model, experts = _frozen(reference, device), all_experts(shards, reference.cfg, device)
    observed = per_position(watch, "hidden", shape[0] * shape[1], list(range(len(model.blocks))))
    logits = _initial_logits(guess.view(shape), shape, model.cfg.vocab_size)
    optimizer = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        states, _, _ = _soft_forward(model, experts, logits)
        loss = _mismatch(states, observed)
        optimizer.zero_grad()
        loss.backward(inputs=[logits])
        optimizer.step()
    return logits.detach().argmax(-1)


def refine_gradients(watch, reference: Backbone, shards, guess: torch.Tensor, shape, steps: int, lr: float = 0.3
                     ) -> torch.Tensor:
    """(e) Soft tokens (inputs, and shifted by one the targets) optimised so that ``reference``'s gradients of the
    loss w.r.t. each MoE layer's routed output match the observed output-gradient rows; from ``guess`` (the next
    tokens). On the CPU. Returns the recovered next tokens."""
    cpu = torch.device("cpu")
    model, experts = _frozen(reference, cpu), all_experts(shards, reference.cfg, cpu)
    sequences, length = shape
    observed = {layer: (positions.cpu(), rows.cpu()) for layer, (positions, rows) in
                per_position(watch, "grad", sequences * length, list(range(len(model.blocks)))).items()}
    start = torch.full((sequences, 1), -1, dtype=torch.int64)
    logits = _initial_logits(torch.cat([start, guess.view(shape).cpu()], 1), (sequences, length + 1),
                             model.cfg.vocab_size)
    optimizer = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            _, outputs, lm = _soft_forward(model, experts, logits[:, :length])
        targets = logits[:, 1:].softmax(-1)
        loss = -(targets * lm.float().log_softmax(-1)).sum(-1).mean()
        grads = torch.autograd.grad(loss, outputs, create_graph=True)
        mismatch = _mismatch(list(grads), observed)
        optimizer.zero_grad()
        mismatch.backward(inputs=[logits])
        optimizer.step()
    return logits.detach()[:, 1:].argmax(-1).to(guess.device)
