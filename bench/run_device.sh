#!/usr/bin/env bash
# One device call: the MoE-layer benchmark, then the GPU tests. Results and logs go to $OUT (or bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 bench/moe_layer.py --out "$OUT/moe_layer.json" "$@" 2>&1 | tee "$OUT/moe_layer.log"
python3 -m pytest -q -m gpu tests/ -x --durations=5 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
