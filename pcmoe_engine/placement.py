"""Where a party's process runs: on the CPU cores of its GPU's NUMA node (``train.pin_cpus``).

A party process's host work (Python, kernel launches, the per-layer split-size sync) runs wherever the
scheduler puts it; on a multi-socket host the cores of the other socket reach the GPU through the inter-socket
link, and parties that land on the same cores slow each other down. Pinning each party to the cores of its
GPU's node, split evenly among the parties whose GPUs share that node, removes both. Everything comes from
sysfs; where anything is unknown (no NUMA information, a virtual machine without it) nothing is pinned.
"""

import os
from pathlib import Path

import torch

__all__ = ["parse_cpulist", "gpu_numa_node", "party_cpus", "pin_to_gpu"]


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus = []
    for part in filter(None, text.strip().split(",")):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def gpu_numa_node(gpu: int, sysfs: Path = Path("/sys")) -> int | None:
    """The NUMA node of CUDA device ``gpu`` (by its PCI address), or None where sysfs does not say."""
    props = torch.cuda.get_device_properties(gpu)
    try:
        address = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        node = int((sysfs / "bus" / "pci" / "devices" / address / "numa_node").read_text())
    except (AttributeError, OSError, ValueError):
        return None
    return node if node >= 0 else None


def party_cpus(gpu: int, nodes: list[int | None], sysfs: Path = Path("/sys")) -> list[int] | None:
    """The cores for the party on GPU ``gpu``, given every local GPU's NUMA node: its node's cores (those this
    process may use), split evenly among the GPUs of that node, in GPU order."""
    node = nodes[gpu]
    if node is None:
        return None
    try:
        cores = parse_cpulist((sysfs / "devices" / "system" / "node" / f"node{node}" / "cpulist").read_text())
    except OSError:
        return None
    cores = [c for c in cores if c in os.sched_getaffinity(0)]
    sharing = [g for g, n in enumerate(nodes) if n == node]
    share = len(cores) // len(sharing)
    if share == 0:
        return None
    start = sharing.index(gpu) * share
    return cores[start:start + share]


def pin_to_gpu(device: torch.device) -> list[int] | None:
    """Pin this process (and torch's CPU threads) to the cores ``party_cpus`` gives; returns them, or None."""
    nodes = [gpu_numa_node(g) for g in range(torch.cuda.device_count())]
    cpus = party_cpus(device.index, nodes)
    if cpus:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(min(torch.get_num_threads(), len(cpus)))
    return cpus
