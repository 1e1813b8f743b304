"""Reference training steps for mgrun's methods, written straight from the formulas in
/work/shared/reference/methods.md with plain PyTorch autograd and torch.optim.Adam.

Usage: methods_ref.py INPUT.safetensors CONFIG.json OUTPUT.safetensors

INPUT holds the initial SmallCnn weights (state-dict names) and the batches `x.{step}.{domain}`,
`y.{step}.{domain}`. CONFIG is {"width", "num_classes", "steps", "num_domains", "cases": [{"name",
"method", "adam": {...}, and a section per method ("sam": {...}, "dsp_reg": {...}, ...), "total_steps"}]}.
OUTPUT gets, per case, `{name}.loss` (f64, one per step), `{name}.extra.{key}` (f64 per step) and
`{name}.param.{param name}` (final weights).

Everything here works per parameter tensor (no flat buffer), so it checks the Rust flat layout too.
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from small_cnn import SmallCnn  # noqa: E402


def make_model(cfg, weights):
    model = SmallCnn(cfg["width"], cfg["num_classes"], dropout=0.0)
    model.load_state_dict({k: weights[k] for k in model.state_dict().keys()})
    model.train()
    return model


def make_adam(params, adam):
    # AdamW is its own class (decoupled weight decay); foreach=False: the single-tensor loop.
    optimizer = torch.optim.AdamW if adam.get("decoupled_weight_decay", False) else torch.optim.Adam
    return optimizer(
        params,
        lr=adam.get("lr", 5e-5),
        betas=(adam.get("beta1", 0.9), adam.get("beta2", 0.999)),
        eps=adam.get("eps", 1e-8),
        weight_decay=adam.get("weight_decay", 0.0),
        foreach=False,
    )


def batches(inputs, step, num_domains):
    return [(inputs[f"x.{step}.{e}"], inputs[f"y.{step}.{e}"]) for e in range(num_domains)]


def pooled(doms):
    """Every domain's images and labels as one batch."""
    return torch.cat([d[0] for d in doms]), torch.cat([d[1] for d in doms])


def apply_update(params, update, opt):
    """The base optimizer's step on `update` as the gradient."""
    for p, u in zip(params, update):
        p.grad = u
    opt.step()


def restore(params, saved):
    """Puts back the parameters saved before a SAM perturbation."""
    with torch.no_grad():
        for p, o in zip(params, saved):
            p.copy_(o)


def erm_step(model, params, opt, doms, case, state, step):
    x, y = pooled(doms)
    loss = F.cross_entropy(model(x), y)
    apply_update(params, torch.autograd.grad(loss, params), opt)
    return loss.item(), {}


def sam_perturbation(params, grads, cfg):
    """davda54/sam's first_step (with ASAM's eta): eps per parameter and ||T g||."""
    with torch.no_grad():
        scales = [(p.abs() + cfg["eta"]) if cfg["adaptive"] else torch.ones_like(p) for p in params]
        grad_norm = torch.norm(torch.stack([(t * g).norm(p=2) for t, g in zip(scales, grads)]), p=2)
        factor = cfg["rho"] / (grad_norm + 1e-12)
        return [t * t * g * factor for t, g in zip(scales, grads)], grad_norm.item()


def perturbed_gradient(model, params, eps, x, y):
    """SAM's second pass: the gradient of the mean cross-entropy at theta + eps, theta restored."""
    old = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    restore(params, old)
    return grads


def sam_local_step(model, params, opt, doms, case, state, step):
    """Domain-wise SAM: each domain's images at theta + eps_e from that domain's own mean-loss
    gradient; the update is the gradient of (1/(K B)) sum of the perturbed per-image losses."""
    cfg = {"rho": 0.05, "adaptive": False, "eta": 0.01, **case.get("sam", {})}
    total = sum(y.numel() for _, y in doms)
    old = [p.detach().clone() for p in params]
    losses, norms, update = [], [], [torch.zeros_like(p) for p in params]
    for x, y in doms:
        loss_e = F.cross_entropy(model(x), y)
        losses.append(loss_e.item())
        eps, norm = sam_perturbation(params, torch.autograd.grad(loss_e, params), cfg)
        norms.append(norm)
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.add_(e)
        perturbed = F.cross_entropy(model(x), y, reduction="sum") / total
        for u, g in zip(update, torch.autograd.grad(perturbed, params)):
            u.add_(g)
        restore(params, old)
    apply_update(params, update, opt)
    return sum(losses) / len(doms), {"sam_grad_norm": sum(norms) / len(norms)}


