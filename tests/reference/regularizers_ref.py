"""Reference training steps for mgrun's regularizer methods (OCNN, ELR, PS-KD, AdvStyle), written
from the formulas in /work/shared/reference/methods.md §5 (and each method's doc comment) with plain
PyTorch autograd and torch.optim.Adam; shared helpers come from methods_ref.py.

Also `weight_compander` (our mu-law variant of Weight Compander, methods.md §5.3 and
methods/src/weight_compander.rs): each conv/linear weight (a parameter named `*.weight` of a Conv2d or
Linear module) is w = f(v) with f(v) = a sign(v) ln(1 + mu|v|)/ln(1 + mu); v is the leaf that
torch.optim.Adam updates, w is computed from it and autograd differentiates through f. Biases are
trained directly. Its `{name}.param.*` are the final effective weights w.

Usage: regularizers_ref.py INPUT.safetensors CONFIG.json OUTPUT.safetensors

INPUT is methods_ref.py's plus `ids.{step}.{domain}` (each image's index in its domain's file list).
CONFIG is {"width", "num_classes", "steps", "num_domains", "cases": [{"name", "method", "adam",
"section": {...}, "total_steps"}]}. OUTPUT: `{name}.loss` (f64 per step) and `{name}.param.{name}`.
"""
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from methods_ref import apply_update, batches, make_adam, make_model, pooled, read_run, record, start_case  # noqa: E402


def step_ids(inputs, step, num_domains):
    """(domain, id) of every image of the pooled batch, in batch order."""
    return [(e, int(i)) for e in range(num_domains) for i in inputs[f"ids.{step}.{e}"].tolist()]


def erm_step(model, params, opt, doms, cfg, state, step, ids, total):
    x, y = pooled(doms)
    loss = F.cross_entropy(model(x), y)
    apply_update(params, torch.autograd.grad(loss, params), opt)
    return loss.item()


def orth_matrix(w):
    m = w.reshape(w.shape[0], -1)
    if m.shape[0] < m.shape[1]:
        m = m.t()
    return torch.linalg.matrix_norm(m.t() @ m - torch.eye(m.shape[1]))


