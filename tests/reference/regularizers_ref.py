"""Reference training steps for mgrun's regularizer methods (OCNN, ELR, PS-KD, AdvStyle), written
from the formulas in /work/shared/reference/methods.md §5 (and each method's doc comment) with plain
PyTorch autograd and torch.optim.Adam; shared helpers come from methods_ref.py.

Usage: regularizers_ref.py INPUT.safetensors CONFIG.json OUTPUT.safetensors

INPUT is methods_ref.py's plus `ids.{step}.{domain}` (each image's index in its domain's file list).
CONFIG is {"width", "num_classes", "steps", "num_domains", "cases": [{"name", "method", "adam",
"section": {...}, "total_steps"}]}. OUTPUT: `{name}.loss` (f64 per step) and `{name}.param.{name}`.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from methods_ref import apply_update, batches, make_adam, make_model, pooled  # noqa: E402


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


def main():
    inputs_path, config_path, output_path = sys.argv[1:4]
    torch.use_deterministic_algorithms(True)
    inputs = load_file(inputs_path)
    with open(config_path) as f:
        cfg = json.load(f)
    out = {}
    for case in cfg["cases"]:
        model = make_model(cfg, inputs)
        params = list(model.parameters())
        opt = make_adam(params, case.get("adam", {}))
        state, losses = {}, []
        for step in range(cfg["steps"]):
            doms = batches(inputs, step, cfg["num_domains"])
            ids = step_ids(inputs, step, cfg["num_domains"])
            step_fn = STEPS[case["method"]]
            losses.append(step_fn(model, params, opt, doms, case["section"], state, step, ids, case["total_steps"]))
        name = case["name"]
        out[f"{name}.loss"] = torch.tensor(losses, dtype=torch.float64)
        for pname, p in model.named_parameters():
            out[f"{name}.param.{pname}"] = p.detach().clone().contiguous()
    save_file(out, output_path)


if __name__ == "__main__":
    main()
