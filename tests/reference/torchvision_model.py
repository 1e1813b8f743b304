"""The torchvision ResNet of the reference scripts' command line (`--arch`, `--num-classes`), untrained
or with a state dict written by mgrun."""

import torchvision
from safetensors.torch import load_file


def add_model_arguments(parser):
    parser.add_argument("--arch", required=True, choices=["resnet18", "resnet50"])
    parser.add_argument("--num-classes", type=int, required=True)


def untrained_model(args):
    return getattr(torchvision.models, args.arch)(weights=None, num_classes=args.num_classes)


def model_with_state(args, state_path):
    """The model with the state dict at `state_path` loaded with strict=True, so that every key and shape
    must match torchvision's."""
    model = untrained_model(args)
    model.load_state_dict(load_file(state_path), strict=True)
    return model
