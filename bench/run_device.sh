#!/usr/bin/env bash
# THE device command (bench/README.md): everything the README's performance section reports, in one call.
#
#   bench/run_device.sh          one GPU (nvidia-h100-x1), < 9.5 min: the stage suites (every stage, shape,
#                                token count, routing and peer), the engine end to end at 1 party, a
#                                profiled engine step, host vs GPU time of the small stages, Nsight Compute
#                                on one kernel; GPU tests if time is left.
#                                Two GPUs (nvidia-h100-x2): the `small` preset and the engine end to end at
#                                2 parties over NCCL, then each GPU its own chain: GPU 0 the 1-party runs and
#                                the suites, GPU 1 the GPU tests and the suites again, which compare.py holds
#                                against GPU 0's (reproduce.md); no profile or Nsight Compute.
#   bench/run_device.sh peers    the fused-MoE peers only, in 560 s on one H100: the routed experts and the layer,
#                                forward and forward+backward, ours against transformers' grouped_mm, Liger-Kernel
#                                and SonicMoE, at the README's shapes (16384 tokens, balanced) and the published
#                                anchors' cases, with the ceilings; all of it twice, one run after the other
#                                (two at once, one per GPU, contend for the host), and bench/compare.py on the
#                                pair, with the GPU's clocks through both (clocks.csv: a run the power cap held down
#                                more often may be slower for that alone). Carry .whl/peers (bench/fetch_wheels.sh;
#                                about 29 MiB), after a call that carried .whl/peers_first (bench/README.md).
#   bench/run_device.sh cap      the routed experts at the power cap (bench/at_cap.py): ours, SonicMoE and Liger-Kernel
#                                at the published anchors' cases, each run back to back for 3 s a measurement,
#                                two rounds: time, energy and clock a step (~6 min; carry .whl/peers as for peers)
#   bench/run_device.sh e2e      the engine end to end at 1 party and at 2 and 4 when the GPUs are there
#                                (nvidia-h100-x2, -x4); on one GPU, 2 parties sharing it (memory, not speed)
#   bench/run_device.sh suites   the stage suites only, for as long as BUDGET_S allows
#   bench/run_device.sh small    the `small` preset at 2 parties (over NCCL, when 2 GPUs are there) and at 1
#   bench/run_device.sh tests    the GPU tests only
#   bench/run_device.sh finetune four parties fine-tune a 6.9 B MoE (OLMoE-1B-7B's shapes, random weights) from a
#                                transformers checkpoint written to /tmp, export it with --pool, and transformers and
#                                `pcmoe eval` on the export (bench/finetune_proof.py; nvidia-h100-x4, ~6 of 9.5 min,
#                                ~130 GB of local disk; carry .corpora for the four domains, else Tiny Shakespeare)
#   bench/run_device.sh scale    issue 13 on four GPUs (nvidia-h100-x4), < 570 s, each phase's JSON written as it
#                                ends: (1) full OLMoE-1B-7B (16 layers, 6.9 B), 4 parties, 8 x 1024 tokens per party
#                                and step, 8 steps of each variant on one model (bench/engine_e2e.py VARIANTS): the
#                                protocol before issue 13 (pair), dispatch once (token), + combine at the host,
#                                + fp8, then the memory options (replaying checkpoints, 8-bit AdamW, step in
#                                backward); (2) 500-step loss runs of the 4-layer olmoe shape at 4 parties: bf16,
#                                fp8 dispatch and gradients, the memory options; (3) the 4-layer end to end
#                                launched twice back to back, then once without CPU pinning (run-to-run
#                                variance); (4) fp8 dispatch alone, if time is left. Carry .whl/scale
#                                (bitsandbytes, bench/fetch_wheels.sh) and .corpora/scripture.txt.gz (the loss
#                                runs' text). The GPUs' clocks are sampled into clocks.csv throughout.
#   bench/run_device.sh privacy  issue 15: `python -m bench.privacy --preset base` into $OUT/privacy_base, the phases
#                                PHASES names (comma-separated; default every phase) that bench/results/privacy_base/
#                                phases/ does not hold yet (copied in, with the public model public.pt: carry it),
#                                each saved as it ends; copy $OUT/privacy_base back there between calls
#   bench/run_device.sh loss     (2) of `scale` alone
#   bench/run_device.sh profile  issue 13's profile: where the step's time goes at OLMoE-1B-7B's full shapes, one
#                                party per GPU (16 layers on 4 GPUs, else 4 layers), 8 x 1024 tokens per party and
#                                step: profiling/engine_step.py under torchrun (engine_profile_p<rank>.json: ranges,
#                                GPU busy time, NCCL, top kernels; traces; party 0's memory snapshot)
#   bench/run_device.sh central  the centralized baseline on one big GPU (nvidia-h200, needs_h200): 6.9 B at 1 party,
#                                8 x 1024 tokens, the optimizer before issue 13, today's default, the memory options
#   bench/run_device.sh alltests the whole tests/ suite on the GPU, kernels compiled; with 2 GPUs
#                                (nvidia-h100-x2) also the protocol's n-party equality over NCCL. Extra
#                                arguments go to its pytest (e.g. -x, -k, -m "not slow", -n 4 --dist loadfile:
#                                the device image has pytest-xdist). It takes more than one call; TESTS picks each
#                                call's files (bench/results/gpu_alltests.md: three calls on 2026-11-27, e.g.
#                                TESTS="tests/test_engine_nvtx.py tests/test_engine_[o-z]*.py tests/test_ex*.py
#                                tests/test_[f-z]*.py" with -n 4 --dist loadfile: 221 tests in 369 s on 4 H100s)
#
# Writes into $OUT (the device tool's folder; default bench/results/device): bench_*.json, e2e_*.json,
# small_<n>p.json, engine_profile.json, engine_trace.json.gz, engine_memory.pickle.gz, ncu.txt,
# megablocks_build.log, run.log; on two GPUs also gpu1/ (its run.log and suites) and reproduce.md. `peers`:
# peers_*.json, rerun_peers_*.json, reproduce.md, clocks.csv, run.log. `cap`: at_cap_*.json, clocks.csv, run.log.
# `finetune`: finetune_*.json, run.log.
# Each phase gets what is left of BUDGET_S seconds (default 570; peers 560) up to its own cap, and the log says
# what did not run. Carried wheels (.whl/suites/, .whl/peers/, .whl/scale/: bench/fetch_wheels.sh) are installed
# first; megablocks' source is built in the background while the engine runs. Extra arguments go to the suites'
# pytest (alltests: to the tests' pytest).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
[ $# -gt 0 ] && shift
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-$([ "$MODE" = peers ] && echo 560 || echo 570)}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PATH=$PATH:/usr/local/cuda/bin
LOG="$OUT/run.log"

