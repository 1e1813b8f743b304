"""Reference for mgrun's ResNets: runs torchvision's model on a state dict written by mgrun.

Usage: check_resnet.py --arch resnet18 --num-classes 7 --state model.safetensors
                       --input input.safetensors --out out.safetensors [--train]

`input.safetensors` holds `images` (NCHW f32) and, with --train, `grad_weights` (same shape as the
logits). The script loads the state dict with strict=True (so every key and shape must match
torchvision), then writes to `out.safetensors`:
  logits_eval                 eval-mode logits
and with --train, after one train-mode forward (BN batch statistics, running stats updated) and a
backward of sum(logits_train * grad_weights):
  logits_train                train-mode logits
  state.<key>                 every state-dict entry after the train-mode forward
  grad.<name>                 the gradient of every parameter
"""

import argparse
import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchvision_model import add_model_arguments, model_with_state  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    parser.add_argument("--state", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", action="store_true")
    args = parser.parse_args()

    # One thread, as the Rust side: the same kernels' blocking where the CPU allows it.
    torch.set_num_threads(1)

    model = model_with_state(args, args.state)
    inputs = load_file(args.input)
    images = inputs["images"]

    out = {}
    model.eval()
    with torch.no_grad():
        out["logits_eval"] = model(images).contiguous()

    if args.train:
        model.train()
        logits = model(images)
        (logits * inputs["grad_weights"]).sum().backward()
        out["logits_train"] = logits.detach().contiguous()
        for key, value in model.state_dict().items():
            out[f"state.{key}"] = value.detach().clone().contiguous()
        for name, param in model.named_parameters():
            out[f"grad.{name}"] = param.grad.detach().clone().contiguous()

    save_file(out, args.out)


if __name__ == "__main__":
    main()
