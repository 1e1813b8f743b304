#!/usr/bin/env bash
# The training step on one CPU rank against PyTorch eager on the same libtorch, side by side.
# Usage: bench/cpu_step.sh [CONFIGS="resnet18:28:10:5 resnet18:64:5:3 resnet50:64:3:3"]
# Each config is ARCH:PIXELS:TIMED_STEPS:ROUNDS; 5 domains x 32 images, 10 classes, fp32, Adam, 2 warm-up
# steps.
#   1. `mgrun bench step --vs-pytorch --phases --rounds R`: erm, dsp_reg and sam, then the same steps in
#      bench/pytorch_step.py with foreach Adam (PyTorch's default) and with fused Adam, method by method,
#      in R rounds; speed = PyTorch time / mgrun time (the median of the rounds' ratios, and their
#      range), per method and per phase of the ERM step.
#   2. `mgrun bench step --ranks 5 --rounds R`: rank 0 of a 5-rank job (one domain per rank, no
#      communication): DSP-Reg's and SAM's step against ERM's.
# PyTorch comes from $MGRUN_PYTHON (default .venv/bin/python).
set -euo pipefail
CONFIGS=${1:-"resnet18:28:10:5 resnet18:64:5:3 resnet50:64:3:3"}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export MGRUN_PYTHON=${MGRUN_PYTHON:-.venv/bin/python}
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; mgrun $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
for config in $CONFIGS; do
    IFS=: read -r arch px steps rounds <<<"$config"
    shape=(--cpus 1 --arch "$arch" --image-size "$px" --domains 5 --batch-per-domain 32 --classes 10
        --methods erm,dsp_reg,sam --precision fp32 --steps "$steps" --warmup 2 --rounds "$rounds")
    echo
    echo "== $arch, ${px}x${px}, 5 domains x 32 images: whole batch on one rank, against PyTorch"
    "$MGRUN" bench step "${shape[@]}" --phases --vs-pytorch | sed -n '/^medians of/,$p'
    echo
    echo "== $arch, ${px}x${px}: rank 0 of 5 (one domain of 32 images per rank)"
    "$MGRUN" bench step "${shape[@]}" --ranks 5 | sed -n '/^medians of/,$p'
done
