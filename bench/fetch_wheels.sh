#!/usr/bin/env bash
# Fill .whl/ (git-ignored, carried to the GPU machine, which has no internet) with what the peers need there:
#   .whl/*.whl               installed by bench/run_device.sh into /tmp/site: nvtx, stanford-stk (pure Python)
#   .whl/megablocks-0.10.0/  megablocks' source, patched for CUDA 13, built there in the background
# grouped_gemm (megablocks' "grouped" back end) is not fetched: it is a source distribution whose setup.py
# needs a GPU and CUDA even to report its metadata, so pip cannot download it on a CPU machine.
# PIP must be a pip whose Python has torch (megablocks' setup.py imports it): e.g. PIP=".venv/bin/python -m pip".
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
mkdir -p .whl
$PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl nvtx==0.2.17
$PIP wheel --no-deps -w .whl stanford-stk==0.7.1
tmp=$(mktemp -d)
$PIP download --no-deps --no-binary=:all: --no-build-isolation -d "$tmp" megablocks==0.10.0
rm -rf .whl/megablocks-0.10.0 && tar -xzf "$tmp"/megablocks-0.10.0.tar.gz -C .whl && rm -rf "$tmp"
# CUB (CUDA 13) dropped DeviceScan's trailing debug_synchronous argument; megablocks 0.10.0 still passes it.
python3 - <<'PY'
import pathlib, re
path = pathlib.Path(".whl/megablocks-0.10.0/csrc/cumsum.h")
text, n = re.subn(r"stream,\s*debug_synchronous\)\)", "stream))", path.read_text())
assert n == 2, f"expected 2 DeviceScan calls to patch in {path}, found {n}"
path.write_text(text)
PY
ls -la .whl
