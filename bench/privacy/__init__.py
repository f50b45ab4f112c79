"""The privacy evaluation: what a curious expert host recovers of another party's text, and what the defences
cost (``python -m bench.privacy --preset tiny``; docs/privacy.md states the threat model).

harness.py: two engine parties train together in two processes, and the host records what its wire receives;
attacks.py: the host's attacks and the FedSGD baseline; scores.py: how much of a text was recovered;
evaluate.py: the runs, the attacks and the defence sweep (and the command); report.py: report.md, results.json,
privacy.png.
"""

from .attacks import decoder_attack, fedsgd_attack, gradient_attack, hidden_states, nearest_neighbour_attack
from .evaluate import main, run
from .harness import (ATTACKER, PRESETS, VICTIM, Collaboration, Preset, all_experts, collaborate, config, join,
                      observe, windows)
from .report import write_report
from .scores import bleu, scores, token_accuracy, token_set_recall

__all__ = ["VICTIM", "ATTACKER", "Preset", "PRESETS", "config", "windows", "Collaboration", "collaborate",
           "observe", "join", "all_experts", "hidden_states", "nearest_neighbour_attack", "decoder_attack",
           "gradient_attack", "fedsgd_attack", "token_accuracy", "bleu", "token_set_recall", "scores", "run",
           "write_report", "main"]
