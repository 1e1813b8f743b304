#!/usr/bin/env bash
# Checks what `make build`, `make demo` and `make test` need before they start: Python 3 with venv and
# ensurepip (pip), a C++ compiler (torch-sys compiles tch's C++ wrapper), cargo/rustc, and free disk.
# Prints one line per missing thing, saying how to get it, and exits 1 if anything is missing.
# Env: PYTHON (default python3), CXX (a compiler to use instead of c++/g++).
set -u
cd "$(dirname "$0")/.." || exit 1

python=${PYTHON:-python3}
missing=0
need() {
    echo "missing: $1" >&2
    missing=1
}

if ! command -v "$python" >/dev/null 2>&1; then
    need "$python (Python 3). Debian/Ubuntu: apt install python3 python3-venv; macOS: brew install python"
else
    if ! "$python" -m venv --help >/dev/null 2>&1; then
        need "the venv module of $python. Debian/Ubuntu: apt install python3-venv"
    fi
    # Debian ships venv without ensurepip; `python3 -m venv` then fails to install pip into the venv.
    if ! "$python" -c 'import ensurepip' >/dev/null 2>&1; then
        need "ensurepip (pip inside a venv) for $python. Debian/Ubuntu: apt install python3-venv"
    fi
fi

compiler=""
for candidate in ${CXX:-} c++ g++ clang++; do
    if command -v "$candidate" >/dev/null 2>&1; then
        compiler=$candidate
        break
    fi
done
if [[ -z $compiler ]]; then
    need "a C++ compiler (c++, g++ or clang++; torch-sys compiles tch's C++ wrapper). Debian/Ubuntu: apt install g++"
fi

for tool in cargo rustc; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        need "$tool (Rust). Install rustup: curl --proto '=https' -sSf https://sh.rustup.rs | sh, then open a new shell"
    fi
done

# Measured (December 2026): the pip download is 2.6 GiB (torch's wheel alone 0.5 GiB), the venv 4.7 GiB
# once installed, target/ 4.7 GiB after `make test` on a fresh clone (more with incremental builds). Only what is not there yet is counted.
need_gib=1
[[ -f .venv/.mgrun-venv-ok ]] || need_gib=$((need_gib + 8))
[[ -d target/release ]] || need_gib=$((need_gib + 7))
free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
free_gib=$((${free_kib:-0} / 1024 / 1024))
if [[ -n $free_kib ]] && ((free_kib < need_gib * 1024 * 1024)); then
    need "disk space: $free_gib GiB free in $(pwd), the set-up needs about $need_gib GiB (venv 4.7 GiB + pip cache 2.6 GiB, target/ up to 7 GiB). Free some space or clone elsewhere"
fi

if ((missing)); then
    echo "check-prereqs: install the above, then rerun make" >&2
    exit 1
fi
echo "check-prereqs: ok ($("$python" --version 2>&1), $compiler, $(cargo --version), $free_gib GiB free)"
