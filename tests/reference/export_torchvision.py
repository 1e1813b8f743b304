"""Exports a randomly initialised torchvision ResNet as mgrun's `model.pretrained` expects it, with
a test input and the model's eval-mode logits for the import test.

Usage: export_torchvision.py --arch resnet18 --num-classes 7 --out DIR [--seed 0]

Writes DIR/weights.safetensors (the state dict, torchvision names) and DIR/io.safetensors
(`images` NCHW f32 and `logits_eval`). BatchNorm running statistics are randomised so that the
eval-mode comparison exercises them. ImageNet weights: `make weights` (scripts/export_imagenet_weights.py).
"""

import argparse
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchvision_model import add_model_arguments, untrained_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = untrained_model(args)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.num_batches_tracked.fill_(7)
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
    os.makedirs(args.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(args.out, "weights.safetensors"))
    save_file({"images": images, "logits_eval": logits}, os.path.join(args.out, "io.safetensors"))


if __name__ == "__main__":
    main()
