#!/usr/bin/env bash
# GPU check of mgrun on a one-GPU machine with PyTorch 2.11 and no Rust toolchain.
#
#   scripts/gpu-check.sh --package   (on the build machine) builds mgrun and the CUDA test binaries
#                                    and copies them, stripped, into target-gpu/
#   scripts/gpu-check.sh [OUT_DIR]   (on the GPU machine, from the repository root) runs the NCCL
#                                    and TCP-on-CUDA tests (ignored elsewhere: here they must run and
#                                    pass), the shim's CUDA tests, a 200-step quickstart run, a
#                                    deterministic-mode repeat, multi-rank runs on the one GPU
#                                    (--ranks-per-gpu, TCP backend) with a checkpoint and a resume
#                                    against the one-rank run, bench comm, the step benchmarks and
#                                    the PyTorch eager reference, and prints a summary table last.
# The binaries link libtorch through an rpath to the build machine's venv; shared/device/gpu-env.sh
# (or ../shared/device/gpu-env.sh) points the loader at the GPU machine's own torch 2.11 instead.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=target-gpu

if [[ "${1:-}" == "--package" ]]; then
    set -e
    : "${CARGO_TARGET_DIR:=target}"
    export CARGO_TARGET_DIR
    cargo build --release -p mgrun-launcher -j 2
    mkdir -p "$BIN"
    cp "$CARGO_TARGET_DIR/release/mgrun" "$BIN/mgrun"
    cp "$CARGO_TARGET_DIR/release/mgrun-comm-check" "$BIN/mgrun-comm-check"
    # `cargo test --no-run` prints "Executable tests/x.rs (path)" for each test binary it builds.
    for spec in "mgrun-collectives nccl" "mgrun-torch-shim shim"; do
        set -- $spec
        exe=$(cargo test --release -p "$1" --test "$2" --no-run -j 2 2>&1 | sed -n "s|.*Executable tests/$2.rs (\(.*\))|\1|p" | tail -n 1)
        if [[ -z "$exe" ]]; then echo "gpu-check: no test binary for $1 --test $2" >&2; exit 1; fi
        cp "$exe" "$BIN/test-$2"
    done
    exe=$(cargo test --release -p mgrun-launcher --bin mgrun --no-run -j 2 2>&1 | sed -n "s|.*Executable unittests src/main.rs (\(.*\))|\1|p" | tail -n 1)
    if [[ -z "$exe" ]]; then echo "gpu-check: no unit-test binary for the launcher" >&2; exit 1; fi
    cp "$exe" "$BIN/test-launcher"
    strip "$BIN"/mgrun "$BIN"/mgrun-comm-check "$BIN"/test-*
    # The GPU machine gets the working tree, not /work/shared: carry the loader set-up along.
    for env_script in shared/device/gpu-env.sh ../shared/device/gpu-env.sh /work/shared/device/gpu-env.sh; do
        if [[ -f "$env_script" ]]; then cp "$env_script" "$BIN/gpu-env.sh"; break; fi
    done
    ls -la "$BIN"
    exit 0
fi

OUT=${1:-${OUT:-runs/gpu-check}}
mkdir -p "$OUT"
STARTED=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
# shellcheck source=scripts/check-common.sh
source scripts/check-common.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for f in mgrun test-nccl test-shim; do
    [[ -x "$BIN/$f" ]] || echo "gpu-check: $BIN/$f is missing (run scripts/gpu-check.sh --package where Rust is)"
done
# The test binaries do not dlopen libtorch_cuda.so the way mgrun does: preload it for them.
TORCH_CUDA_PRELOAD="$TORCH_LIB/libtorch_cuda.so"

note "| check | result | time |"
note "|---|---|---|"
# --include-ignored: the CUDA tests are ignored where there is no GPU; here they must run, and they fail
# (instead of skipping) when CUDA is missing.
[[ -x "$BIN/test-nccl" ]] && run nccl-tests 180 env LD_PRELOAD="$TORCH_CUDA_PRELOAD" "$BIN/test-nccl" \
    --test-threads=1 --include-ignored
run shim-tests 60 env LD_PRELOAD="$TORCH_CUDA_PRELOAD" "$BIN/test-shim" --test-threads=1 --include-ignored
run launcher-nccl-link 60 "$BIN/test-launcher" --ignored ranks_can_load_nccl_by_the_name_cudarc_uses

# 200 quickstart steps on the GPU; held-out (test domain) accuracy must beat chance (1/classes).
run quickstart 180 "$BIN/mgrun" --gpus 1 --out "$OUT/quickstart" --set train.steps=200 configs/quickstart.toml
run quickstart-accuracy 10 "$PYTHON" - "$OUT/quickstart/results.jsonl" <<'EOF'
import json, sys
last = [json.loads(l) for l in open(sys.argv[1])][-1]
test = last["args"]["test_envs"][0]
classes = 5  # the synthetic shapes dataset
acc = max(last[f"env{test}_in_acc"], last[f"env{test}_out_acc"])
accs = {k: round(v, 3) for k, v in last.items() if k.endswith("_acc")}
print(f"step {last['step']}: held-out domain env{test} accuracy {acc:.3f} (chance {1 / classes:.3f}); {accs}")
sys.exit(0 if acc > 1 / classes else 1)
EOF

