# mgrun: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VENV_STAMP := $(VENV)/.mgrun-venv-ok
# A user's own libtorch 2.11 wins; otherwise the venv's PyTorch provides it.
LIBTORCH ?= $(CURDIR)/$(VENV)/libtorch
export LIBTORCH
export MGRUN_PYTHON ?= $(CURDIR)/$(VENV)/bin/python
CARGO ?= cargo
MGRUN := target/release/mgrun

.PHONY: all prereqs venv weights build demo test lint fmt bench-comm gpu-package gpu-check slurm clean

all: build

# Checks Python 3 + venv/ensurepip, a C++ compiler, cargo and free disk; says how to get what is missing.
prereqs:
	PYTHON=$(PYTHON) bash scripts/check-prereqs.sh

venv: $(VENV_STAMP)

# Order-only: the check runs before every build, demo and test, but does not make pip run again.
$(VENV_STAMP): scripts/requirements.txt | prereqs
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r scripts/requirements.txt
	ln -sfn "$$($(VENV)/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" $(VENV)/libtorch
	touch $@

build: venv
	$(CARGO) build --release --workspace

# torchvision's ImageNet ResNet-50/18 weights (IMAGENET1K_V1, as DomainBed) for model.pretrained; needs the internet.
weights: venv
	$(VENV)/bin/python scripts/export_imagenet_weights.py weights

demo: build
	$(MGRUN) --cpus 2 --out runs/quickstart --overwrite configs/quickstart.toml

# The Slurm tests need a running Slurm: scripts/slurm-local.sh installs (root, apt) and starts one. If it
# cannot, the rest of the suite still runs and the Slurm tests fail, saying that Slurm is missing.
test: venv
	$(CARGO) build --release --workspace --all-targets
	bash scripts/slurm-local.sh start || echo "make test: no local Slurm (see above): the Slurm tests will fail"
	$(CARGO) test --release --workspace --no-fail-fast

lint: venv
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench-comm: build
	bash bench/comm_vs_gloo.sh

# GPU check: `make gpu-package` here (builds mgrun and the CUDA test binaries into target-gpu/),
# then `make gpu-check` on a one-GPU machine with PyTorch 2.11 (no Rust needed there).
gpu-package: venv
	bash scripts/gpu-check.sh --package

gpu-check:
	bash scripts/gpu-check.sh

slurm:
	bash scripts/slurm-local.sh start

clean:
	$(CARGO) clean
	rm -rf runs