def orth_kernel(k, stride):
    co, _, kh, _ = k.shape
    padding = (kh - 1) // stride * stride
    out = F.conv2d(k, k, stride=stride, padding=padding)
    target = torch.zeros_like(out)
    target[:, :, out.shape[2] // 2, out.shape[3] // 2] = torch.eye(co)
    return torch.sqrt(((out - target) ** 2).sum())


def ocnn_step(model, params, opt, doms, cfg, state, step, ids, total):
    x, y = pooled(doms)
    ce = F.cross_entropy(model(x), y)
    penalty = 0.0
    convs = [(n, p) for n, p in model.named_parameters() if p.dim() == 4]
    for i, (name, p) in enumerate(convs):
        if i == 0 and cfg["skip_first_conv"]:
            continue
        if p.shape[2] == 1 and p.shape[3] == 1:
            penalty = penalty + orth_matrix(p)
        else:
            penalty = penalty + orth_kernel(p, 2 if name in cfg["strided"] else 1)
    if cfg["linear"]:
        for name, p in model.named_parameters():
            if p.dim() == 2:
                penalty = penalty + orth_matrix(p)
    loss = ce + cfg["lambda"] * penalty
    apply_update(params, torch.autograd.grad(loss, params), opt)
    return ce.item()


def table(state, key, domain, rows, width):
    tables = state.setdefault(key, {})
    return tables.setdefault(domain, torch.zeros(rows, width))


def elr_step(model, params, opt, doms, cfg, state, step, ids, total):
    x, y = pooled(doms)
    logits = model(x)
    p = F.softmax(logits, dim=1).clamp(1e-4, 1 - 1e-4)
    d = p.detach()
    p_hat = d / d.sum(dim=1, keepdim=True)
    old = torch.stack([table(state, "t", e, 64, logits.shape[1])[i] for e, i in ids])
    t = cfg["beta"] * old + (1 - cfg["beta"]) * p_hat
    ce = F.cross_entropy(logits, y)
    loss = ce + cfg["lambda"] * torch.log(1 - (t * p).sum(dim=1)).mean()
    apply_update(params, torch.autograd.grad(loss, params), opt)
    for n, (e, i) in enumerate(ids):  # batch order: the last copy of an id wins
        state["t"][e][i] = t[n].detach()
    return ce.item()


def ps_kd_step(model, params, opt, doms, cfg, state, step, ids, total):
    x, y = pooled(doms)
    logits = model(x)
    c = logits.shape[1]
    onehot = F.one_hot(y, c).float()
    alpha = cfg["alpha_t"] * (step + 1) / total
    seen = state.setdefault("seen", set())
    prev = torch.stack(
        [table(state, "pi", e, 64, c)[i] if (e, i) in seen else onehot[n] for n, (e, i) in enumerate(ids)]
    )
    target = (1 - alpha) * onehot + alpha * prev
    loss = (-target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    ce = F.cross_entropy(logits, y)
    apply_update(params, torch.autograd.grad(loss, params), opt)
    soft = F.softmax(logits, dim=1).detach()
    for n, (e, i) in enumerate(ids):
        table(state, "pi", e, 64, c)[i] = soft[n]
        seen.add((e, i))
    return ce.item()


def advstyle_step(model, params, opt, doms, cfg, state, step, ids, total):
    x, y = pooled(doms)
    mu = x.mean(dim=(2, 3), keepdim=True)
    sig = (x.var(dim=(2, 3), keepdim=True) + 1e-5).sqrt()
    normed = (x - mu) / sig
    adv_mu = mu.clone().requires_grad_(True)
    adv_sig = sig.clone().requires_grad_(True)
    ascent = torch.optim.SGD([adv_mu, adv_sig], lr=cfg["lr"])
    (-F.cross_entropy(model(normed * adv_sig + adv_mu), y)).backward(inputs=[adv_mu, adv_sig])
    ascent.step()
    x_adv = (normed * adv_sig + adv_mu).detach()
    logits = model(torch.cat([x, x_adv]))
    loss = F.cross_entropy(logits, torch.cat([y, y]))
    apply_update(params, torch.autograd.grad(loss, params), opt)
    return F.cross_entropy(logits[: len(y)], y).item()


STEPS = {"erm": erm_step, "ocnn": ocnn_step, "elr": elr_step, "ps_kd": ps_kd_step, "advstyle": advstyle_step}


def compand(v, a, mu):
    return a * torch.sign(v) * torch.log(1 + mu * v.abs()) / math.log(1 + mu)


def inverse(w, a, mu):
    """f^-1 in double precision: sign(w) (exp(|w| ln(1 + mu)/a) - 1)/mu."""
    w = w.double()
    return (torch.sign(w) * (torch.exp(w.abs() * math.log(1 + mu) / a) - 1) / mu).float()


def weight_compander_case(cfg, inputs, case):
    """The whole run (Adam steps the latent v, not the model's parameters): the losses and the final
    effective weights."""
    model = make_model(cfg, inputs)
    names = [n for n, _ in model.named_parameters()]
    modules = dict(model.named_modules())
    # Conv and linear weights only (a norm layer's weight is 1-D).
    companded = {
        n for n, p in model.named_parameters()
        if n.endswith(".weight") and isinstance(modules[n.rsplit(".", 1)[0]], (torch.nn.Conv2d, torch.nn.Linear))
    }
    sec = case["section"]
    a, mu = sec.get("a", 0.25), sec.get("mu", 25.0)
    latent = {}
    for n, p in model.named_parameters():
        v = inverse(p.detach(), a, mu) if n in companded else p.detach().clone()
        latent[n] = v.requires_grad_(True)
    opt = make_adam([latent[n] for n in names], case.get("adam", {}))

    def effective():
        return {n: compand(latent[n], a, mu) if n in companded else latent[n] for n in names}

    losses = []
    for step in range(cfg["steps"]):
        x, y = pooled(batches(inputs, step, cfg["num_domains"]))
        loss = F.cross_entropy(functional_call(model, effective(), (x,)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        return losses, list(effective().items())


def main():
    inputs, cfg, output_path = read_run()
    out = {}
    for case in cfg["cases"]:
        if case["method"] == "weight_compander":
            record(out, case["name"], *weight_compander_case(cfg, inputs, case))
            continue
        model, params, opt = start_case(cfg, inputs, case)
        state, losses = {}, []
        for step in range(cfg["steps"]):
            doms = batches(inputs, step, cfg["num_domains"])
            ids = step_ids(inputs, step, cfg["num_domains"])
            step_fn = STEPS[case["method"]]
            losses.append(step_fn(model, params, opt, doms, case["section"], state, step, ids, case["total_steps"]))
        record(out, case["name"], losses, model.named_parameters())
    save_file(out, output_path)


if __name__ == "__main__":
    main()