left() { echo $(( BUDGET_S - SECONDS )); }
phase() {  # phase NAME CAP_SECONDS MIN_SECONDS COMMAND...: run COMMAND for at most min(CAP, time left)
    local name=$1 cap=$2 need=$3 limit
    shift 3
    limit=$(( $(left) < cap ? $(left) : cap ))
    if (( limit < need )); then
        echo "== $name: NOT RUN, ${limit} s left of the ${BUDGET_S} s budget (needs ${need} s)" | tee -a "$LOG"
        return
    fi
    echo "== $name (at ${SECONDS} s, up to ${limit} s)" | tee -a "$LOG"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "== $name: exit ${PIPESTATUS[0]} at ${SECONDS} s" | tee -a "$LOG"
}

{
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c 'import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, triton.__version__, transformers.__version__, torch.cuda.device_count(), "GPUs")'
    echo "commit ${PCMOE_COMMIT:-unknown}"
} 2>&1 | tee "$LOG"
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')

shopt -s nullglob
wheels=(.whl/suites/*.whl .whl/peers/*.whl .whl/scale/*.whl)
if (( ${#wheels[@]} )); then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${wheels[@]}" 2>&1 | tee -a "$LOG"
    for second in .whl/peers/*.tar.xz.part1; do  # wheels repacked in halves to fit the carry limit (fetch_wheels.sh)
        first=.whl/peers_first/$(basename "${second%1}")0
        if [ -f "$first" ]; then
            mkdir -p /tmp/site && cat "$first" "$second" | tar -xJ -C /tmp/site && echo "unpacked ${second%.part1}" \
                | tee -a "$LOG"
        else
            echo "$first: not here (carry .whl/peers_first in a call just before this one): SonicMoE will not run" \
                | tee -a "$LOG"
        fi
    done
    export PYTHONPATH=/tmp/site:$PYTHONPATH
    for pth in /tmp/site/*.pth; do  # --target does not run .pth files (nvidia-cutlass-dsl puts cutlass on the path)
        while read -r line || [[ -n $line ]]; do  # the last line may lack its newline
            [[ -n $line && $line != \#* && $line != import* ]] && PYTHONPATH=$PYTHONPATH:/tmp/site/$line
        done < "$pth"
    done
fi
shopt -u nullglob

e2e_run() {  # e2e_run N [ARGS]: the engine end to end at N parties (bench/engine_e2e.py)
    local n=$1
    shift
    phase "engine end to end, parties=$n${*:+ ($*)}" $(( n == 1 ? 150 : 240 )) $(( n == 1 ? 40 : 60 )) \
        torchrun --standalone --nproc-per-node "$n" bench/engine_e2e.py --out "$OUT" "$@"
}

e2e() {
    e2e_run 1
    for n in 2 4; do
        (( GPUS >= n )) && e2e_run "$n"
    done
    if (( GPUS == 1 )) && [ "$MODE" = e2e ]; then  # per-party memory of 2 parties; their speed needs a GPU each
        e2e_run 2 --set train.device=cuda  # they share the GPU, over gloo
    fi
}

small_run() {  # small_run N: the `small` preset (~245M parameters) for 60 steps at N parties: small_<N>p.json
    local run=/tmp/pcmoe-small
    phase "small preset, parties=$1" 120 40 torchrun --standalone --nproc-per-node "$1" -m pcmoe_engine.train \
        --config pcmoe_engine/configs/small.toml --set train.steps=60 --set train.log_every=10 \
        --set train.eval_every=0 --set train.checkpoint_every=0 --set train.out_dir="$run" --set train.name="$1p"
    cp "$run/$1p/summary.json" "$OUT/small_$1p.json"  # the run's summary, without its checkpoints
}

gpu_tests() {  # gpu_tests CAP
    phase "GPU tests" "$1" 100 python3 -m pytest -q -m gpu tests/ --durations=5 -p no:cacheprovider
}

all_tests() {  # the whole tests/ suite on the GPU: every kernel test compiled (not the interpreter), the `gpu` ones
    # included (the protocol over NCCL with 2+ GPUs); the engine's own runs put a party on each GPU when there
    # are enough. Slowest first in the log, so a cut-short run still says where the time went.
    phase "all tests on the GPU" 9999 120 python3 -m pytest -q ${TESTS:-tests/} --durations=15 -p no:cacheprovider "$@"
}

megablocks_build() {  # megablocks' CUDA extension (sort, histogram, cumsum), sm_90 only, on the CPUs
    MB_PID=
    if [ -d .whl/suites/megablocks-0.10.0 ] && command -v nvcc >/dev/null; then
        (cd .whl/suites/megablocks-0.10.0 && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(( $(nproc) / 2 )) timeout 200 python3 -m pip install \
            --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site-megablocks . ) \
            > "$OUT/megablocks_build.log" 2>&1 &
        MB_PID=$!
    else
        echo "megablocks: no source carried (.whl/suites/megablocks-0.10.0) or no nvcc" | tee -a "$LOG"
    fi
}

megablocks_ready() {  # wait for the build: before the suites, and before host timings (it loads the CPUs)
    if [ -n "$MB_PID" ]; then
        echo "== waiting for the megablocks build (at ${SECONDS} s)" | tee -a "$LOG"
        wait "$MB_PID" && echo "megablocks built at ${SECONDS} s" | tee -a "$LOG" \
            || echo "megablocks build FAILED (megablocks_build.log): its rows record why" | tee -a "$LOG"
        [ -d /tmp/site-megablocks/megablocks ] && export PYTHONPATH=/tmp/site-megablocks:$PYTHONPATH
        MB_PID=
    fi
}

host_timings() {  # after the megablocks build: it loads the CPUs these timings measure
    megablocks_ready
    phase "host against GPU time of the small stages" 45 20 python3 profiling/host_overhead.py
}

suites() {
    megablocks_ready
    # Most telling first: if the cap cuts the suites short, the JSON still holds what ran (pytest stops on SIGINT).
    phase "stage suites" "$1" 120 python3 -m pytest bench/bench_layer.py bench/bench_experts.py \
        bench/bench_grouped_gemm.py bench/bench_permute.py bench/bench_router.py --benchmark-only -q \
        -p no:cacheprovider --bench-out "$OUT" --bench-anchors --bench-warmup-ms 10 --bench-rep-ms 40 \
        --bench-max-call-s 0.3 "${@:2}"
}

peer_suites() {  # peer_suites CAP PREFIX [pytest args]: the routed experts and the layer against the fused peers
    phase "peer suites ($2)" "$1" 90 python3 -m pytest bench/bench_experts.py bench/bench_layer.py --benchmark-only -q \
        -p no:cacheprovider --bench-out "$OUT" --bench-prefix "$2" --bench-tokens 16384 --bench-routing balanced \
        --bench-anchors -k "not hf_eager and not megablocks" --bench-warmup-ms 10 --bench-rep-ms 40 \
        --bench-max-call-s 0.3 --durations 12 "${@:3}"  # durations: where the first run's time goes (compiling)
}

peers() {  # the peer suites twice, one run after the other (on two GPUs at once the runs contend for the host: both
    # reached 64% of the suites in 420 s, and SonicMoE's 7B forward+backward read 225 TFLOP/s against 350 in the
    # one-GPU run at 53fe244: bench/results/experts_notes/v12_peers_h100x2_in_parallel_c2cb9af.log); then how much
    # the pair differs
    peer_suites $(( (BUDGET_S - SECONDS) * 2 / 3 )) peers "$@"  # the first run compiles (cached) for both
    peer_suites 9999 rerun_peers "$@"
    if compgen -G "$OUT/peers_*.json" > /dev/null && compgen -G "$OUT/rerun_peers_*.json" > /dev/null; then
        python3 -m bench.compare "$OUT"/peers_*.json "$OUT"/rerun_peers_*.json --out "$OUT/reproduce.md" \
            --clocks "$OUT/clocks.csv" 2>&1 | tee -a "$LOG"
    else
        echo "== no pair of peer runs to compare" | tee -a "$LOG"
    fi
}

clocks() {  # the GPUs' clocks, power and temperature now (run-to-run variance: are the clocks the same?)
    nvidia-smi --query-gpu=index,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu,pstate \
        --format=csv,noheader 2>&1 | sed 's/^/clocks: /' | tee -a "$LOG"
}

clock_log() {  # every GPU's SM clock, power, temperature and throttle reasons every 2 s, into clocks.csv, until the end
    nvidia-smi --query-gpu=timestamp,index,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
        --format=csv,noheader -lms 2000 > "$OUT/clocks.csv" 2>&1 &
    CLOCK_PID=$!
}

# A corpus large enough that 500 steps of 4 parties do not repeat it (Tiny Shakespeare would, 7 times over):
# carry .corpora/scripture.txt.gz (bench/convergence.py prepares .corpora)
CORPUS=$([ -f .corpora/scripture.txt.gz ] && echo .corpora/scripture.txt.gz || echo tinyshakespeare)
LOSS=(--set model.preset=olmoe-1b-7b --set model.num_layers=4 --set data.seq_len=256 --set train.batch_size=4
      --set train.steps=500 --set train.warmup_steps=50 --set train.lr=1e-3 --set train.min_lr=1e-4
      --set train.eval_every=100 --set train.eval_batches=8 --set train.log_every=100 --set train.checkpoints=false
      --set train.out_dir=/tmp/pcmoe-loss --set data.corpus="$CORPUS")

loss_run() {  # loss_run NAME [--set ...]: LOSS at 4 parties; loss_NAME.json: its summary, losses and evaluations
    local name=$1
    shift
    phase "loss over 500 steps, $name" 150 50 torchrun --standalone --nproc-per-node 4 -m pcmoe_engine.train \
        "${LOSS[@]}" --set train.name="$name" "$@"
    [ -f "/tmp/pcmoe-loss/$name/summary.json" ] || return 0  # not run, or cut short: nothing to keep
    python3 - "$name" "$OUT/loss_$name.json" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
run = Path("/tmp/pcmoe-loss") / sys.argv[1]
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
out = {"summary": json.loads((run / "summary.json").read_text()),
       "loss": [[r["step"], r["party"], r["loss"]] for r in records if "loss" in r],
       "eval": [[r["step"], r["party"], r["eval_loss"]] for r in records if "eval_loss" in r]}
Path(sys.argv[2]).write_text(json.dumps(out) + "\n")
print(sys.argv[1], "eval loss per party:", out["summary"]["eval_loss"])
PY
}

loss_runs() {  # the 500-step loss runs of issue 13: bf16, the memory options, fp8 on the wire
    loss_run bf16
    loss_run memory --set train.activation_checkpointing=true --set train.optimizer_8bit=true \
        --set train.optimizer_in_backward=true
    loss_run fp8 --set wire.hidden_dtype=fp8 --set wire.grad_dtype=fp8
}

scale() {
    clocks
    phase "16 layers (6.9 B), 4 parties: protocol and memory variants" 210 120 torchrun --standalone \
        --nproc-per-node 4 bench/engine_e2e.py --set model.num_layers=16 --steps 8 --warmup 3 --profiled 0 \
        --out "$OUT" --variants pair,token,token_host,token_host_fp8,ac,ac_8bit,ac_8bit_release,ac_8bit_release_host
    clocks
    loss_runs
    for run in 1 2; do  # the same configuration twice, back to back
        clocks
        phase "variance: 4 layers, 4 parties, run $run" 45 30 torchrun --standalone --nproc-per-node 4 \
            bench/engine_e2e.py --steps 12 --profiled 0 --out "$OUT/variance_$run.json"
    done
    phase "variance: 4 layers, 4 parties, without CPU pinning" 45 30 torchrun --standalone --nproc-per-node 4 \
        bench/engine_e2e.py --steps 12 --profiled 0 --set train.pin_cpus=false --out "$OUT/variance_unpinned.json"
    loss_run fp8_hidden --set wire.hidden_dtype=fp8  # if time is left: fp8 dispatch alone
    clocks
}

case $MODE in
e2e) e2e ;;
tests) gpu_tests 9999 ;;
scale)  # its JSON files in one tarball: the device returns at most 8 files a call
    clock_log; scale; kill "$CLOCK_PID"
    (cd "$OUT" && tar -czf scale_results.tgz -- *.json && rm -f -- *.json) ;;
loss) clock_log; clocks; loss_runs; clocks; kill "$CLOCK_PID" ;;
profile)
    clocks
    phase "profiled engine steps, $GPUS parties" 300 60 torchrun --standalone --nproc-per-node "$GPUS" \
        profiling/engine_step.py --out-dir "$OUT" --warmup 3 --steps 2 --set model.preset=olmoe-1b-7b \
        --set model.num_layers=$(( GPUS >= 4 ? 16 : 4 )) --set train.batch_size=8 --set data.seq_len=1024 "$@"
    ;;
central)
    clocks
    phase "centralized 6.9 B, 1 party: the optimizer before issue 13, the default, the memory options" 560 120 \
        python3 bench/engine_e2e.py --set model.num_layers=16 --steps 8 --warmup 3 --profiled 0 --out "$OUT" \
        --variants token,ac,ac_8bit_release,pair  # pair (foreach AdamW) last: 129.7 GiB before, the most
    ;;
alltests) all_tests "$@" ;;
small) (( GPUS >= 2 )) && small_run 2; small_run 1 ;;
privacy)  # PHASES: comma-separated (default: every phase not done); done ones are copied in from the tree, skipped
    mkdir -p "$OUT/privacy_base" && cp -rn bench/results/privacy_base/. "$OUT/privacy_base/" 2>/dev/null
    phase "privacy report, base preset${PHASES:+ ($PHASES)}" 9999 120 python3 -m bench.privacy --preset base \
        --threads 8 --out "$OUT/privacy_base" ${PHASES:+--phase "$PHASES"} ;;
finetune) phase "fine-tune a pretrained MoE together" 9999 300 python3 bench/finetune_proof.py --out "$OUT" \
    --budget $(( BUDGET_S - SECONDS - 20 )) ;;
suites) megablocks_build; suites 9999 "$@" ;;
peers) clock_log; peers "$@"; kill "$CLOCK_PID" ;;
cap)
    clock_log
    phase "routed experts at the power cap" 9999 120 python3 -m bench.at_cap --out "$OUT" \
        --case qwen3-30b-a3b:32768 --case sonicmoe-7b:24576 --case sonicmoe-30b:32768 "$@"
    kill "$CLOCK_PID" ;;
all)
    megablocks_build  # while the GPU runs the engine
    if (( GPUS >= 2 )); then
        small_run 2
        e2e_run 2
        host_timings
        (   # each chain's phases log to its own run.log
            export CUDA_VISIBLE_DEVICES=0
            e2e_run 1
            suites 9999 "$@"
        ) > /dev/null &
        (
            export CUDA_VISIBLE_DEVICES=1 OUT="$OUT/gpu1" && mkdir -p "$OUT" && LOG="$OUT/run.log"
            small_run 1
            gpu_tests 150
            suites 9999 "$@"
        ) > /dev/null &
        wait
        cat "$OUT/gpu1/run.log" >> "$LOG"
        python3 -m bench.compare "$OUT"/bench_*.json "$OUT"/gpu1/bench_*.json --out "$OUT/reproduce.md" \
            2>&1 | tee -a "$LOG"
    else
        e2e
        phase "profiled engine steps" 80 40 python3 profiling/engine_step.py --out-dir "$OUT" --warmup 3 --steps 2 \
            --set model.preset=olmoe-1b-7b --set model.num_layers=2 --set train.batch_size=4 --set data.seq_len=1024
        phase "Nsight Compute, _gate_up_fwd_kernel" 60 30 bash -c "profiling/ncu_kernel.sh _gate_up_fwd_kernel > '$OUT/ncu.txt' 2>&1; tail -40 '$OUT/ncu.txt'"
        host_timings
        suites 9999 "$@"  # the rest of the budget
        gpu_tests 9999
    fi
    ;;
*) echo "usage: bench/run_device.sh [all|suites|peers|cap|e2e|small|tests|alltests|finetune|scale|loss|profile|central|privacy] [pytest args]"
   exit 2 ;;
esac
echo "== done at ${SECONDS} s" | tee -a "$LOG"