def sam_step(model, params, opt, doms, case, state, step):
    """davda54/sam's first_step/second_step (with ASAM's eta), around the base optimizer."""
    cfg = {"rho": 0.05, "adaptive": False, "eta": 0.01, **case.get("sam", {})}
    if cfg.get("perturb") == "local":
        return sam_local_step(model, params, opt, doms, case, state, step)
    x, y = pooled(doms)
    loss = F.cross_entropy(model(x), y)
    eps, grad_norm = sam_perturbation(params, torch.autograd.grad(loss, params), cfg)
    apply_update(params, perturbed_gradient(model, params, eps, x, y), opt)
    return loss.item(), {"sam_grad_norm": grad_norm}


DSP_DEFAULTS = {
    "mode": "anchor", "beta": 0.95, "lambda": 0.1, "gamma": 0.5, "score": "ratio", "weight": "linear",
    "tau": 0.5, "temperature": 0.1, "epsilon": 1e-20, "variance_denominator": "k_minus_1",
    "warmup_frac": 0.1, "ramp_frac": 0.1, "exclude_norm": True, "exclude_bias": True, "exclude": [],
}


def dsp_included(name, cfg):
    is_norm = name.startswith("gn")
    is_bias = name.endswith(".bias") and not is_norm
    if cfg["exclude_norm"] and is_norm:
        return False
    if cfg["exclude_bias"] and is_bias:
        return False
    return not any(name.startswith(prefix) for prefix in cfg["exclude"])


def dsp_fraction(cfg, step, total):
    warmup = math.floor(cfg["warmup_frac"] * total + 0.5)
    ramp = math.floor(cfg["ramp_frac"] * total + 0.5)
    if step < warmup:
        return 0.0
    if ramp == 0:
        return 1.0
    return min(1.0, (step - warmup + 1) / ramp)


def dsp_step(model, params, opt, doms, case, state, step):
    cfg = {**DSP_DEFAULTS, **case.get("dsp_reg", {})}
    names = [n for n, _ in model.named_parameters()]
    K = len(doms)
    if "theta0" not in state:
        state["theta0"] = [p.detach().clone() for p in params]
        state["V"] = [torch.zeros_like(p) for p in params]
        state["M"] = [torch.zeros_like(p) for p in params]
        state["t"] = 0
    # One autograd.grad per domain: g_e = grad of the mean loss L_e.
    losses, per_domain = [], []
    for x, y in doms:
        # sum / B (= the mean), the form Rust differentiates, so rank scores see identical gradients.
        loss_e = F.cross_entropy(model(x), y, reduction="sum") / y.numel()
        losses.append(loss_e.item())
        per_domain.append(torch.autograd.grad(loss_e, params))
    beta = cfg["beta"]
    state["t"] += 1
    t = state["t"]
    denominator = K - 1 if cfg["variance_denominator"] == "k_minus_1" else K
    strength = (cfg["lambda"] if cfg["mode"] in ("anchor", "shrink") else cfg["gamma"]) * dsp_fraction(
        cfg, step, case["total_steps"])
    sensitivities, included_sum, included_count = [], 0.0, 0
    with torch.no_grad():
        for i, (name, p) in enumerate(zip(names, params)):
            G = torch.stack([g[i] for g in per_domain])
            m = G.mean(0)
            v = ((G - m) ** 2).sum(0) / denominator
            state["V"][i] = beta * state["V"][i] + (1 - beta) * v
            state["M"][i] = beta * state["M"][i] + (1 - beta) * m * m
            Vh = state["V"][i] / (1 - beta ** t)
            Mh = state["M"][i] / (1 - beta ** t)
            ratio = Vh / (Vh + Mh + cfg["epsilon"])
            if cfg["score"] == "ratio":
                s = ratio
            elif cfg["score"] == "layer_norm":
                s = Vh / (Vh.mean() + cfg["epsilon"])
            elif cfg["score"] == "rank":
                flat = ratio.reshape(-1)
                smaller = (flat[None, :] < flat[:, None]).sum(1).to(torch.float32)
                s = (smaller / max(flat.numel() - 1, 1)).reshape(ratio.shape)
            else:
                raise ValueError(cfg["score"])
            if cfg["weight"] == "linear":
                w = s
            else:
                w = torch.sigmoid((s - cfg["tau"]) / cfg["temperature"])
            if not dsp_included(name, cfg):
                w = torch.zeros_like(w)
            else:
                included_sum += s.double().sum().item()
                included_count += s.numel()
            sensitivities.append(s)
            if cfg["mode"] == "anchor":
                g = m + 2 * strength * w * (p - state["theta0"][i])
            elif cfg["mode"] == "shrink":
                g = m + 2 * strength * w * p
            else:
                g = (1 - strength * w) * m
            p.grad = g.clone()
    opt.step()
    extra = {"dsp_lambda": strength, "dsp_mean_sensitivity": included_sum / max(included_count, 1)}
    return sum(losses) / K, extra


