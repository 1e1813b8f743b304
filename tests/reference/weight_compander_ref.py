"""Reference training steps for mgrun's `weight_compander` (our mu-law variant of Weight Compander,
/work/shared/reference/methods.md §5.3 and methods/src/weight_compander.rs), written with plain PyTorch:
each conv/linear weight (a parameter named `*.weight` that is not a norm layer's, i.e. of 2 or more
dimensions) is w = f(v) with f(v) = a sign(v) ln(1 + mu|v|)/ln(1 + mu); v is the leaf that
torch.optim.Adam updates, w is computed from it and autograd differentiates through f. Biases are
trained directly. Also an ERM case on the same data (plain parameters, the same Adam).

Usage: weight_compander_ref.py INPUT.safetensors CONFIG.json OUTPUT.safetensors

INPUT and CONFIG as regularizers_ref.py's (cases: {"name", "method", "adam", "section"}). OUTPUT:
`{name}.loss` (f64 per step) and `{name}.param.{name}` (the final effective weights w).
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from methods_ref import batches, make_adam, make_model, pooled  # noqa: E402


def compand(v, a, mu):
    return a * torch.sign(v) * torch.log(1 + mu * v.abs()) / math.log(1 + mu)


def inverse(w, a, mu):
    """f^-1 in double precision: sign(w) (exp(|w| ln(1 + mu)/a) - 1)/mu."""
    w = w.double()
    return (torch.sign(w) * (torch.exp(w.abs() * math.log(1 + mu) / a) - 1) / mu).float()


def main():
    inputs_path, config_path, output_path = sys.argv[1:4]
    torch.use_deterministic_algorithms(True)
    inputs = load_file(inputs_path)
    with open(config_path) as f:
        cfg = json.load(f)
    out = {}
    for case in cfg["cases"]:
        model = make_model(cfg, inputs)
        names = [n for n, _ in model.named_parameters()]
        modules = dict(model.named_modules())
        # Conv and linear weights only (a norm layer's weight is 1-D).
        companded = {
            n for n, p in model.named_parameters()
            if n.endswith(".weight") and isinstance(modules[n.rsplit(".", 1)[0]], (torch.nn.Conv2d, torch.nn.Linear))
        }
        sec = case["section"]
        on = case["method"] == "weight_compander"
        a, mu = sec.get("a", 0.25), sec.get("mu", 25.0)
        latent = {}
        for n, p in model.named_parameters():
            v = inverse(p.detach(), a, mu) if on and n in companded else p.detach().clone()
            latent[n] = v.requires_grad_(True)
        opt = make_adam([latent[n] for n in names], case.get("adam", {}))

        def effective():
            return {n: compand(latent[n], a, mu) if on and n in companded else latent[n] for n in names}

        losses = []
        for step in range(cfg["steps"]):
            x, y = pooled(batches(inputs, step, cfg["num_domains"]))
            loss = F.cross_entropy(functional_call(model, effective(), (x,)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        name = case["name"]
        out[f"{name}.loss"] = torch.tensor(losses, dtype=torch.float64)
        with torch.no_grad():
            for pname, w in effective().items():
                out[f"{name}.param.{pname}"] = w.detach().clone().contiguous()
    save_file(out, output_path)


if __name__ == "__main__":
    main()
