"""Writes torchvision's ImageNet ResNet weights (IMAGENET1K_V1, the ones DomainBed used) as the
safetensors state dicts that mgrun's `model.pretrained` loads: weights/resnet50_v1.safetensors and
weights/resnet18_v1.safetensors. Needs the internet (torchvision downloads them once).

Usage: python scripts/export_imagenet_weights.py [OUT_DIR]
"""
import os
import sys

import torchvision
from safetensors.torch import save_file


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "weights"
    os.makedirs(out, exist_ok=True)
    for arch in ["resnet50", "resnet18"]:
        try:
            model = getattr(torchvision.models, arch)(weights="IMAGENET1K_V1")
        except OSError as error:  # urllib's URLError included
            sys.exit(f"make weights: could not download torchvision's {arch} IMAGENET1K_V1 weights ({error}); "
                     "run it where download.pytorch.org is reachable and copy the weights/ directory here")
        path = os.path.join(out, f"{arch}_v1.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