def reset_adam(opt):
    """DomainBed re-creates Adam when a penalty switches on: a fresh state."""
    opt.state.clear()


def domain_losses(logits, doms):
    """Each domain's mean cross-entropy from the logits of the concatenated batch."""
    sizes = [y.numel() for _, y in doms]
    return torch.stack([F.cross_entropy(z, y) for z, (_, y) in zip(logits.split(sizes), doms)])


def vrex_step(model, params, opt, doms, case, state, step):
    """DomainBed's VREx.update."""
    cfg = {"lambda": 10.0, "penalty_anneal_iters": 500, **case.get("vrex", {})}
    weight = cfg["lambda"] if step >= cfg["penalty_anneal_iters"] else 1.0
    losses = domain_losses(model(pooled(doms)[0]), doms)
    mean = losses.mean()
    penalty = ((losses - mean) ** 2).mean()
    loss = mean + weight * penalty
    if step == cfg["penalty_anneal_iters"]:
        reset_adam(opt)
    apply_update(params, torch.autograd.grad(loss, params), opt)
    return mean.item(), {"vrex_penalty": penalty.item()}


def group_dro_step(model, params, opt, doms, case, state, step):
    """DomainBed's GroupDRO.update."""
    eta = {"eta": 0.01, **case.get("group_dro", {})}["eta"]
    if "q" not in state:
        state["q"] = torch.ones(len(doms))
    losses = torch.zeros(len(doms))
    for m, (x, y) in enumerate(doms):
        losses[m] = F.cross_entropy(model(x), y)
        state["q"][m] *= (eta * losses[m].data).exp()
    state["q"] /= state["q"].sum()
    loss = torch.dot(losses, state["q"])
    apply_update(params, torch.autograd.grad(loss, params), opt)
    return losses.mean().item(), {"group_dro_q_max": state["q"].max().item()}


def coral_distance(x, y):
    """DomainBed's AbstractMMD.mmd with kernel_type "mean_cov"."""
    mean_x, mean_y = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    cent_x, cent_y = x - mean_x, y - mean_y
    cova_x = (cent_x.t() @ cent_x) / (len(x) - 1)
    cova_y = (cent_y.t() @ cent_y) / (len(y) - 1)
    return (mean_x - mean_y).pow(2).mean() + (cova_x - cova_y).pow(2).mean()