# Deterministic mode (bf16, cuDNN deterministic, deterministic algorithms): two runs, same losses.
for i in 1 2; do
    run "deterministic-$i" 120 "$BIN/mgrun" --gpus 1 --out "$OUT/det$i" --set train.steps=30 \
        --set train.deterministic=true --set train.precision=bf16 --set eval.every_steps=1000 configs/quickstart.toml
done
run deterministic-same 10 "$PYTHON" - "$OUT/det1/steps.jsonl" "$OUT/det2/steps.jsonl" <<'EOF'
import json, sys
a, b = ([json.loads(l)["loss"] for l in open(p)] for p in sys.argv[1:3])
print(f"losses run 1 {a[:3]}...{a[-1]}, run 2 {b[:3]}...{b[-1]}")
sys.exit(0 if a == b and len(a) == 30 else 1)
EOF

# Multi-rank runs on the one GPU: 3 ranks share it (--ranks-per-gpu 3, TCP backend through pinned host
# memory) in deterministic mode with a checkpoint at step 10, then a resume from it on 2 ranks. Per-step
# losses must equal the one-rank GPU run's within 1e-4 relative (deterministic mode aims at equality).
MR=(--set train.steps=30 --set train.deterministic=true --set eval.every_steps=1000
    --set checkpoint.every_steps=10 --set checkpoint.keep_last=0)
PAIRS=()
for method in erm dsp_reg sam; do
    run "mr-$method-1-rank" 180 "$BIN/mgrun" --gpus 1 --out "$OUT/mr-$method-w1" "${MR[@]}" \
        --set method.name=$method configs/quickstart.toml
    run "mr-$method-3-ranks" 240 "$BIN/mgrun" --gpus 3 --ranks-per-gpu 3 --out "$OUT/mr-$method-w3" "${MR[@]}" \
        --set method.name=$method configs/quickstart.toml
    run "mr-$method-resume-on-2" 240 "$BIN/mgrun" --gpus 2 --ranks-per-gpu 2 --out "$OUT/mr-$method-r2" \
        "${MR[@]}" --set method.name=$method --resume "$OUT/mr-$method-w3/checkpoints/step10" configs/quickstart.toml
    PAIRS+=("$method, 3 ranks on 1 GPU=$OUT/mr-$method-w1:$OUT/mr-$method-w3"
            "$method, step-10 checkpoint resumed on 2 ranks=$OUT/mr-$method-w1:$OUT/mr-$method-r2:10")
done
run multi-rank-compare 30 "$PYTHON" scripts/compare_runs.py "$OUT/multi-rank.md" 1e-4 "${PAIRS[@]}"

# NCCL at world size 1: only the per-call overhead (no inter-GPU traffic on a one-GPU machine).
run bench-comm 90 "$BIN/mgrun" --out "$OUT/bench-comm" bench comm --gpus 1 --max-mb 64

run bench-step 300 "$BIN/mgrun" bench step --gpus 1 --steps 20 --warmup 5 --phases --json "$OUT/mgrun-step.json"
run bench-step-nchw 90 "$BIN/mgrun" bench step --gpus 1 --methods erm --precision fp32 --channels-last false \
    --steps 20 --warmup 5 --json "$OUT/mgrun-step-nchw.json"
run pytorch-step 420 "$PYTHON" bench/pytorch_step.py --steps 20 --warmup 5 --optimizers foreach,fused --profile \
    --json "$OUT/pytorch-step.json" \
    --mgrun-json "$OUT/mgrun-step.json" "$OUT/mgrun-step-nchw.json"

# The one-GPU breakdown that feeds the scaling model (bench/results/*-scaling-model.md): predicted DomainNet
# run times on 1-16 GPUs of this card.
run scaling-model 60 bash -c "python3 bench/step_to_scaling_input.py '$OUT/mgrun-step.json' --card \"\$(cut -d, -f1 '$OUT/gpu.txt')\" \
    > '$OUT/scaling-input.json' && python3 bench/scaling_model.py --input-json '$OUT/scaling-input.json' \
    --markdown '$OUT/scaling-model.md'"
# A 2-rank-per-GPU quickstart with metrics and a trace: the per-phase breakdown as mgrun records it on CUDA.
run monitoring 180 "$BIN/mgrun" --gpus 2 --ranks-per-gpu 2 --quiet --out "$OUT/monitoring" --set train.steps=100 \
    --set trace.enabled=true --set eval.every_steps=50 configs/quickstart.toml

echo
echo "================ gpu-check summary ($(cat "$OUT/gpu.txt"), $(( $(date +%s) - STARTED )) s) ================"
grep -h "NCCL\|algbw\|busbw" "$OUT/bench-comm.log" 2>/dev/null | head -n 4
echo "(bench comm on one GPU: world size 1, so the numbers are the call overhead, not bandwidth)"
sed -n '/^| method | precision | channels_last | ms\/step/,/^$/p' "$OUT/bench-step.log"
grep -h "phases" "$OUT/bench-step.log"
sed -n '/^| method | precision | channels_last | mgrun img\/s/,$p' "$OUT/pytorch-step.log"
grep -h "predicted DomainNet run" "$OUT/scaling-model.md" 2>/dev/null | head -n 1
echo "multi-rank runs on one GPU (deterministic, TCP backend through pinned host memory):"
cat "$OUT/multi-rank.md" 2>/dev/null
cat "$SUMMARY"
! grep -q FAIL "$SUMMARY"
