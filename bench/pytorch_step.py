#!/usr/bin/env python3
"""The steps of `mgrun bench step` in PyTorch eager, for side-by-side ratios.

torchvision ResNet-50 (--arch resnet18 also; BN in train mode), 224x224, 3 domains x 32 images,
345 classes, Adam (lr 5e-5), random inputs on the device, loss.item() every step (as DomainBed and
mgrun do):
  erm      one forward/backward of the 96 images;
  sam      SAM: gradient, theta + rho g/||g||, second gradient there, restore, Adam step;
  dsp_reg  a DSP-Reg-like step: one forward/backward per domain (torch.autograd.grad), first and
           second moments of the per-domain gradients, EMA of the variance, anchor penalty.
On CUDA (--device cuda, the default): fp32 and bf16 (torch.autocast) with channels_last, plus
ERM fp32 NCHW (the issue's anchor); cuDNN benchmark on, peak GPU memory per row.
On CPU (--device cpu): each method x precision in NCHW (--channels-last true for NHWC), bf16 via
torch.autocast("cpu"), no CUDA calls (peak_gpu_mem_gb is null); --threads N sets
torch.set_num_threads. `mgrun bench step --vs-pytorch` calls this mode and reads --json.

--optimizers foreach,fused runs every config once per Adam implementation (foreach=True, the
default, or fused=True); each row says which in "optimizer".
--phases times the ERM step's phases after the timed steps (mean over min(steps, 10) steps, with a
device sync after each on CUDA): "forward+loss", "backward" (zero_grad + backward), "optimizer"
(opt.step) and "eval forward" (eval mode, no_grad forward of the same batch + argmax); stored as
"phases_ms": [[name, ms], ...] in the ERM rows, [] in the others.

With --mgrun-json FILE (rows of `mgrun bench step --json`) it prints a table of mgrun / PyTorch
img/s ratios and the issue's targets.
"""
import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
import torchvision


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_optimizer(name, params):
    if name == "foreach":
        return torch.optim.Adam(params, lr=5e-5, foreach=True)
    if name == "fused":
        return torch.optim.Adam(params, lr=5e-5, fused=True)
    raise SystemExit(f"pytorch_step.py: unknown optimizer {name!r} (foreach, fused)")


def build(arch, num_classes, channels_last, device):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=num_classes).to(device).train()
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


def time_phases(model, opt, xs, ys, autocast_dtype, device, n):
    """Mean ms of the ERM step's phases over n steps, with a device sync after each phase."""
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    enabled = autocast_dtype is not None
    names = ["forward+loss", "backward", "optimizer", "eval forward"]
    totals = [0.0] * len(names)
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=enabled):
            logits = model(x_all)
        loss = F.cross_entropy(logits.float(), y_all)
        sync(device)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        opt.step()
        sync(device)
        t3 = time.perf_counter()
        loss.item()
        del logits, loss
        model.eval()
        sync(device)
        t4 = time.perf_counter()
        with torch.no_grad():
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=enabled):
                logits = model(x_all)
            logits.argmax(-1)
        sync(device)
        t5 = time.perf_counter()
        model.train()
        del logits
        for i, dt in enumerate([t1 - t0, t2 - t1, t3 - t2, t5 - t4]):
            totals[i] += dt
    return [[name, total / n * 1e3] for name, total in zip(names, totals)]


def bench(method, precision, channels_last, optimizer, args, device):
    model = build(args.arch, args.classes, channels_last, device)
    opt = make_optimizer(optimizer, model.parameters())
    torch.manual_seed(1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    xs = [torch.randn(args.batch_per_domain, 3, args.image_size, args.image_size, device=device)
          .contiguous(memory_format=memory_format) for _ in range(args.domains)]
    ys = [torch.randint(args.classes, (args.batch_per_domain,), device=device) for _ in range(args.domains)]
    dtype = torch.bfloat16 if precision == "bf16" else None
    step = make_step(method, model, opt, xs, ys, dtype, device)
    cuda = device.type == "cuda"
    for _ in range(args.warmup):
        step()
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - started) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    phases = []
    if args.phases and method == "erm":
        phases = time_phases(model, opt, xs, ys, dtype, device, max(1, min(args.steps, 10)))
    images = args.domains * args.batch_per_domain
    row = {"method": method, "precision": precision, "channels_last": channels_last, "optimizer": optimizer,
           "ms_per_step": seconds * 1e3, "images_per_s": images / seconds,
           "peak_gpu_mem_gb": peak, "phases_ms": phases}
    del model, opt, xs, ys, step
    if cuda:
        torch.cuda.empty_cache()
    return row


