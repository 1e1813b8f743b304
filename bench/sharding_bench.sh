#!/usr/bin/env bash
# The sharding plan's balance, and the cost of deterministic mode per step, side by side.
# Usage: bench/sharding_bench.sh [ARCH=small_cnn] [STEPS=40] [DIR=/tmp/mgrun-sharding-bench]
#   1. `mgrun bench sharding`: images per rank and modelled efficiency, first plan vs balanced plan;
#   2. for W = 1, 2, 4 CPU ranks: the same job (3 synthetic domains x 32 images, 32 px) on the fast
#      path and in deterministic mode (micro-batches of 8), one after the other with the same threads
#      per rank, for erm, dsp_reg and sam, median step time of each
#      (from steps.jsonl, the first 5 steps dropped), and the ratio deterministic / fast.
set -euo pipefail
ARCH=${1:-small_cnn}; STEPS=${2:-40}; DIR=${3:-/tmp/mgrun-sharding-bench}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PYTHON=${PYTHON:-python3}
synthetic_bench_dir "$DIR" 20
echo "== mgrun bench sharding"
"$MGRUN" bench sharding
synthetic_data_table "$DIR" photo 32 > "$DIR/job.toml"
cat >> "$DIR/job.toml" <<TOML
[model]
arch = "$ARCH"
width = 32
[train]
steps = $STEPS
lr = 1e-3
progress_every_s = 1000.0
micro_batch = 8
[eval]
every_steps = 100000
[method]
name = "dsp_reg"
TOML
median() { "$PYTHON" -c "import json,sys,statistics; t=[json.loads(l)['step_time'] for l in open(sys.argv[1])][5:]; print(f'{statistics.median(t)*1e3:.1f}')" "$1"; }
echo
CORES=$(nproc)
echo "== $ARCH, 3 domains x 32 images of 32 px, $STEPS steps; median step time (ms); both modes with cores / ranks threads per rank ($CORES cores)"
echo "| ranks | method | fast path | deterministic (micro-batch 8) | deterministic / fast |"
echo "|---:|---|---:|---:|---:|"
for method in erm dsp_reg sam; do
    for w in 1 2 4; do
        threads=$(( CORES / w > 0 ? CORES / w : 1 ))
        "$MGRUN" --cpus "$w" --out "$DIR/fast-$method-w$w" --set method.name=$method --set train.threads=$threads \
            "$DIR/job.toml" >/dev/null
        "$MGRUN" --cpus "$w" --out "$DIR/det-$method-w$w" --set method.name=$method --set train.threads=$threads \
            --set train.deterministic=true "$DIR/job.toml" >/dev/null
        fast=$(median "$DIR/fast-$method-w$w/steps.jsonl"); det=$(median "$DIR/det-$method-w$w/steps.jsonl")
        echo "| $w | $method | $fast | $det | $("$PYTHON" -c "print(f'{$det/$fast:.2f}x')") |"
    done
done
