"""Checks that a `model.safetensors` written by mgrun loads into torchvision with strict=True and
gives mgrun's eval-mode logits.

Usage: check_export.py --arch resnet18 --num-classes 7 --state model.safetensors --io io.safetensors

`io.safetensors` holds `images` and mgrun's `logits_eval`. Prints the max abs logit difference;
exits non-zero when loading fails or the difference exceeds 1e-4.
"""

import argparse
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchvision_model import add_model_arguments, model_with_state  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    parser.add_argument("--state", required=True)
    parser.add_argument("--io", required=True)
    args = parser.parse_args()
    model = model_with_state(args, args.state)
    model.eval()
    io = load_file(args.io)
    with torch.no_grad():
        logits = model(io["images"])
    diff = (logits - io["logits_eval"]).abs().max().item()
    print(f"max_abs_diff {diff:.3e}")
    sys.exit(0 if diff <= 1e-4 else 1)


if __name__ == "__main__":
    main()