def profile_erm(args, device, precision, channels_last, optimizer):
    """Top kernels (CUDA) or ops (CPU) of a few ERM steps, to say where the time goes."""
    model = build(args.arch, args.classes, channels_last, device)
    opt = make_optimizer(optimizer, model.parameters())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    xs = [torch.randn(args.batch_per_domain, 3, args.image_size, args.image_size, device=device)
          .contiguous(memory_format=memory_format) for _ in range(args.domains)]
    ys = [torch.randint(args.classes, (args.batch_per_domain,), device=device) for _ in range(args.domains)]
    step = make_step("erm", model, opt, xs, ys, torch.bfloat16 if precision == "bf16" else None, device)
    for _ in range(3):
        step()
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    sort_by = "cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=12))


def ratio_table(torch_rows, mgrun_rows):
    def find(rows, method, precision, cl):
        return next((r for r in rows if r["method"] == method and r["precision"] == precision
                     and r["channels_last"] == cl), None)

    lines = ["| method | precision | channels_last | mgrun img/s | PyTorch optimizer | PyTorch img/s | "
             "mgrun/PyTorch | mgrun step / mgrun ERM | target |", "|---|---|---|---|---|---|---|---|---|"]
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
                     f"{t.get('optimizer', 'foreach')} | {t['images_per_s']:.0f} | {ratio:.2f}x | {rel:.2f}x | {target} |")
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
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler table of the bf16 ERM step (first optimizer)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--arch", choices=["resnet18", "resnet50"], default="resnet50")
    parser.add_argument("--optimizers", default="foreach", help="comma list of foreach, fused (Adam)")
    parser.add_argument("--channels-last", choices=["true", "false"],
                        help="only this memory format (default: CUDA channels_last + ERM fp32 NCHW, CPU NCHW)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N)")
    parser.add_argument("--phases", action="store_true",
                        help="time the ERM step's phases (forward+loss, backward, optimizer, eval forward)")
    args = parser.parse_args()
    optimizers = [o for o in args.optimizers.split(",") if o]
    for o in optimizers:
        if o not in ("foreach", "fused"):
            raise SystemExit(f"pytorch_step.py: unknown optimizer {o!r} (foreach, fused)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("pytorch_step.py: needs a CUDA GPU")
        device = torch.device("cuda", 0)
        torch.backends.cudnn.benchmark = True
        where = torch.cuda.get_device_name(0)
    else:
        device = torch.device("cpu")
        where = f"CPU ({platform.processor() or platform.machine()})"
    print(f"PyTorch {torch.__version__} on {where}, {torch.get_num_threads()} threads, {args.arch}")
    methods = args.methods.split(",")
    precisions = args.precision.split(",")
    if args.channels_last is not None:
        cl = args.channels_last == "true"
        configs = [(m, p, cl) for p in precisions for m in methods]
    elif device.type == "cuda":
        configs = [("erm", "fp32", False)]
        for precision in precisions:
            configs += [(m, precision, True) for m in methods]
    else:
        configs = [(m, p, False) for p in precisions for m in methods]
    rows = []
    for method, precision, cl in configs:
        for optimizer in optimizers:
            row = bench(method, precision, cl, optimizer, args, device)
            rows.append(row)
            peak = "" if row["peak_gpu_mem_gb"] is None else f" peak {row['peak_gpu_mem_gb']:.2f} GiB"
            print(f"pytorch {method:8s} {precision} channels_last={cl!s:5s} {optimizer:7s} "
                  f"{row['ms_per_step']:7.1f} ms/step {row['images_per_s']:6.0f} img/s{peak}", flush=True)
            if row["phases_ms"]:
                phases = ", ".join(f"{n} {ms:.1f} ms" for n, ms in row["phases_ms"])
                print(f"pytorch {method} {precision} channels_last={cl} {optimizer} phases: {phases}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.profile:
        cl = device.type == "cuda" if args.channels_last is None else args.channels_last == "true"
        profile_erm(args, device, "bf16", cl, optimizers[0])
    if args.mgrun_json:
        mgrun_rows = []
        for path in args.mgrun_json:
            with open(path) as f:
                mgrun_rows += json.load(f)
        print()
        print(ratio_table(rows, mgrun_rows))


if __name__ == "__main__":
    main()
