#!/usr/bin/env bash
# Multi-GPU check of mgrun, for a node with N >= 2 GPUs and PyTorch 2.11 (no Rust needed there).
#
#   scripts/gpu-check.sh --package      (where Rust is) builds mgrun and mgrun-comm-check into target-gpu/
#   scripts/multi-gpu-check.sh [OUT]    (on the GPU node, from the repository root; MAX_GPUS=K caps N)
#
# Runs unattended and prints one table last (PASS/FAIL per check, then the bandwidth table):
#   1. NCCL all-reduce (sum, avg, max), broadcast from every root and all-gather of f32, f64, bf16,
#      f16 and i64 against a sequential reference, at every world size 2..N, plus the split into parity
#      groups that domain groups use (mgrun-comm-check device-correctness);
#   2. a rank that stops answering: the others time out within comm.timeout_s and abort NCCL, nobody
#      hangs (mgrun-comm-check fail ... stall);
#   3. world-size invariance on NCCL: deterministic quickstart runs of erm, dsp_reg and global/local
#      sam on 1..N GPUs give the one-GPU run's losses and weights (bit-identical is the goal);
#   4. `mgrun bench comm --gpus N`: all-reduce busbw per message size.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target-gpu}
OUT=${1:-runs/multi-gpu-check}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
: >"$SUMMARY"
STARTED=$(date +%s)
# shellcheck source=scripts/check-common.sh
source scripts/check-common.sh
for f in mgrun mgrun-comm-check; do
    [[ -x "$BIN/$f" ]] || { echo "multi-gpu-check: $BIN/$f is missing (run scripts/gpu-check.sh --package where Rust is)"; exit 1; }
done
N=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
[[ -n "${MAX_GPUS:-}" && "$MAX_GPUS" -lt "$N" ]] && N=$MAX_GPUS
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n "$N" | tee "$OUT/gpus.txt"
if [[ "$N" -lt 2 ]]; then
    echo "multi-gpu-check: $N GPU visible; this check needs at least 2 (scripts/gpu-check.sh covers one GPU)"
    exit 1
fi
# mgrun-comm-check's ranks take GPU LOCAL_RANK; mgrun sets up libnccl.so for its own ranks, the checker
# needs it on LD_LIBRARY_PATH (gpu-env.sh provides it).
export MGRUN_DEVICE=cuda MGRUN_CHECK_BACKEND=nccl

note "| check | result | time |"
note "|---|---|---|"
for ((w = 2; w <= N; w++)); do
    run "nccl-collectives-$w-gpus" 300 "$BIN/mgrun-comm-check" launch "$w" device-correctness
done

# A stalled rank: with a 5 s timeout the others must fail (Timeout) within about 5 s and exit.
run nccl-stalled-rank 90 env MGRUN_COMM_TIMEOUT_S=5 "$BIN/mgrun-comm-check" launch "$N" fail 1 stall
run nccl-stalled-rank-detected 10 "$PYTHON" - "$OUT/nccl-stalled-rank.log" "$N" <<'PY'
import re, sys
text, n = open(sys.argv[1]).read(), int(sys.argv[2])
results = re.findall(r"RESULT rank=(\d+) elapsed_ms=(\d+) kind=(\S+)", text)
print(results)
ok = len(results) == n - 1 and all(kind == "Timeout" and int(ms) < 5000 + 5000 for _, ms, kind in results)
sys.exit(0 if ok else 1)
PY

# World-size invariance on NCCL, deterministic mode.
DET=(--set train.steps=30 --set train.deterministic=true --set eval.every_steps=1000 --set checkpoint.every_steps=0)
PAIRS=()
for spec in "erm:" "dsp_reg:" "sam:global" "sam:local"; do
    method=${spec%%:*}
    perturb=${spec#*:}
    extra=()
    [[ -n "$perturb" ]] && extra=(--set "method.sam.perturb=$perturb")
    label=$method${perturb:+-$perturb}
    for ((w = 1; w <= N; w++)); do
        run "invariance-$label-$w-gpus" 300 "$BIN/mgrun" --gpus "$w" --out "$OUT/inv-$label-w$w" "${DET[@]}" \
            --set method.name=$method "${extra[@]}" configs/quickstart.toml
        [[ $w -gt 1 ]] && PAIRS+=("$label, $w GPUs=$OUT/inv-$label-w1:$OUT/inv-$label-w$w")
    done
done
run nccl-world-size-invariance 60 "$PYTHON" scripts/compare_runs.py "$OUT/invariance.md" 1e-4 "${PAIRS[@]}"

run bench-comm 300 "$BIN/mgrun" --out "$OUT/bench-comm" bench comm --gpus "$N" --max-mb 256

echo
echo "================ multi-gpu-check ($N x $(head -n 1 "$OUT/gpus.txt"), $(( $(date +%s) - STARTED )) s) ================"
echo "world-size invariance on NCCL (deterministic mode):"
cat "$OUT/invariance.md" 2>/dev/null
echo "all_reduce bandwidth on $N GPUs:"
sed -n '/^| size |/,/^$/p' "$OUT/bench-comm.log"
cat "$SUMMARY"
! grep -q FAIL "$SUMMARY"
