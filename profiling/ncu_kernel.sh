#!/usr/bin/env bash
# Nsight Compute on one kernel of the MoE layer's forward+backward (the driver: profiling/moe_layer_kernels.py
# --steps 0, two warm-up steps, so the kernel's first launches include autotuning; --launch-skip passes them).
#   profiling/ncu_kernel.sh [KERNEL_REGEX] [SHAPE] [extra ncu args]   e.g. profiling/ncu_kernel.sh _gate_up_fwd_kernel
# --clock-control none: the device's Firecracker machines refuse ncu's own clock locking, and the card's
# clocks are left as they are. Prints the details page (speed of light, memory, occupancy).
set -euo pipefail
cd "$(dirname "$0")/.."
KERNEL=${1:-_gate_up_fwd_kernel}
SHAPE=${2:-olmoe-1b-7b}
shift $(( $# < 2 ? $# : 2 ))
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu: not found (PATH, /opt/nvidia/nsight-compute, /usr/local/cuda/bin)"; exit 1; }
"$NCU" --clock-control none -k "regex:${KERNEL}" --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --section Occupancy --section LaunchStats "$@" \
    python3 profiling/moe_layer_kernels.py --shape "$SHAPE" --tokens 16384 --steps 0
