#!/usr/bin/env bash
# Checkpoint stall and write throughput vs the disk's own sequential write speed, same directory.
# Usage: bench/checkpoint_bench.sh [RANKS=2] [ARCH=resnet18] [DIR=/tmp/mgrun-ckpt-bench]
set -euo pipefail
RANKS=${1:-2}; ARCH=${2:-resnet18}; DIR=${3:-/tmp/mgrun-ckpt-bench}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
synthetic_bench_dir "$DIR" 4
echo "== disk: 512 MiB sequential write + fsync (dd) in $DIR"
dd if=/dev/zero of="$DIR/dd.bin" bs=1M count=512 conv=fsync 2>&1 | tail -1; rm -f "$DIR/dd.bin"
synthetic_data_table "$DIR" sketch 4 > "$DIR/job.toml"
cat >> "$DIR/job.toml" <<TOML
[model]
arch = "$ARCH"
[train]
steps = 8
progress_every_s = 1000.0
[eval]
every_steps = 1000
[method]
name = "dsp_reg"
[checkpoint]
every_steps = 2
keep_last = 2
TOML
echo "== mgrun: $ARCH, $RANKS CPU rank(s), DSP-Reg (params + Adam moments + DSP statistics), checkpoint every 2 steps"
"$MGRUN" --cpus "$RANKS" --out "$DIR/run" "$DIR/job.toml" 2>&1 | grep -E "checkpoint step|done:"
du -sh "$DIR"/run/checkpoints/step* | tail -1
