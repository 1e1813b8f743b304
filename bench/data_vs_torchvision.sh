#!/usr/bin/env bash
# `mgrun bench data` vs torchvision ImageFolder + DataLoader (PIL) on the same JPEGs, same transform, same
# number of workers, side by side. Usage: bench/data_vs_torchvision.sh [WORKERS...]   (default: 1 2)
# Env: ROOT (dataset dir; default: a generated tree of 500x375 JPEGs, like PACS/OfficeHome photos, in
# datasets/bench-500x375), IMAGES (images timed per run, default 1500), SIZE (crop size, default 224),
# MGRUN (binary; default target/release/mgrun or $CARGO_TARGET_DIR/release/mgrun), PYTHON (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=("${@:-1 2}")
[ $# -eq 0 ] && WORKERS=(1 2)
IMAGES=${IMAGES:-1500}
SIZE=${SIZE:-224}
PYTHON=${PYTHON:-.venv/bin/python}
source bench/common.sh
ROOT=${ROOT:-datasets/bench-500x375}

if [ ! -d "$ROOT" ]; then
  echo "writing a 4-domain x 5-class x 25-image tree of 500x375 JPEGs to $ROOT"
  "$PYTHON" - "$ROOT" <<'PY'
import os, sys
import numpy as np
from PIL import Image, ImageFilter
root = sys.argv[1]
rng = np.random.default_rng(0)
for d in ["art", "cartoon", "photo", "sketch"]:
    for c in range(5):
        os.makedirs(f"{root}/{d}/class_{c}", exist_ok=True)
        for i in range(25):
            # Photo-like content: smooth colour fields plus texture, so the JPEG has realistic entropy.
            base = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((500, 375), Image.BICUBIC)
            noise = rng.normal(0, 18, (375, 500, 3))
            arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).filter(ImageFilter.SMOOTH).save(f"{root}/{d}/class_{c}/{i:03d}.jpg", quality=90)
PY
fi

echo "machine: $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "| workers | mgrun img/s | mgrun img/s/worker | torchvision img/s | torchvision img/s/worker | ratio |"
echo "|---|---|---|---|---|---|"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for w in "${WORKERS[@]}"; do
  "$MGRUN" bench data --root "$ROOT" --workers "$w" --images "$IMAGES" --image-size "$SIZE" --json "$tmp/ours.json" >&2
  "$PYTHON" bench/torchvision_data.py --root "$ROOT" --workers "$w" --images "$IMAGES" --size "$SIZE" \
    --json "$tmp/tv.json" >&2
  "$PYTHON" - "$tmp/ours.json" "$tmp/tv.json" <<'PY'
import json, sys
o, t = (json.load(open(p)) for p in sys.argv[1:3])
print(f"| {o['workers']} | {o['images_per_s']:.0f} | {o['images_per_s_per_worker']:.0f} | "
      f"{t['images_per_s']:.0f} | {t['images_per_s_per_worker']:.0f} | "
      f"{o['images_per_s'] / t['images_per_s']:.2f}x |")
PY
done