def coral_step(model, params, opt, doms, case, state, step):
    """DomainBed's AbstractMMD.update (CORAL): a featurizer call per domain."""
    gamma = {"gamma": 1.0, **case.get("coral", {})}["gamma"]
    features = [model.dropout(model.features(x)) for x, _ in doms]
    logits = [model.fc(f) for f in features]
    nmb = len(doms)
    objective, penalty = 0, 0
    for i in range(nmb):
        objective += F.cross_entropy(logits[i], doms[i][1])
        for j in range(i + 1, nmb):
            penalty += coral_distance(features[i], features[j])
    objective /= nmb
    if nmb > 1:
        penalty /= nmb * (nmb - 1) / 2
    loss = objective + gamma * penalty
    apply_update(params, torch.autograd.grad(loss, params), opt)
    return objective.item(), {"coral_penalty": penalty.item()}


def fishr_step(model, params, opt, doms, case, state, step):
    """DomainBed's Fishr.update. Per-sample head gradients by autograd, one sample at a time with
    create_graph (BackPACK's BatchGrad in DomainBed), not by their closed form."""
    cfg = {"lambda": 1000.0, "penalty_anneal_iters": 1500, "ema": 0.95, **case.get("fishr", {})}
    x, y = pooled(doms)
    z = model.dropout(model.features(x))
    logits = model.fc(z)
    head = [model.fc.weight, model.fc.bias]
    per_sample = []
    for i in range(len(y)):
        loss_i = F.cross_entropy(logits[i:i + 1], y[i:i + 1], reduction="sum")
        grads_i = torch.autograd.grad(loss_i, head, create_graph=True)
        per_sample.append(torch.cat([g.reshape(-1) for g in grads_i]))
    grads = torch.stack(per_sample)
    variances, start = [], 0
    for _, yd in doms:
        g = grads[start:start + yd.numel()]
        start += yd.numel()
        variances.append((g - g.mean(0, keepdim=True)).pow(2).mean(0))
    # misc.MovingAverage per domain, with the 1/(1 - ema) correction.
    ema = cfg["ema"]
    if "ema" not in state:
        state["ema"] = [torch.zeros_like(v) for v in variances]
    smoothed = []
    for e, v in enumerate(variances):
        ema_data = ema * state["ema"][e] + (1 - ema) * v
        smoothed.append(ema_data / (1 - ema))
        state["ema"][e] = ema_data.clone().detach()
    mean_var = torch.stack(smoothed).mean(0)
    penalty = sum((v - mean_var).pow(2).mean() for v in smoothed) / len(doms)
    nll = F.cross_entropy(logits, y)
    weight = 0.0
    if step >= cfg["penalty_anneal_iters"]:
        weight = cfg["lambda"]
        if step == cfg["penalty_anneal_iters"] != 0:
            reset_adam(opt)
    loss = nll + weight * penalty
    apply_update(params, torch.autograd.grad(loss, params), opt)
    return nll.item(), {"fishr_penalty": penalty.item()}


def disam_step(model, params, opt, doms, case, state, step):
    """DISAM_Trainer.sam_train: the ascent from CE - lambda x the variance of the domains' losses, then
    davda54/sam's first_step/second_step around the base optimizer."""
    cfg = {"rho": 0.05, "lambda": 0.1, **case.get("disam", {})}
    x, y = pooled(doms)
    logits = model(x)
    losses = domain_losses(logits, doms)
    variance = ((losses - losses.mean()) ** 2).mean()
    ce = F.cross_entropy(logits, y)
    ascent = ce - cfg["lambda"] * variance
    eps, grad_norm = sam_perturbation(
        params, torch.autograd.grad(ascent, params), {"rho": cfg["rho"], "adaptive": False, "eta": 0.01})
    grads2 = perturbed_gradient(model, params, eps, x, y)
    apply_update(params, grads2, opt)
    return ce.item(), {"sam_grad_norm": grad_norm, "disam_loss_variance": variance.item()}


