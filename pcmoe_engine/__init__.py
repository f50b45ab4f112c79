"""PC-MoE: privacy-preserving collaborative training of Mixture-of-Experts LLMs (arXiv 2506.02965).

n parties each keep their data, backbone and optimizer state private and hold 1/n of the routed experts;
only routed hidden states and their gradients cross between parties (see ``protocol``).
"""
