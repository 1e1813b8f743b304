# Sourced by scripts/gpu-check.sh and scripts/multi-gpu-check.sh (from the repository root, with BIN,
# OUT and SUMMARY set): the PASS/FAIL table helpers and the GPU machine's loader set-up.

# note LINE: prints LINE and appends it to the summary table.
note() { echo "$1" | tee -a "$SUMMARY"; }

# run NAME TIMEOUT_S CMD...: runs CMD with a time limit, logs to $OUT/NAME.log, records PASS/FAIL.
run() {
    local name=$1 limit=$2
    shift 2
    local t0
    t0=$(date +%s)
    echo "=== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    local status=PASS
    [[ $rc -ne 0 ]] && status="FAIL(rc=$rc)"
    note "| $name | $status | $(( $(date +%s) - t0 )) s |"
    return "$rc"
}

# The binaries link libtorch through an rpath to the build machine's venv; gpu-env.sh points the loader
# at this machine's own torch 2.11 (and makes the libnccl.so link) instead.
for env_script in shared/device/gpu-env.sh "$BIN/gpu-env.sh" ../shared/device/gpu-env.sh; do
    if [[ -f "$env_script" ]]; then
        # shellcheck disable=SC1090
        source "$env_script"
        break
    fi
done
export PYTHON=${PYTHON:-python3}