def tram_step(model, params, opt, doms, case, state, step):
    """TRAM as the paper writes it (Alg. 1): ASAM with rho replaced by d = logit_scale x the batch-mean
    KL(p_target || p_current), target the previous-step or the initial model; eps proportional to g."""
    cfg = {"target": "previous", "adaptive": True, "eta": 0.01, "sigma": 0.1, "logit_scale": 1.0,
           **case.get("tram", {})}
    if "target" not in state:
        state["target"] = [p.detach().clone() for p in params]
    x, y = pooled(doms)
    model.eval()
    with torch.no_grad():
        # In float64, as mgrun: the distributions are close.
        log_q = F.log_softmax(model(x).double(), dim=1)
        current = [p.detach().clone() for p in params]
        restore(params, state["target"])
        log_p = F.log_softmax(model(x).double(), dim=1)
        restore(params, current)
    model.train()
    distance = cfg["logit_scale"] * (log_p.exp() * (log_p - log_q)).sum().item() / len(y)
    loss = F.cross_entropy(model(x), y)
    sam_cfg = {"rho": distance, "adaptive": cfg["adaptive"], "eta": cfg["eta"]}
    eps, grad_norm = sam_perturbation(params, torch.autograd.grad(loss, params), sam_cfg)
    grads2 = perturbed_gradient(model, params, eps, x, y)
    if cfg["target"] == "previous":
        state["target"] = [p.detach().clone() for p in params]
    apply_update(params, grads2, opt)
    return loss.item(), {"tram_distance": distance, "sam_grad_norm": grad_norm}


def head_gradients(model, logits, y):
    """Per-sample gradients of the linear head (weight then bias, flattened) by autograd, one sample at
    a time with create_graph (BackPACK's BatchGrad in the published code)."""
    head = [model.fc.weight, model.fc.bias]
    rows = []
    for i in range(len(y)):
        loss_i = F.cross_entropy(logits[i:i + 1], y[i:i + 1], reduction="sum")
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_i, head, create_graph=True)]))
    return torch.stack(rows)


def udim_inconsistency(model, source, perturbed, y):
    """I = 1/2 sum_G mean((v_G - (v_src + v_syn)/2)^2) + sum_params mean_n ||g_syn,n||^2 / dim(param), the
    perturbed images' variance centred on the source mean."""
    logits = model.fc(model.dropout(model.features(torch.cat([source, perturbed]))))
    grads = head_gradients(model, logits, torch.cat([y, y]))
    g_src, g_syn = grads[:len(y)], grads[len(y):]
    mean_src = g_src.mean(0)
    var_src = ((g_src - mean_src) ** 2).mean(0)
    var_syn = ((g_syn - mean_src) ** 2).mean(0)
    middle = (var_src + var_syn) / 2
    spread = 0.5 * (((var_src - middle) ** 2).mean() + ((var_syn - middle) ** 2).mean())
    weight_numel = model.fc.weight.numel()
    norms = (g_syn[:, :weight_numel] ** 2).sum(1).mean() / weight_numel
    norms = norms + (g_syn[:, weight_numel:] ** 2).sum(1).mean() / model.fc.bias.numel()
    return spread + norms


def udim_step(model, params, opt, doms, case, state, step):
    """UDIM as the paper's rule (see mgrun's udim.rs for the departures from iada_final.py): SAM warm-up,
    then images perturbed along grad_x [CE + rho_syn ||grad_theta CE||] (normalised per image), SAM's
    gradient, plus weight x grad I."""
    cfg = {"rho": 0.05, "rho_syn": 0.05, "syn_lr": 10.0, "weight": 1.0, "warmup_frac": 0.2, "domain_wise": True,
           **case.get("udim", {})}
    sam_cfg = {"rho": cfg["rho"], "adaptive": False, "eta": 0.01}
    x, y = pooled(doms)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params)
    extra = {}
    if step >= round(cfg["warmup_frac"] * case["total_steps"]):
        source = x.clone().requires_grad_(True)
        ce = F.cross_entropy(model(source), y)
        grad_theta = torch.autograd.grad(ce, params, create_graph=True)
        ascent = ce + cfg["rho_syn"] * torch.cat([g.reshape(-1) for g in grad_theta]).norm()
        grad_x, = torch.autograd.grad(ascent, source)
        norms = grad_x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        perturbed = (x + cfg["syn_lr"] * grad_x / norms).detach()
        if cfg["domain_wise"]:
            sizes = [yd.numel() for _, yd in doms]
            inconsistency = sum(udim_inconsistency(model, xs, ps, ys) for xs, ps, ys in
                                zip(x.split(sizes), perturbed.split(sizes), y.split(sizes)))
        else:
            inconsistency = udim_inconsistency(model, x, perturbed, y)
        extra["udim_inconsistency"] = inconsistency.item()
        total = torch.autograd.grad(cfg["weight"] * inconsistency, params)
    else:
        extra["udim_inconsistency"] = 0.0
        total = [torch.zeros_like(p) for p in params]
    eps, grad_norm = sam_perturbation(params, grads, sam_cfg)
    extra["sam_grad_norm"] = grad_norm
    grads2 = perturbed_gradient(model, params, eps, x, y)
    apply_update(params, [a + b for a, b in zip(grads2, total)], opt)
    return loss.item(), extra


