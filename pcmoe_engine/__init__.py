"""PC-MoE: privacy-preserving collaborative training of Mixture-of-Experts LLMs (arXiv 2506.02965).

n parties each keep their data, backbone and optimizer state private and hold 1/n of the routed experts;
only routed hidden states and their gradients cross between parties (see ``protocol``).
"""

import os
import subprocess


def source_commit() -> str:
    """The commit results are recorded against: PCMOE_COMMIT where the tree has no .git (e.g. a copy on a GPU
    machine), else git's short HEAD, else "unknown"."""
    try:
        return os.environ.get("PCMOE_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
