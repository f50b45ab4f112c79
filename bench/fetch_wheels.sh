#!/usr/bin/env bash
# Fill .whl/ (git-ignored, carried to the GPU machine, which has no internet) with what the peers need there,
# for its Python 3.12 on manylinux x86_64, each without its dependencies (named here one by one):
#   .whl/suites/             what the stage suites add (`run_device.sh` carries it with .whl/peers, about 57 MiB):
#     *.whl                    installed by bench/run_device.sh into /tmp/site: nvtx, stanford-stk (pure Python)
#     megablocks-0.10.0/       megablocks' source, patched for CUDA 13, built there in the background
#   .whl/peers/              the fused-MoE peers (about 54 MiB: `run_device.sh peers` carries this folder alone):
#     liger-kernel 0.8.5       pure Python
#     sonic-moe 0.1.2.post1    pure Python; it pins torch<=2.9.1 and the image has 2.11: installed --no-deps, and
#                              whether it runs there is what the run finds out (its rows record why not)
#     quack-kernels 0.3.11     its GEMMs: released the same day as sonic-moe 0.1.2.post1 (2026-04-20); quack 0.5
#                              and later need nvidia-cutlass-dsl >= 4.5, which sonic-moe's pin (==4.4.2) rules out
#     nvidia-cutlass-dsl 4.4.2 and its CUDA 13 build nvidia-cutlass-dsl-libs-cu13 4.4.2 (a superset of
#                              nvidia-cutlass-dsl-libs-base, which is not needed): 78 MB as a wheel, more than one
#                              call may carry, so unpacked here and repacked as .tar.xz (about 51 MiB), which
#                              run_device.sh unpacks into /tmp/site
#     apache-tvm-ffi 0.1.10    quack's call path; the last release before sonic-moe 0.1.2.post1
#   .whl/scale/              `run_device.sh scale` and `central` (about 43 MiB, carried alone):
#     bitsandbytes 0.50.2      AdamW8bit (train.optimizer_8bit); its wheel holds the CUDA 13.0 library
#   Not fetched: torch-c-dlpack-ext (torch >= 2.10 has the DLPack exchange API it adds, and tvm-ffi then skips it),
#   cuda-python (the image has cuda-bindings, which is what CUTLASS DSL imports).
# grouped_gemm (megablocks' "grouped" back end) is not fetched: it is a source distribution whose setup.py
# needs a GPU and CUDA even to report its metadata, so pip cannot download it on a CPU machine.
# PIP must be a pip whose Python has torch (megablocks' setup.py imports it): e.g. PIP=".venv/bin/python -m pip".
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
mkdir -p .whl/suites .whl/peers .whl/scale
download() {  # download DIR NAME==VERSION...: binary wheels for the GPU machine's Python and platform
    local dir=$1
    shift
    $PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$dir" "$@"
}
download .whl/suites nvtx==0.2.17
$PIP wheel --no-deps -w .whl/suites stanford-stk==0.7.1
tmp=$(mktemp -d)
$PIP download --no-deps --no-binary=:all: --no-build-isolation -d "$tmp" megablocks==0.10.0
rm -rf .whl/suites/megablocks-0.10.0 && tar -xzf "$tmp"/megablocks-0.10.0.tar.gz -C .whl/suites && rm -rf "$tmp"
# CUB (CUDA 13) dropped DeviceScan's trailing debug_synchronous argument; megablocks 0.10.0 still passes it.
python3 - <<'PY'
import pathlib, re
path = pathlib.Path(".whl/suites/megablocks-0.10.0/csrc/cumsum.h")
text, n = re.subn(r"stream,\s*debug_synchronous\)\)", "stream))", path.read_text())
assert n == 2, f"expected 2 DeviceScan calls to patch in {path}, found {n}"
path.write_text(text)
PY

download .whl/peers liger-kernel==0.8.5 sonic-moe==0.1.2.post1 quack-kernels==0.3.11 nvidia-cutlass-dsl==4.4.2 \
    apache-tvm-ffi==0.1.10
# The libraries' archive (about 51 MiB) in two halves: the first in .whl/peers_first, carried by a call of its own
# (it stays on the warm machine), the second in .whl/peers (bench/README.md: the working tree and both halves
# passed 64 MiB). run_device.sh joins them.
libs=nvidia_cutlass_dsl_libs_cu13-4.4.2.tar.xz
mkdir -p .whl/peers_first
if [ ! -f ".whl/peers/$libs.part1" ]; then
    tmp=$(mktemp -d)
    download "$tmp" nvidia-cutlass-dsl-libs-cu13==4.4.2
    python3 -m zipfile -e "$tmp"/nvidia_cutlass_dsl_libs_cu13-4.4.2-*.whl "$tmp/site"
    XZ_OPT="-9e -T0" tar -C "$tmp/site" -cJf "$tmp/$libs" .  # a few minutes
    split -n 2 -d -a 1 "$tmp/$libs" "$tmp/$libs.part"
    mv "$tmp/$libs.part0" .whl/peers_first/ && mv "$tmp/$libs.part1" .whl/peers/
    rm -rf "$tmp"
fi
$PIP download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 -d .whl/scale \
    bitsandbytes==0.50.2  # py3-none-manylinux_2_24: no cp tag to match, and older than the peers' platforms
ls -la .whl/suites .whl/peers_first .whl/peers .whl/scale
du -sh .whl/peers_first .whl/peers .whl/suites  # a call carries .whl/peers_first, the next .whl/peers (+ .whl/suites)
du -sh .whl/scale              # `run_device.sh scale` and `central`