def mixup_step(model, params, opt, doms, case, state, step):
    """DomainBed's Mixup.update with random_pairs_of_minibatches, the permutation and the Beta draws
    given (mgrun draws them from the run seed: case["mixup_draws"][step])."""
    draws = case["mixup_draws"][step]
    perm, lam = draws["perm"], draws["lambda"]
    objective = 0
    for i in range(len(doms)):
        a, b = perm[i], perm[(i + 1) % len(doms)]
        (xi, yi), (xj, yj) = doms[a], doms[b]
        n = min(len(xi), len(xj))
        predictions = model(lam[a] * xi[:n] + (1 - lam[a]) * xj[:n])
        objective += lam[a] * F.cross_entropy(predictions, yi[:n])
        objective += (1 - lam[a]) * F.cross_entropy(predictions, yj[:n])
    objective /= len(doms)
    apply_update(params, torch.autograd.grad(objective, params), opt)
    return objective.item(), {}


STEPS = {
    "erm": erm_step, "sam": sam_step, "dsp_reg": dsp_step, "vrex": vrex_step, "group_dro": group_dro_step,
    "coral": coral_step, "fishr": fishr_step, "disam": disam_step,
    "tram": tram_step, "udim": udim_step,
    "mixup": mixup_step,
}


def read_run():
    """The command line's INPUT, CONFIG and OUTPUT: the inputs, the config and the output path; with
    deterministic algorithms on."""
    inputs_path, config_path, output_path = sys.argv[1:4]
    torch.use_deterministic_algorithms(True)
    inputs = load_file(inputs_path)
    with open(config_path) as f:
        cfg = json.load(f)
    return inputs, cfg, output_path


def start_case(cfg, inputs, case):
    """A case's model from the input weights, its parameters and its Adam."""
    model = make_model(cfg, inputs)
    params = list(model.parameters())
    return model, params, make_adam(params, case.get("adam", {}))


def record(out, name, losses, named_params):
    """A case's `{name}.loss` (f64 per step) and `{name}.param.{param name}` into `out`."""
    out[f"{name}.loss"] = torch.tensor(losses, dtype=torch.float64)
    for pname, p in named_params:
        out[f"{name}.param.{pname}"] = p.detach().clone().contiguous()


def main():
    inputs, cfg, output_path = read_run()
    out = {}
    for case in cfg["cases"]:
        model, params, opt = start_case(cfg, inputs, case)
        state, losses, extras = {}, [], {}
        for step in range(cfg["steps"]):
            doms = batches(inputs, step, cfg["num_domains"])
            loss, extra = STEPS[case["method"]](model, params, opt, doms, case, state, step)
            losses.append(loss)
            for k, v in extra.items():
                extras.setdefault(k, []).append(v)
        name = case["name"]
        record(out, name, losses, model.named_parameters())
        for k, v in extras.items():
            out[f"{name}.extra.{k}"] = torch.tensor(v, dtype=torch.float64)
    save_file(out, output_path)


if __name__ == "__main__":
    main()
