#!/usr/bin/env python3
"""The steps of `mgrun bench step` in PyTorch eager, for side-by-side ratios.

torchvision ResNet-50 (BN in train mode), 224x224, 3 domains x 32 images, 345 classes, Adam
(lr 5e-5), random inputs on the GPU, loss.item() every step (as DomainBed and mgrun do):
  erm      one forward/backward of the 96 images;
  sam      SAM: gradient, theta + rho g/||g||, second gradient there, restore, Adam step;
  dsp_reg  a DSP-Reg-like step: one forward/backward per domain (torch.autograd.grad), first and
           second moments of the per-domain gradients, EMA of the variance, anchor penalty.
fp32 and bf16 (torch.autocast) with channels_last, plus ERM fp32 NCHW (the issue's anchor).

With --mgrun-json FILE (rows of `mgrun bench step --json`) it prints a table of mgrun / PyTorch
img/s ratios and the issue's targets.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
import torchvision


def build(num_classes, channels_last, device):
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=num_classes).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_step(method, model, opt, xs, ys, autocast_dtype, device):
    params = [p for p in model.parameters() if p.requires_grad]
    domains = len(xs)
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    state = {}

    def forward_loss(x, y):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x)
        return F.cross_entropy(logits.float(), y)

    def erm():
        opt.zero_grad(set_to_none=True)
        loss = forward_loss(x_all, y_all)
        loss.backward()
        opt.step()
        return loss.item()

    def sam(rho=0.05):
        opt.zero_grad(set_to_none=True)
        loss = forward_loss(x_all, y_all)
        grads = torch.autograd.grad(loss, params)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = rho / (norm + 1e-12)
        eps = [g * scale for g in grads]
        with torch.no_grad():
            torch._foreach_add_(params, eps)
        loss2 = forward_loss(x_all, y_all)
        loss2.backward()
        with torch.no_grad():
            torch._foreach_sub_(params, eps)
        opt.step()
        return loss.item()

    def dsp_reg(lam=0.1, beta=0.9):
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        if "theta0" not in state:
            state["theta0"] = flat.clone()
            state["ema"] = torch.zeros_like(flat)
        g_sum = torch.zeros_like(flat)
        g_sq = torch.zeros_like(flat)
        total = 0.0
        for x, y in zip(xs, ys):
            loss = forward_loss(x, y) / domains
            grads = torch.autograd.grad(loss, params)
            g = torch.cat([t.reshape(-1) for t in grads]) * domains
            g_sum += g
            g_sq += g * g
            total = total + loss.detach()
        mean = g_sum / domains
        var = (g_sq / domains - mean * mean).clamp_min(0)
        state["ema"].mul_(beta).add_(var, alpha=1 - beta)
        score = state["ema"] / (state["ema"].mean() + 1e-12)
        grad = mean + lam * score * (flat - state["theta0"])
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = grad[offset:offset + n].view_as(p)
            offset += n
        opt.step()
        return total.item()

    return {"erm": erm, "sam": sam, "dsp_reg": dsp_reg}[method]


def bench(method, precision, channels_last, args, device):
    model = build(args.classes, channels_last, device)
    opt = torch.optim.Adam(model.parameters(), lr=5e-5)
    torch.manual_seed(1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    xs = [torch.randn(args.batch_per_domain, 3, args.image_size, args.image_size, device=device)
          .contiguous(memory_format=memory_format) for _ in range(args.domains)]
    ys = [torch.randint(args.classes, (args.batch_per_domain,), device=device) for _ in range(args.domains)]
    dtype = torch.bfloat16 if precision == "bf16" else None
    step = make_step(method, model, opt, xs, ys, dtype, device)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.steps
    images = args.domains * args.batch_per_domain
    row = {"method": method, "precision": precision, "channels_last": channels_last,
           "ms_per_step": seconds * 1e3, "images_per_s": images / seconds,
           "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
    del model, opt, xs, ys, step
    torch.cuda.empty_cache()
    return row


def profile_erm(args, device, precision):
    """Top CUDA kernels of a few ERM steps, to say where the time goes."""
    model = build(args.classes, True, device)
    opt = torch.optim.Adam(model.parameters(), lr=5e-5)
    xs = [torch.randn(args.batch_per_domain, 3, args.image_size, args.image_size, device=device)
          .contiguous(memory_format=torch.channels_last) for _ in range(args.domains)]
    ys = [torch.randint(args.classes, (args.batch_per_domain,), device=device) for _ in range(args.domains)]
    step = make_step("erm", model, opt, xs, ys, torch.bfloat16 if precision == "bf16" else None, device)
    for _ in range(3):
        step()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


def ratio_table(torch_rows, mgrun_rows):
    def find(rows, method, precision, cl):
        return next((r for r in rows if r["method"] == method and r["precision"] == precision
                     and r["channels_last"] == cl), None)

    lines = ["| method | precision | channels_last | mgrun img/s | PyTorch img/s | mgrun/PyTorch | "
             "mgrun step / mgrun ERM | target |", "|---|---|---|---|---|---|---|---|"]
    for t in torch_rows:
        m = find(mgrun_rows, t["method"], t["precision"], t["channels_last"])
        if m is None:
            continue
        erm = find(mgrun_rows, "erm", m["precision"], m["channels_last"])
        rel = m["ms_per_step"] / erm["ms_per_step"] if erm else float("nan")
        ratio = m["images_per_s"] / t["images_per_s"]
        if t["method"] == "erm":
            target = f"ratio >= 1.0: {'met' if ratio >= 1.0 else 'MISSED'}"
        elif t["method"] == "sam":
            ok = ratio >= 1.0 and rel <= 2.05
            target = f"ratio >= 1.0, step <= 2.05x ERM: {'met' if ok else 'MISSED'}"
        else:
            target = f"step <= 1.35x ERM: {'met' if rel <= 1.35 else 'MISSED'}"
        lines.append(f"| {t['method']} | {t['precision']} | {t['channels_last']} | {m['images_per_s']:.0f} | "
                     f"{t['images_per_s']:.0f} | {ratio:.2f}x | {rel:.2f}x | {target} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-per-domain", type=int, default=32)
    parser.add_argument("--domains", type=int, default=3)
    parser.add_argument("--classes", type=int, default=345)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--methods", default="erm,dsp_reg,sam")
    parser.add_argument("--precision", default="fp32,bf16")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--mgrun-json", nargs="+", help="files of `mgrun bench step --json` rows: print the ratio table")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of the bf16 ERM step")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("pytorch_step.py: needs a CUDA GPU")
    device = torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = True
    print(f"PyTorch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    configs = [("erm", "fp32", False)]
    for precision in args.precision.split(","):
        configs += [(m, precision, True) for m in args.methods.split(",")]
    rows = []
    for method, precision, cl in configs:
        row = bench(method, precision, cl, args, device)
        rows.append(row)
        print(f"pytorch {method:8s} {precision} channels_last={cl!s:5s} {row['ms_per_step']:7.1f} ms/step "
              f"{row['images_per_s']:6.0f} img/s peak {row['peak_gpu_mem_gb']:.2f} GiB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.profile:
        profile_erm(args, device, "bf16")
    if args.mgrun_json:
        mgrun_rows = []
        for path in args.mgrun_json:
            with open(path) as f:
                mgrun_rows += json.load(f)
        print()
        print(ratio_table(rows, mgrun_rows))


if __name__ == "__main__":
    main()
