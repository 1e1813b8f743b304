#!/usr/bin/env bash
# All-reduce busbw of mgrun's TCP backend vs torch.distributed gloo, 2 and 4 ranks on this machine.
#
# Usage: bench/comm_vs_gloo.sh [max_mb] [out_dir]      (defaults: 64, a temporary directory)
# Needs a release build (`cargo build --release -p mgrun-collectives`, and the launcher for
# `mgrun bench comm`) and the project venv (.venv) for torch. Uses `mgrun bench comm --cpus N --max-mb M
# --json FILE` when the launcher provides it, else (or with MGRUN_BENCH_VIA=check) the test harness
# `mgrun-comm-check launch N bench ...`, which runs the same worker code (bench::bench_worker_main).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
max_mb="${1:-64}"
out="${2:-$(mktemp -d)}"
python="${MGRUN_PYTHON:-$root/.venv/bin/python}"
mgrun="$root/target/release/mgrun"
check="$root/target/release/mgrun-comm-check"
mkdir -p "$out"

run_ours() { # ranks json
    if [[ "${MGRUN_BENCH_VIA:-mgrun}" != check && -x "$mgrun" ]] && "$mgrun" bench comm --help >/dev/null 2>&1; then
        "$mgrun" bench comm --cpus "$1" --max-mb "$max_mb" --json "$2"
    elif [[ -x "$check" ]]; then
        "$check" launch "$1" bench "$((max_mb * 1024 * 1024))" "$2"
    else
        echo "neither $mgrun (with 'bench comm') nor $check exists: build in release mode first" >&2
        exit 1
    fi
}

for ranks in 2 4; do
    echo "== $ranks ranks: mgrun tcp =="
    run_ours "$ranks" "$out/tcp-$ranks.json"
    echo "== $ranks ranks: gloo =="
    "$python" "$root/bench/gloo_allreduce.py" --ranks "$ranks" --max-mb "$max_mb" --json "$out/gloo-$ranks.json"
done

"$python" - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
print("\n| ranks | size | tcp busbw (GB/s) | gloo busbw (GB/s) | tcp/gloo | tcp time (us) | gloo time (us) |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for ranks in (2, 4):
    ours = {r["bytes"]: r for r in json.load(open(f"{out}/tcp-{ranks}.json"))["rows"]}
    gloo = {r["bytes"]: r for r in json.load(open(f"{out}/gloo-{ranks}.json"))["rows"]}
    for size in sorted(set(ours) & set(gloo)):
        o, g = ours[size], gloo[size]
        label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
        print(f"| {ranks} | {label} | {o['busbw_gbps']:.3f} | {g['busbw_gbps']:.3f} | "
              f"{o['busbw_gbps'] / g['busbw_gbps']:.2f}x | {o['time_us']:.1f} | {g['time_us']:.1f} |")
EOF
echo "(JSON in $out)"
