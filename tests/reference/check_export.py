"""Checks that a `model.safetensors` written by mgrun loads into torchvision with strict=True and
gives mgrun's eval-mode logits.

Usage: check_export.py --arch resnet18 --num-classes 7 --state model.safetensors --io io.safetensors

`io.safetensors` holds `images` and mgrun's `logits_eval`. Prints the max abs logit difference;
exits non-zero when loading fails or the difference exceeds 1e-4.
"""

import argparse
import sys

import torch
import torchvision
from safetensors.torch import load_file


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", required=True, choices=["resnet18", "resnet50"])
    parser.add_argument("--num-classes", type=int, required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--io", required=True)
    args = parser.parse_args()
    model = getattr(torchvision.models, args.arch)(num_classes=args.num_classes)
    model.load_state_dict(load_file(args.state), strict=True)
    model.eval()
    io = load_file(args.io)
    with torch.no_grad():
        logits = model(io["images"])
    diff = (logits - io["logits_eval"]).abs().max().item()
    print(f"max_abs_diff {diff:.3e}")
    sys.exit(0 if diff <= 1e-4 else 1)


if __name__ == "__main__":
    main()
