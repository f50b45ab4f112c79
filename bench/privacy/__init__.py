"""The privacy evaluation: what a curious expert host recovers of another party's text, and what the defences
cost (``python -m bench.privacy --preset tiny``; docs/privacy.md states the threat model).

harness.py: two engine parties train together in two processes, and the host records what its wire receives;
attacks.py: the host's attacks on hidden states and gradients, and the FedSGD baseline; routing.py: the
routing-pattern attack; refine.py: the BiSR-style refinement through known layers; scores.py: how much of a text
was recovered; evaluate.py: the phases (runs and their attacks) and the command; report.py: report.md,
results.json, privacy.png.
"""

from .attacks import (decoder_attack, fedsgd_attack, gradient_attack, hidden_states, nearest_neighbour_attack,
                      trace)
from .evaluate import main, phases, run_phase
from .harness import (ATTACKER, PRESETS, VICTIM, Collaboration, Preset, all_experts, collaborate, config, finetuning,
                      join, observe, pretrain, windows)
from .refine import refine_gradients, refine_hidden
from .report import routing_spread, write_report
from .routing import host_masks, linked_attack, row_attack
from .scores import bleu, scores, token_accuracy, token_set_recall

__all__ = ["VICTIM", "ATTACKER", "Preset", "PRESETS", "config", "finetuning", "pretrain", "windows", "Collaboration",
           "collaborate", "observe", "join", "all_experts", "trace", "hidden_states", "nearest_neighbour_attack", "decoder_attack",
           "gradient_attack", "fedsgd_attack", "host_masks", "linked_attack", "row_attack", "refine_hidden",
           "refine_gradients", "token_accuracy", "bleu", "token_set_recall", "scores", "phases", "run_phase",
           "routing_spread", "write_report", "main"]
