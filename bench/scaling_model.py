#!/usr/bin/env python3
"""bench/scaling_model.py: the issue's `bench/scaling-model`. A model, not a measurement.

It predicts the training step time of ResNet-50 on DomainNet (5 training domains x 32 images = 160
images per step, fixed global batch, leave-one-domain-out) and the time of a full run (15,001 steps
plus DomainBed's evaluations) for 1, 2, 4 and 8 GPUs in one NVLink node and for 2 nodes x 8 GPUs over
InfiniBand. It works from a measured one-GPU step breakdown and published NCCL bus bandwidths
(nccl-tests). No multi-GPU run of mgrun has been measured; every multi-GPU number here is predicted.

Usage:
    python3 bench/scaling_model.py [--input-json FILE] [--gpu h200|h100] [--precision fp32|bf16]
                                   [--json OUT] [--markdown OUT] [--self-test] [overrides, see --help]

Python 3 standard library only.

The model
---------
Compute. One forward+backward *pass* over n images on one GPU takes

    t_pass(n) = a + b * n                    (a: fixed cost per pass, b: cost per image)

i.e. the time per image is b * (1 + n_knee / n) with n_knee = a / b: it rises when the per-GPU batch
falls below about n_knee images (kernel launches and small, under-filled kernels). a and b are
fitted (least squares) to the measured ERM step at 96 images and the measured per-domain passes of
DSP-Reg at 32 images (`calibration` below); `--knee-images N` replaces the fit by a = N * b, keeping
the measured ERM step; `--floor-images N` makes a pass of fewer than N images cost t_pass(N) (a
launch-bound floor, for the sensitivity table). The optimizer (flat gradient + flat Adam, t_opt)
runs once per step on every rank, whatever W. A rank's step is

    compute_r = sum over its passes of t_pass(n_pass) + t_opt + t_extra(method)

and the step waits for the slowest rank (compute = max_r compute_r). Passes per method, from mgrun's
code (methods/src/*.rs, sharding plan methods/src/sharding.rs, unit = 1 image on the fast path):
    erm      one pass over the rank's images (its shards concatenated)
    sam      two passes over the rank's images (perturb = global, the default)
    dsp_reg  one pass per domain piece the rank holds (per-domain gradients)

Communication (nccl-tests convention, doc/PERFORMANCE.md: busbw = algbw * 2(n-1)/n for all_reduce):

    t_allreduce(S bytes, n ranks) = n_buckets * alpha(n) + S * 2(n-1)/n / busbw(n)

with n_buckets = ceil(S / bucket) (mgrun reduces a flat buffer in comm.bucket_mb = 25 MiB buckets, one
collective each) and alpha(n) the fixed latency of one collective (6 us + 0.7 us per ring step inside
a node, 47 us across nodes). busbw(n) is the published 8-GPU NVLink figure for every communicator
inside one node (busbw is defined to be rank-count independent; assumption) and the InfiniBand
figure across nodes, scaled by k/8 for a group with k GPUs per node (it uses ~k of the 8 NICs).
What crosses ranks per step
(methods/src/*.rs `cross_rank_statistics`, /work/shared/reference/methods-notes.md):
    erm      all-reduce of P fp32 gradients, and the loss (1 scalar)
    sam      all-reduce of P (first-pass gradient, global perturbation; the norm is then local),
             all-reduce of P (perturbed gradient), and the loss
    dsp_reg  for every domain split over several ranks, an all-reduce of P within the domain's group
             (groups are walked in domain order, so they chain), then one world all-reduce of 2P
             ([sum_e g_e; sum_e g_e^2]), and the loss
A scalar all-reduce costs alpha(n) + t_sync (host -> device -> host, the loss is read back).

Overlap (`comm.overlap`, being added to mgrun in methods/src/overlap.rs, CPU ranks first). A
gradient all-reduce runs under the backward that produces it, bucket by bucket (last bucket first);
the first bucket of the flat buffer is ready only when the backward ends:

    exposed = max(T_comm - phi * t_backward, T_last_bucket)      (<= T_comm)

phi (default 0.8) is the share of the backward usable for communication. What overlaps
(--overlap-scope mgrun, the default, as methods/src/overlap.rs describes it): the batch gradient of
one backward on the fast path, i.e. ERM's all-reduce and the all-reduce of SAM's first pass. Not
SAM's perturbed pass, not DSP-Reg's per-domain gradients (domain groups, moments), not the scalars.
--overlap-scope all also overlaps SAM's perturbed pass and each DSP-Reg domain-group all-reduce
(under that domain's backward); DSP-Reg's world all-reduce of the moments never overlaps (it needs
every domain's complete gradient to square it).

    step = compute + comm (no overlap)        step_overlap = compute + exposed comm
    images/s = 160 / step; efficiency(W) = step(1) / (W * step(W))

Evaluation (DomainBed, /work/shared/reference/domainbed-protocol.md 2.1; mgrun trainer/src/eval.rs):
after step 0, every 1000 steps and after the last step (16 evaluations in 15,001 steps), every
domain's in and out split (all 586,575 images), each rank a strided 1/W share of every split, in
batches of 64 per rank. One eval batch of n images costs f_fwd * t_pass(n) with f_fwd = forward /
(forward + backward) from the measured phases (the eval forward was not measured separately; its
no_grad and eval-mode savings are ignored), or eval_forward_ms_per_image * n + f_fwd * a when the
input gives it.

    run = steps * step + n_evals * eval

Side columns, not part of the prediction: loader cores per GPU = training images/s per GPU / 353
(mgrun's training transform per core, 500x375 JPEGs, bench/results/2026-11-26-cpu-data.md), and
the CPU time of an evaluation's decoding as mgrun does it today (at most 4 threads per rank, no
cache for DomainNet, decoding and forward not overlapped; ~1.35 ms per image and thread, from the
per-stage costs in the same file: decode 0.8 + resize 0.5 + normalize 0.05 ms).

Input JSON (--input-json FILE): a measured one-GPU ERM step breakdown. Required: images_per_step,
forward_ms, backward_ms, optimizer_ms; every other key is optional.

    {
      "card": "NVIDIA H200",                 label
      "precision": "fp32",                   label
      "images_per_step": 96,                 images of the measured ERM step (one pass)
      "forward_ms": 12.4,                    measured phases of that step (synchronized)
      "backward_ms": 22.6,
      "optimizer_ms": 1.0,                   flat gradient + optimizer, once per step
      "step_ms": 35.77,                      the measured ERM step (default: sum of the phases)
      "params": 24214937,                    trainable parameters; fp32 gradients (default: ResNet-50, 345 classes)
      "eval_forward_ms_per_image": 0.12,     default: derived (see Evaluation)
      "calibration": [                       more measured steps of passes of other sizes, for the fit of a, b
        {"images_per_pass": 32, "passes": 3, "step_ms": 52.37, "extra_ms": 1.0, "what": "dsp_reg, 3 domains"}
      ],                                     (without any: a = 32 * b, i.e. n_knee = 32, an assumption)
      "pass_overhead_ms": 7.8,               sets a directly (b from the ERM step)
      "sam_step_ms": 72.07,                  measured SAM step at images_per_step: gives SAM's extra time
      "method_extra_ms": {"sam": 1.5, "dsp_reg": 1.0},   per-step extra work beyond passes + optimizer
      "source": "bench/results/2026-11-26-h200.md"
    }

The built-in inputs (--gpu h200, the default, or h100) are the numbers of
bench/results/2026-11-26-h200.md and -h100.md; every figure below names its source.
"""
import argparse
import json
import math
import sys

# --------------------------------------------------------------------------------------------------
# Built-in inputs
# --------------------------------------------------------------------------------------------------

# ResNet-50 with a 345-class head (DomainNet): torchvision's ResNet-50 has 25,557,032 parameters with
# its 1000-class fc (2048*1000 + 1000 = 2,049,000), so the backbone has 23,508,032; a 345-class head
# adds 2048*345 + 345 = 706,905. All 161 tensors (BN affine included) are in mgrun's flat gradient.
RESNET50_DOMAINNET_PARAMS = 23_508_032 + 2048 * 345 + 345  # 24,214,937 -> 96.9 MB of fp32 gradients

CARDS = {
    # bench/results/2026-11-26-h200.md: ResNet-50 (BN in train mode), 224 px, 3 domains x 32 images,
    # 345 classes, Adam, channels_last, random inputs on the GPU, 20 timed steps.
    ("h200", "fp32"): {
        "card": "NVIDIA H200 (HGX, NVLink 4)",
        "precision": "fp32",
        "source": "bench/results/2026-11-26-h200.md",
        "images_per_step": 96,
        "step_ms": 96 / 2684 * 1000,      # ERM fp32 channels_last: 2684 img/s -> 35.77 ms
        "forward_ms": 12.4,               # "Where the time goes", fp32: forward+loss
        "backward_ms": 22.6,              # backward
        "optimizer_ms": 0.3 + 0.7,        # flat gradient 0.3 + flat Adam 0.7
        "calibration": [
            # DSP-Reg with 3 domains on one rank = 3 passes of 32 images: 1833 img/s -> 52.37 ms; its
            # element-wise extra work (moments, EMAs, score, penalty) is "~1 ms at H200 bandwidth"
            # (same file, "One domain per rank").
            {"images_per_pass": 32, "passes": 3, "step_ms": 96 / 1833 * 1000, "extra_ms": 1.0,
             "what": "dsp_reg fp32, 3 domains on one rank (3 passes of 32)"},
        ],
        "sam_step_ms": 96 / 1332 * 1000,  # SAM fp32 channels_last: 1332 img/s -> 72.07 ms
        "method_extra_ms": {"dsp_reg": 1.0},
    },
    ("h200", "bf16"): {
        "card": "NVIDIA H200 (HGX, NVLink 4)",
        "precision": "bf16",
        "source": "bench/results/2026-11-26-h200.md",
        "images_per_step": 96,
        "step_ms": 96 / 3522 * 1000,      # ERM bf16: 3522 img/s -> 27.26 ms
        "forward_ms": 11.0,
        "backward_ms": 16.1,
        "optimizer_ms": 0.3 + 0.7,
        "calibration": [
            # DSP-Reg bf16, 3 passes of 32: 1576 img/s -> 60.91 ms ("launch-bound" per the file).
            {"images_per_pass": 32, "passes": 3, "step_ms": 96 / 1576 * 1000, "extra_ms": 1.0,
             "what": "dsp_reg bf16, 3 domains on one rank (3 passes of 32)"},
        ],
        "sam_step_ms": 96 / 1778 * 1000,  # SAM bf16: 1778 img/s -> 53.99 ms
        "method_extra_ms": {"dsp_reg": 1.0},
    },
    # bench/results/2026-11-26-h100.md (H100 80GB HBM3, before the flat-gradient change, so the flat
    # gradient copy is 0.8 ms there).
    ("h100", "fp32"): {
        "card": "NVIDIA H100 80GB HBM3 (SXM, NVLink 4)",
        "precision": "fp32",
        "source": "bench/results/2026-11-26-h100.md",
        "images_per_step": 96,
        "step_ms": 44.5,                  # ERM fp32 channels_last, ms/step
        "forward_ms": 15.1,
        "backward_ms": 28.4,
        "optimizer_ms": 0.8 + 0.9,        # flat gradient 0.8 + flat Adam 0.9
        "calibration": [
            {"images_per_pass": 192, "passes": 1, "step_ms": 80.9, "extra_ms": 0.0,
             "what": "erm fp32, 3 domains x 64 images (batch-size probe)"},
            {"images_per_pass": 32, "passes": 3, "step_ms": 58.3, "extra_ms": 1.0,
             "what": "dsp_reg fp32, 3 domains on one rank (3 passes of 32)"},
        ],
        "sam_step_ms": 88.4,
        "method_extra_ms": {"dsp_reg": 1.0},
    },
    ("h100", "bf16"): {
        "card": "NVIDIA H100 80GB HBM3 (SXM, NVLink 4)",
        "precision": "bf16",
        "source": "bench/results/2026-11-26-h100.md",
        "images_per_step": 96,
        "step_ms": 33.6,
        "forward_ms": 12.2,
        "backward_ms": 29.1,
        "optimizer_ms": 0.8 + 0.9,
        "calibration": [
            {"images_per_pass": 192, "passes": 1, "step_ms": 192 / 3592 * 1000, "extra_ms": 0.0,
             "what": "erm bf16, 3 domains x 64 images (batch-size probe, 3592 img/s)"},
            {"images_per_pass": 32, "passes": 3, "step_ms": 61.8, "extra_ms": 1.0,
             "what": "dsp_reg bf16, 3 domains on one rank (3 passes of 32)"},
        ],
        "sam_step_ms": 63.3,
        "method_extra_ms": {"dsp_reg": 1.0},
    },
}

# Published NCCL all_reduce bus bandwidths (nccl-tests all_reduce_perf, large messages) and latencies.
# Every figure names its source; where none was found, the figure is an assumption and says why.
NETWORK = {
    # GPUs of one NVSwitch node, NVLink SHARP (NVLS, NCCL's default there). nccl-tests' busbw is defined
    # so that it does not depend on the rank count on a flat fabric; the model uses the published 8-GPU
    # figure for every intra-node communicator (W = 2, 4, 8 and DSP-Reg's domain groups): assumption.
    "nvlink_busbw_gbs": {
        "h200": (475.0, "8x H200 NVLink 4, all_reduce_perf peak busbw 475 GB/s: NVIDIA/nccl-tests#272 "
                        "(https://github.com/NVIDIA/nccl-tests/issues/272)"),
        "h100": (480.0, "8x H100 SXM, NVLS: ~480 GB/s peak busbw (algbw ~275), NCCL maintainer in "
                        "NVIDIA/nccl-tests#212 (https://github.com/NVIDIA/nccl-tests/issues/212); "
                        "476 GB/s measured in NVIDIA/nccl-tests#290"),
    },
    # The conservative alternative (sensitivity table): NCCL's ring over NVLink, no NVLS.
    "nvlink_ring_busbw_gbs": (370.0, "NVLink 4 effective bandwidth with NCCL_ALGO=RING: 450 GB/s line rate "
                                     "minus ~20% protocol overhead = ~370 GB/s, NCCL maintainer in "
                                     "NVIDIA/nccl-tests#212"),
    # 2 nodes x 8 GPUs over InfiniBand NDR 400 Gb/s, 8 NICs per node (one per GPU).
    "ib_busbw_gbs": (350.0, "a job of 248 nodes x 8 H200 with 8 NICs each: all_reduce_perf busbw 'typically "
                            "around 350 GB/s', NVIDIA/nccl-tests#283 (https://github.com/NVIDIA/nccl-tests/"
                            "issues/283; two nodes should do at least as well); bound: NDR 400 Gb/s gives 46-48 "
                            "GB/s per NIC (NCCL maintainer in NVIDIA/nccl-tests#290), x 8 NICs = 370-385 GB/s "
                            "for a 2-node ring"),
    "ib_busbw_low_gbs": (216.0, "pessimistic: 2x8 H100 with 8x 400G RoCE reaching only 216.5 GB/s busbw "
                                "(1 GiB), NVIDIA/nccl#2409 (https://github.com/NVIDIA/nccl/issues/2409)"),
    "ib_busbw_high_gbs": (470.0, "optimistic: the reporter of NVIDIA/nccl#2409 expects ~470 GB/s for 2 x 8 x "
                                 "400G (NCCL's NVLS-tree, citing nccl-tests#309)"),
    # Latency of one collective.
    "alpha_intra_us": (6.0, "fixed part of an intra-node all_reduce: ~6 us for 2 H100 with NVLSTree and "
                            "CUDA graphs (NVIDIA/nccl#1259, https://github.com/NVIDIA/nccl/issues/1259); "
                            "without graphs a launch adds ~3 us (NVIDIA/nccl#1984)"),
    "alpha_step_us": (0.7, "assumption: +0.7 us per ring step 2(n-1), so 8 GPUs ~16 us per collective"),
    "alpha_inter_us": (47.0, "small-message all_reduce on 2 nodes x 8 GPUs over IB NDR: 46-48 us "
                             "(NVIDIA/nccl#1244, H20 + CX-7, https://github.com/NVIDIA/nccl/issues/1244)"),
    "scalar_sync_us": (20.0, "assumption: host->device copy + device->host read-back of the loss"),
}

DOMAINNET_DOMAINS = [  # domainbed-protocol.md 1.1 (cleaned counts, total 586,575)
    ("clipart", 48_129), ("infograph", 51_605), ("painting", 72_266),
    ("quickdraw", 172_500), ("real", 172_947), ("sketch", 69_128),
]

METHODS = ["erm", "sam", "dsp_reg"]
WORLDS = [(1, 1), (2, 1), (4, 1), (8, 1), (16, 2)]  # (ranks, nodes); 16 = 2 x 8
GPUS_PER_NODE = 8


# --------------------------------------------------------------------------------------------------
# Inputs -> model parameters
# --------------------------------------------------------------------------------------------------

def load_input(path=None, gpu="h200", precision="fp32"):
    if path:
        with open(path) as f:
            inp = json.load(f)
        for key in ("images_per_step", "forward_ms", "backward_ms", "optimizer_ms"):
            if key not in inp:
                raise SystemExit(f"{path}: key `{key}` is required (see the docstring for the schema)")
        inp.setdefault("source", path)
        inp.setdefault("card", "unnamed card")
        inp.setdefault("precision", "?")
        return inp
    return json.loads(json.dumps(CARDS[(gpu, precision)]))  # a copy


def fit_pass_model(inp, knee=None):
    """(a, b, how): t_pass(n) = a + b n in ms."""
    n0 = inp["images_per_step"]
    step = inp.get("step_ms") or (inp["forward_ms"] + inp["backward_ms"] + inp["optimizer_ms"])
    y0 = step - inp["optimizer_ms"]
    if knee is not None:
        b = y0 / (n0 + knee)
        return knee * b, b, f"--knee-images {knee:g}: a = {knee:g} * b, ERM step at {n0} images kept"
    if inp.get("pass_overhead_ms") is not None:
        a = inp["pass_overhead_ms"]
        return a, (y0 - a) / n0, "pass_overhead_ms given by the input"
    points = [(n0, y0)]
    for c in inp.get("calibration", []):
        y = (c["step_ms"] - inp["optimizer_ms"] - c.get("extra_ms", 0.0)) / c["passes"]
        points.append((c["images_per_pass"], y))
    if len({n for n, _ in points}) < 2:
        b = y0 / (n0 + 32)
        return 32 * b, b, "assumption (no second measured batch size): a = 32 * b"
    mean_n = sum(n for n, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    b = sum((n - mean_n) * (y - mean_y) for n, y in points) / sum((n - mean_n) ** 2 for n, _ in points)
    a = mean_y - b * mean_n
    return a, b, f"least-squares fit to {len(points)} measured points (n, ms per pass): " + ", ".join(
        f"({n}, {y:.2f})" for n, y in points)


def build_params(inp, args):
    a, b, how = fit_pass_model(inp, args.knee_images)
    if a < 0 or b <= 0:
        raise SystemExit(f"pass model fit gave a = {a:.3f} ms, b = {b:.4f} ms/image: not usable; "
                         "pass --knee-images or pass_overhead_ms")
    f_fwd = inp["forward_ms"] / (inp["forward_ms"] + inp["backward_ms"])
    extra = {"erm": 0.0, "sam": 1.0, "dsp_reg": 1.0}
    extra_how = {"erm": "none", "sam": "assumption 1.0 ms", "dsp_reg": "assumption 1.0 ms"}
    if inp.get("sam_step_ms"):
        n0 = inp["images_per_step"]
        e = inp["sam_step_ms"] - 2 * (a + b * n0) - inp["optimizer_ms"]
        extra["sam"] = max(0.0, e)
        extra_how["sam"] = (f"measured SAM step {inp['sam_step_ms']:.2f} ms - 2 t_pass({n0}) - t_opt = "
                            f"{e:.2f} ms" + (" (clamped at 0)" if e < 0 else ""))
    # Explicit per-method extras win over the derived SAM figure.
    for m, v in (inp.get("method_extra_ms") or {}).items():
        if m in extra:
            extra[m] = float(v)
            extra_how[m] = f"{v:g} ms (input)"
    if "dsp_reg" in (inp.get("method_extra_ms") or {}) and not args.input_json:
        extra_how["dsp_reg"] = (f"{extra['dsp_reg']:g} ms: ~10 element-wise passes over P, the "
                                f"2026-11-26-h200.md estimate")
    gpu = args.gpu if args.gpu in NETWORK["nvlink_busbw_gbs"] else "h200"
    nv8, nv8_src = NETWORK["nvlink_busbw_gbs"][gpu]
    p = {
        "card": inp["card"], "precision": inp["precision"], "source": inp["source"],
        "a_ms": a, "b_ms": b, "fit": how, "knee_images": a / b,
        "t_opt_ms": inp["optimizer_ms"], "f_fwd": f_fwd, "extra_ms": extra, "extra_how": extra_how,
        "params": int(inp.get("params") or RESNET50_DOMAINNET_PARAMS),
        "params_how": "input" if inp.get("params") else
        "ResNet-50 with a 345-class head: 23,508,032 + 2048 x 345 + 345",
        "eval_ms_per_image": inp.get("eval_forward_ms_per_image"),
        "domains": len(DOMAINNET_DOMAINS) - 1, "batch_per_domain": 32,
        "steps": args.steps, "eval_every": args.eval_every, "eval_batch": args.eval_batch,
        "bucket_bytes": int(args.bucket_mb * 1024 * 1024),
        "phi": args.overlap_efficiency,
        "nvlink_busbw": args.nvlink_busbw or nv8, "nvlink_src": nv8_src,
        "ib_busbw": args.ib_busbw or NETWORK["ib_busbw_gbs"][0],
        "alpha_intra_us": NETWORK["alpha_intra_us"][0] if args.alpha_intra_us is None else args.alpha_intra_us,
        "alpha_step_us": NETWORK["alpha_step_us"][0] if args.alpha_step_us is None else args.alpha_step_us,
        "alpha_inter_us": NETWORK["alpha_inter_us"][0] if args.alpha_inter_us is None else args.alpha_inter_us,
        "scalar_sync_us": NETWORK["scalar_sync_us"][0],
        "loader_img_per_core": args.loader_img_per_core,
        "eval_decode_ms": args.eval_decode_ms, "eval_threads": args.eval_threads,
        "gpu": args.gpu, "floor_images": args.floor_images, "overlap_scope": args.overlap_scope,
    }
    return p


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------

def balanced_plan(world, num_domains, batch):
    """mgrun's ShardingPlan::balanced with unit 1: rank r gets images [r N / W, (r+1) N / W) of the
    domain-major batch, as pieces (domain, lo, hi)."""
    total = num_domains * batch
    starts = [r * total // world for r in range(world + 1)]
    plan = []
    for r in range(world):
        pieces = []
        for u in range(starts[r], starts[r + 1]):
            d, j = divmod(u, batch)
            if pieces and pieces[-1][0] == d and pieces[-1][2] == j:
                pieces[-1][2] = j + 1
            else:
                pieces.append([d, j, j + 1])
        plan.append([tuple(x) for x in pieces])
    return plan


def t_pass(p, n):
    """One forward+backward over n images; below floor_images a pass costs what floor_images cost."""
    return p["a_ms"] + p["b_ms"] * max(n, p.get("floor_images", 0)) if n > 0 else 0.0


def alpha_ms(p, ranks, nodes):
    if ranks <= 1:
        return 0.0
    if nodes > 1:
        return p["alpha_inter_us"] / 1000
    return (p["alpha_intra_us"] + p["alpha_step_us"] * 2 * (ranks - 1)) / 1000


def busbw_gbs(p, ranks, nodes, ranks_per_node=None):
    """Bus bandwidth of an all_reduce over `ranks` GPUs on `nodes` nodes."""
    if nodes > 1:
        # Across nodes the NICs bound it; a group using k GPUs per node uses ~k of the 8 NICs
        # (rail-aligned, one NIC per GPU): assumption.
        k = ranks_per_node or ranks // nodes
        return min(p["ib_busbw"] * k / GPUS_PER_NODE, p["nvlink_busbw"])
    return p["nvlink_busbw"]


def allreduce(p, nbytes, ranks, nodes, ranks_per_node=None):
    """(total ms, ms of the bucket reduced last) of an all_reduce of nbytes in mgrun's buckets."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0, 0.0
    bw = busbw_gbs(p, ranks, nodes, ranks_per_node) * 1e9
    factor = 2 * (ranks - 1) / ranks
    al = alpha_ms(p, ranks, nodes)
    nb = math.ceil(nbytes / p["bucket_bytes"])
    total = nb * al + nbytes * factor / bw * 1000
    # Backward fills the flat buffer from its end, so the bucket reduced last is the first one: full size.
    last_bytes = min(nbytes, p["bucket_bytes"])
    last = al + last_bytes * factor / bw * 1000
    return total, last


def scalar_allreduce(p, ranks, nodes):
    if ranks <= 1:
        return 0.0
    return alpha_ms(p, ranks, nodes) + p["scalar_sync_us"] / 1000


def exposed(p, t_comm, t_last, t_bwd):
    return min(t_comm, max(t_comm - p["phi"] * t_bwd, t_last))


def step_model(p, method, world, nodes):
    K, B = p["domains"], p["batch_per_domain"]
    plan = balanced_plan(world, K, B)
    grad_bytes = 4 * p["params"]
    f_bwd = 1 - p["f_fwd"]
    # Passes per rank.
    passes = []
    for pieces in plan:
        n = sum(hi - lo for _, lo, hi in pieces)
        if method == "erm":
            passes.append([n])
        elif method == "sam":
            passes.append([n, n])
        else:
            passes.append([hi - lo for _, lo, hi in pieces])
    pass_sum = [sum(t_pass(p, n) for n in ps) for ps in passes]
    compute = max(pass_sum) + p["t_opt_ms"] + p["extra_ms"][method]
    imgs = [sum(hi - lo for _, lo, hi in pieces) for pieces in plan]
    comm = comm_ovl = 0.0
    detail = []
    if world > 1:
        n_max = max(imgs)
        t_bwd = f_bwd * t_pass(p, n_max)
        scal = scalar_allreduce(p, world, nodes)
        if method in ("erm", "sam"):
            t, last = allreduce(p, grad_bytes, world, nodes)
            ovl = exposed(p, t, last, t_bwd)
            if method == "erm":
                comm, comm_ovl = t + scal, ovl + scal
            else:
                # The first pass's all-reduce overlaps; the perturbed pass's only with scope "all".
                second = ovl if p["overlap_scope"] == "all" else t
                comm, comm_ovl = 2 * t + scal, ovl + second + scal
            times = 1 if method == "erm" else 2
            detail.append(f"{times} x all-reduce of {grad_bytes / 1e6:.1f} MB over {world}: {t:.3f} ms each")
        else:
            # Domain groups: ranks holding a piece of a domain split over ranks; chained in domain order.
            members = {}
            for r, pieces in enumerate(plan):
                for d, lo, hi in pieces:
                    members.setdefault(d, []).append((r, hi - lo))
            clock = list(pass_sum)
            clock_ovl = list(pass_sum)
            for d in sorted(members):
                group = members[d]
                if len(group) < 2:
                    continue
                ranks = [r for r, _ in group]
                gnodes = len({r // GPUS_PER_NODE for r in ranks})
                per_node = max(sum(1 for r in ranks if r // GPUS_PER_NODE == nd)
                               for nd in {r // GPUS_PER_NODE for r in ranks})
                t, last = allreduce(p, grad_bytes, len(ranks), gnodes, per_node)
                t_bwd_piece = f_bwd * t_pass(p, min(n for _, n in group))
                start = max(clock[r] for r in ranks)
                start_ovl = max(clock_ovl[r] for r in ranks)
                for r in ranks:
                    clock[r] = start + t
                    clock_ovl[r] = start_ovl + (exposed(p, t, last, t_bwd_piece) if p["overlap_scope"] == "all"
                                                else t)
                detail.append(f"domain {d}: group of {len(ranks)} ({gnodes} node(s)) all-reduce of "
                              f"{grad_bytes / 1e6:.1f} MB: {t:.3f} ms")
            t2, _ = allreduce(p, 2 * grad_bytes, world, nodes)
            detail.append(f"world all-reduce of 2P = {2 * grad_bytes / 1e6:.1f} MB over {world}: {t2:.3f} ms")
            comm = max(clock) + t2 + scal - max(pass_sum)
            comm_ovl = max(clock_ovl) + t2 + scal - max(pass_sum)
        detail.append(f"loss scalar all-reduce: {scal * 1000:.0f} us")
    step = compute + comm
    step_ovl = compute + comm_ovl
    return {
        "method": method, "world": world, "nodes": nodes,
        "images_per_rank_max": max(imgs), "passes_per_rank_max": max(len([n for n in ps if n]) for ps in passes),
        "compute_ms": compute, "comm_ms": comm, "comm_exposed_overlap_ms": comm_ovl,
        "step_ms": step, "step_overlap_ms": step_ovl, "comm_detail": detail,
    }


def eval_counts(p):
    """Evaluations in a run: after step 0, every eval_every steps and after the last step."""
    return sum(1 for s in range(p["steps"]) if s % p["eval_every"] == 0 or s + 1 == p["steps"])


def eval_model(p, world, nodes):
    """(GPU ms of one evaluation on the busiest rank, images on that rank, CPU decode ms)."""
    bs = p["eval_batch"]
    gpu = 0.0
    images = 0
    for _, n in DOMAINNET_DOMAINS:
        n_out = int(n * 0.2)
        for split in (n - n_out, n_out):
            mine = -(-split // world)  # rank 0 holds the most: ceil(split / W)
            images += mine
            full, rest = divmod(mine, bs)
            for m, count in ((bs, full), (rest, 1 if rest else 0)):
                if p["eval_ms_per_image"] is not None:
                    gpu += count * (p["f_fwd"] * p["a_ms"] + p["eval_ms_per_image"] * m)
                else:
                    gpu += count * p["f_fwd"] * t_pass(p, m)
    gpu += scalar_allreduce(p, world, nodes)
    decode = images * p["eval_decode_ms"] / p["eval_threads"]
    return gpu, images, decode


def predict(p):
    n_evals = eval_counts(p)
    global_batch = p["domains"] * p["batch_per_domain"]
    rows = []
    for method in METHODS:
        base = None
        for world, nodes in WORLDS:
            s = step_model(p, method, world, nodes)
            ev_ms, ev_imgs, dec_ms = eval_model(p, world, nodes)
            if base is None:
                base = s
            s["images_per_s"] = global_batch / s["step_ms"] * 1000
            s["images_per_s_overlap"] = global_batch / s["step_overlap_ms"] * 1000
            s["images_per_s_per_gpu"] = s["images_per_s"] / world
            s["efficiency"] = base["step_ms"] / (world * s["step_ms"])
            s["efficiency_overlap"] = base["step_overlap_ms"] / (world * s["step_overlap_ms"])
            s["train_h"] = p["steps"] * s["step_ms"] / 3.6e6
            s["train_overlap_h"] = p["steps"] * s["step_overlap_ms"] / 3.6e6
            s["eval_ms_each"] = ev_ms
            s["eval_h"] = n_evals * ev_ms / 3.6e6
            s["run_h"] = s["train_h"] + s["eval_h"]
            s["run_overlap_h"] = s["train_overlap_h"] + s["eval_h"]
            s["loader_cores_per_gpu"] = s["images_per_s_overlap"] / world / p["loader_img_per_core"]
            s["eval_decode_h"] = n_evals * dec_ms / 3.6e6
            s["eval_images_per_rank"] = ev_imgs
            rows.append(s)
    return {"n_evals": n_evals, "global_batch": global_batch, "rows": rows}


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

def world_label(world, nodes):
    return f"2x8 = 16" if nodes > 1 else str(world)


def fmt_inputs(p, res):
    K, B = p["domains"], p["batch_per_domain"]
    lines = [
        f"card: {p['card']}, {p['precision']} (source: {p['source']})",
        f"pass model: t_pass(n) = a + b n, a = {p['a_ms']:.2f} ms, b = {p['b_ms']:.4f} ms/image "
        f"(n_knee = a/b = {p['knee_images']:.1f} images); {p['fit']}",
        f"t_pass(160) = {t_pass(p, 160):.1f} ms, t_pass(32) = {t_pass(p, 32):.1f} ms, "
        f"t_pass(20) = {t_pass(p, 20):.1f} ms, t_pass(10) = {t_pass(p, 10):.1f} ms",
        f"t_opt (flat gradient + Adam, every rank, every step) = {p['t_opt_ms']:.2f} ms",
        f"forward share f_fwd = forward / (forward + backward) = {p['f_fwd']:.3f}",
        "t_extra: erm 0; sam {:.2f} ms ({}); dsp_reg {:.2f} ms ({})".format(
            p["extra_ms"]["sam"], p["extra_how"]["sam"], p["extra_ms"]["dsp_reg"], p["extra_how"]["dsp_reg"]),
        f"parameters P = {p['params']:,} ({p['params_how']}) -> {4 * p['params'] / 1e6:.1f} MB "
        f"fp32 gradients; buckets of {p['bucket_bytes'] / 2**20:g} MiB "
        f"({math.ceil(4 * p['params'] / p['bucket_bytes'])} per P-sized all-reduce)",
        f"step batch: {K} training domains x {B} images = {K * B} images (fixed global batch, "
        f"mgrun's balanced sharding plan)",
        f"busbw inside one node (W = 2, 4, 8 and DSP-Reg's domain groups) = {p['nvlink_busbw']:g} GB/s: "
        f"{p['nvlink_src']}; assumption: the 8-GPU figure holds for fewer GPUs (busbw is rank-count "
        f"independent by construction; the ring figure {NETWORK['nvlink_ring_busbw_gbs'][0]:g} GB/s is in the "
        f"sensitivity table)",
        f"busbw 2x8 over InfiniBand = {p['ib_busbw']:g} GB/s: {NETWORK['ib_busbw_gbs'][1]}",
        f"alpha (one collective) intra-node = {p['alpha_intra_us']:g} us + {p['alpha_step_us']:g} us x 2(n-1): "
        f"{NETWORK['alpha_intra_us'][1]}; {NETWORK['alpha_step_us'][1]}",
        f"alpha across nodes = {p['alpha_inter_us']:g} us: {NETWORK['alpha_inter_us'][1]}",
        f"scalar all-reduce = alpha + {p['scalar_sync_us']:g} us: {NETWORK['scalar_sync_us'][1]}",
        f"overlap efficiency phi = {p['phi']:g} (assumption: share of a backward usable for its all-reduce); "
        f"scope '{p['overlap_scope']}': " + ("ERM's all-reduce and SAM's first-pass all-reduce overlap their "
        "backward (the batch gradient of one backward, methods/src/overlap.rs); SAM's perturbed pass and "
        "DSP-Reg's per-domain all-reduces do not" if p["overlap_scope"] == "mgrun" else
        "also SAM's perturbed pass and DSP-Reg's domain-group all-reduces overlap; DSP-Reg's moments do not"),
        f"run: {p['steps']:,} steps, evaluation after step 0, every {p['eval_every']} steps and after the "
        f"last = {res['n_evals']} evaluations of all 586,575 images (in + out splits of 6 domains), "
        f"batch {p['eval_batch']} per rank",
        f"eval batch of n images = " + (
            f"f_fwd x a + {p['eval_ms_per_image']:g} ms x n (input)" if p["eval_ms_per_image"] is not None else
            f"f_fwd x t_pass(n) = {p['f_fwd'] * t_pass(p, p['eval_batch']):.2f} ms for {p['eval_batch']} "
            f"({p['f_fwd'] * t_pass(p, p['eval_batch']) / p['eval_batch']:.3f} ms/image; assumption: "
            f"eval forward costs what the train forward+loss phase costs)"),
        f"side: loader {p['loader_img_per_core']:g} img/s per core (training transform, 500x375 JPEGs, "
        f"2026-11-26-cpu-data.md quiet rerun); eval decode {p['eval_decode_ms']:g} ms/image/thread with "
        f"{p['eval_threads']} threads per rank, not overlapped with the GPU (trainer/src/eval.rs, "
        f"data/src/loader.rs load_eval_batch)",
    ]
    return lines


FORMULA = """\
t_pass(n)       = a + b*n                                   one forward+backward over n images
compute         = max over ranks r of [ sum_{passes of r} t_pass(n) ] + t_opt + t_extra(method)
t_allreduce(S,n)= ceil(S/bucket)*alpha(n) + S * 2(n-1)/n / busbw(n)       (nccl-tests busbw convention)
comm            = critical path of the method's collectives (DSP-Reg: domain groups chained in domain order)
exposed comm    = per overlappable all-reduce: max(T - phi*t_backward, T_last_bucket)
step            = compute + comm            step_overlap = compute + exposed comm
images/s        = 160 / step                efficiency(W) = step(1) / (W * step(W))
eval            = max over ranks of sum_{batches of <=64} f_fwd * t_pass(n_batch)   (each rank 1/W of every split)
run             = 15,001 * step + 16 * eval"""


def table_rows(res, method):
    return [r for r in res["rows"] if r["method"] == method]


def render_text(p, res):
    out = ["bench/scaling_model.py: predicted DomainNet step and run time (a MODEL; no multi-GPU run measured)",
           "", "Formula:"] + ["  " + l for l in FORMULA.splitlines()] + ["", "Inputs:"]
    out += ["  - " + l for l in fmt_inputs(p, res)]
    for method in METHODS:
        out += ["", f"{method}:",
                f"  {'GPUs':>8} {'img/rank':>8} {'passes':>6} {'compute':>8} {'comm':>6} {'step':>7} "
                f"{'exp.comm':>8} {'step+ovl':>8} {'img/s':>7} {'img/s/GPU':>9} {'eff':>5} {'eff+ovl':>7} "
                f"{'train h':>7} {'eval h':>6} {'run h':>6} {'run+ovl h':>9} {'cores/GPU':>9} {'decode h':>8}"]
        for r in table_rows(res, method):
            out.append(
                f"  {world_label(r['world'], r['nodes']):>8} {r['images_per_rank_max']:>8} "
                f"{r['passes_per_rank_max']:>6} {r['compute_ms']:>8.2f} {r['comm_ms']:>6.2f} {r['step_ms']:>7.2f} "
                f"{r['comm_exposed_overlap_ms']:>8.2f} {r['step_overlap_ms']:>8.2f} {r['images_per_s']:>7.0f} "
                f"{r['images_per_s_per_gpu']:>9.0f} {r['efficiency']:>5.2f} {r['efficiency_overlap']:>7.2f} "
                f"{r['train_h']:>7.3f} {r['eval_h']:>6.3f} {r['run_h']:>6.3f} {r['run_overlap_h']:>9.3f} "
                f"{r['loader_cores_per_gpu']:>9.1f} {r['eval_decode_h']:>8.3f}")
    out += ["", headline(p, res)]
    return "\n".join(out)


def find(res, method, world):
    return next(r for r in res["rows"] if r["method"] == method and r["world"] == world)


def headline(p, res):
    e, d, s = (find(res, m, 8) for m in ("erm", "dsp_reg", "sam"))
    card = p["card"].split(" (")[0].replace("NVIDIA ", "")
    return (f"predicted DomainNet run on 8 {card} GPUs: {e['run_h']:.2f} h (ERM), {d['run_h']:.2f} h (DSP-Reg), "
            f"{s['run_h']:.2f} h (SAM)" + f" [{p['precision']}; {p['steps']:,} steps + {res['n_evals']} evaluations; "
            f"{60 * e['run_h']:.1f} / {60 * d['run_h']:.1f} / {60 * s['run_h']:.1f} min; no overlap; with gradient "
            f"overlap {e['run_overlap_h']:.2f} / {d['run_overlap_h']:.2f} / {s['run_overlap_h']:.2f} h]")


def md_table(p, res, method):
    head = ("| GPUs | images/rank (max) | passes/rank (max) | compute ms | comm ms | step ms | exposed comm ms "
            "(overlap) | step ms (overlap) | images/s | images/s per GPU | efficiency vs 1 GPU | "
            "efficiency (overlap) |")
    lines = [head, "|" + "---|" * 12]
    for r in table_rows(res, method):
        lines.append(
            f"| {world_label(r['world'], r['nodes'])} | {r['images_per_rank_max']} | {r['passes_per_rank_max']} | "
            f"{r['compute_ms']:.2f} | {r['comm_ms']:.2f} | {r['step_ms']:.2f} | {r['comm_exposed_overlap_ms']:.2f} | "
            f"{r['step_overlap_ms']:.2f} | {r['images_per_s']:.0f} | {r['images_per_s_per_gpu']:.0f} | "
            f"{r['efficiency']:.2f} | {r['efficiency_overlap']:.2f} |")
    lines += ["", "| GPUs | train h (no overlap) | train h (overlap) | evaluations h (GPU) | one evaluation s | "
              "**run h (no overlap)** | run h (overlap) | side: loader cores per GPU | side: eval JPEG decode h "
              "(today's eval loop, not in run h) |", "|" + "---|" * 9]
    for r in table_rows(res, method):
        lines.append(
            f"| {world_label(r['world'], r['nodes'])} | {r['train_h']:.3f} | {r['train_overlap_h']:.3f} | "
            f"{r['eval_h']:.3f} | {r['eval_ms_each'] / 1000:.1f} | **{r['run_h']:.3f}** | {r['run_overlap_h']:.3f} | "
            f"{r['loader_cores_per_gpu']:.1f} | {r['eval_decode_h']:.3f} |")
    return lines


def render_markdown(p, res, command, extras):
    L = ["# Scaling model: ResNet-50 DomainNet step and run time on 1-16 GPUs (predicted, not measured)", "",
         "This is a **model**. No multi-GPU run of mgrun has been measured (the lent GPU machines had one GPU "
         "each); every number below for more than one GPU is a prediction from a measured one-GPU step and "
         "published NCCL figures, and the one-GPU DomainNet numbers themselves are extrapolated from a "
         "3-domain benchmark with random inputs. Treat them as a plan to check, not as results.", "",
         "Command (Python 3 standard library, no GPU needed, < 1 s):", "",
         "    " + command, "",
         "## Headline", "", "**" + headline(p, res) + ".**", ""]
    L += extras.get("headline_notes", [])
    L += ["", "## Formula", "", "```", FORMULA, "```", "",
          "What crosses ranks per step (methods/src/*.rs `cross_rank_statistics`, "
          "/work/shared/reference/methods-notes.md):", "",
          "- ERM: one all-reduce of the P fp32 gradients (4 buckets of 25 MiB) and the loss (one scalar).",
          "- SAM (`perturb = global`, the default): an all-reduce of the first-pass gradient (every rank then "
          "computes the same norm and perturbation locally, so no norm collective), an all-reduce of the "
          "perturbed gradient, and the loss. (`perturb = local` would replace the first all-reduce by "
          "domain-group all-reduces and add one scalar; not tabulated.)",
          "- DSP-Reg: for every domain split over several ranks, an all-reduce of P within the ranks holding it "
          "(a domain group; groups chain in domain order), then one world all-reduce of 2P "
          "([sum_e g_e; sum_e g_e^2]; the ERM gradient is sum_e g_e / K, so there is no separate gradient "
          "all-reduce), and the loss. With 5 domains x 32 images every domain is split at W = 2 (one), "
          "4 (three), 8 and 16 (all five); at W = 1 the five per-domain passes run on one GPU.", "",
          "Details and the input schema are in the script's docstring (`python3 bench/scaling_model.py --help` "
          "prints it).", "", "## Inputs and sources", ""]
    L += ["- " + l for l in fmt_inputs(p, res)]
    if extras.get("builtin") == ("h200", "fp32"):
        L += ["", "How the pass model was obtained (H200, fp32): the ERM step at 96 images is 35.77 ms (2684 img/s), "
              "i.e. 34.77 ms of forward+backward after the 1.0 ms optimizer; DSP-Reg with 3 domains on one rank "
              "(3 passes of 32) is 52.37 ms, i.e. 3 passes = 52.37 - 1.0 (optimizer) - 1.0 (DSP-Reg element-wise "
              "work) = 50.37 ms. Two equations, a + 96 b = 34.77 and 3 a + 96 b = 50.37, give a = 7.8 ms and "
              "b = 0.281 ms/image. The H100 file gives the same shape independently: ERM at 96 and 192 images "
              "(44.5 and 80.9 ms) and DSP-Reg's 3 x 32 (58.3 ms) fit a = 6.4 ms, b = 0.379 ms/image, n_knee = 17 "
              "(`--gpu h100`)."]
    L += [""]
    for method, title in (("erm", "ERM"), ("dsp_reg", "DSP-Reg"), ("sam", "SAM (global perturbation)")):
        L += [f"## {title}", ""] + md_table(p, res, method) + [""]
        det = [r for r in res["rows"] if r["method"] == method and r["world"] in (8, 16)]
        for r in det:
            L.append(f"- {world_label(r['world'], r['nodes'])} GPUs, collectives: " + "; ".join(r["comm_detail"]))
        L.append("")
    L += extras.get("body", [])
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------------------------------
# Self-test
# --------------------------------------------------------------------------------------------------

def self_test(args):
    failures = []

    def check(cond, what):
        if not cond:
            failures.append(what)

    for (gpu, prec), scope in ((k, sc) for k in CARDS for sc in ("mgrun", "all")):
        a = argparse.Namespace(**vars(args))
        a.gpu, a.precision, a.overlap_scope = gpu, prec, scope
        p = build_params(load_input(None, gpu, prec), a)
        res = predict(p)
        tag = f"{gpu}/{prec}/overlap {scope}"
        check(p["a_ms"] >= 0 and p["b_ms"] > 0, f"{tag}: pass model a >= 0, b > 0")
        for r in res["rows"]:
            w = f"{tag} {r['method']} W={r['world']}"
            if r["world"] == 1:
                check(r["comm_ms"] == 0 and r["comm_exposed_overlap_ms"] == 0, f"{w}: one GPU has zero comm")
            else:
                check(r["comm_ms"] > 0, f"{w}: more than one GPU has some comm")
            check(r["efficiency"] <= 1 + 1e-9 and r["efficiency_overlap"] <= 1 + 1e-9, f"{w}: efficiency <= 1")
            check(r["step_overlap_ms"] <= r["step_ms"] + 1e-12, f"{w}: overlap never slower than no overlap")
            check(r["comm_exposed_overlap_ms"] >= 0, f"{w}: exposed comm >= 0")
            check(r["run_h"] > r["train_h"] > 0, f"{w}: run includes evaluations")
        for m in METHODS:
            rows = table_rows(res, m)
            check(all(x["step_ms"] > 0 for x in rows), f"{tag} {m}: positive steps")
        # Comm time grows with W for a fixed message (inside one node, and across nodes).
        prev = 0.0
        for w, nodes in ((2, 1), (4, 1), (8, 1), (16, 2)):
            t, last = allreduce(p, 100e6, w, nodes)
            check(t >= prev, f"{tag}: all-reduce of 100 MB: W={w} ({t:.3f} ms) >= previous ({prev:.3f} ms)")
            check(0 < last <= t, f"{tag}: last bucket within the all-reduce")
            prev = t
        check(allreduce(p, 100e6, 1, 1) == (0.0, 0.0), f"{tag}: all-reduce on one rank is free")
        # Same bus bandwidth: the 2(n-1)/n factor alone grows with n.
        flat = dict(p, alpha_step_us=0.0)
        ts = [allreduce(flat, 100e6, w, 1)[0] for w in (2, 3, 4, 8)]
        check(ts == sorted(ts), f"{tag}: fixed busbw: time grows with W")
        # Exposed comm is never more than the comm itself, whatever phi.
        for phi in (0.0, 0.5, 1.0):
            q = dict(p, phi=phi)
            for m in METHODS:
                for w, nodes in WORLDS:
                    s = step_model(q, m, w, nodes)
                    check(s["comm_exposed_overlap_ms"] <= s["comm_ms"] + 1e-12, f"{tag} phi={phi} {m} W={w}")
        # phi = 0 means no overlap: the two variants coincide.
        q = dict(p, phi=0.0)
        for m in METHODS:
            for w, nodes in WORLDS:
                s = step_model(q, m, w, nodes)
                check(abs(s["step_overlap_ms"] - s["step_ms"]) < 1e-9, f"{tag} {m} W={w}: phi = 0 is no overlap")
    # Sharding plan: every image of the batch once; sizes differ by at most one.
    for w in range(1, 17):
        plan = balanced_plan(w, 5, 32)
        sizes = [sum(hi - lo for _, lo, hi in pcs) for pcs in plan]
        check(sum(sizes) == 160 and max(sizes) - min(sizes) <= 1, f"plan W={w}: balanced, complete")
    check(eval_counts({"steps": 15001, "eval_every": 1000}) == 16, "16 evaluations in 15,001 steps")
    check(eval_counts({"steps": 5001, "eval_every": 1000}) == 6, "6 evaluations in 5,001 steps")
    check(eval_counts({"steps": 5000, "eval_every": 1000}) == 6, "5,000 steps: 0..4000 and the last (4999)")
    check(sum(n for _, n in DOMAINNET_DOMAINS) == 586_575, "DomainNet has 586,575 images")
    check(RESNET50_DOMAINNET_PARAMS == 24_214_937, "ResNet-50 + 345-class head parameters")
    if failures:
        print("self-test FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"self-test passed ({len(CARDS)} input sets x 2 overlap scopes x {len(METHODS)} methods x "
          f"{len(WORLDS)} worlds)")
    return 0


# --------------------------------------------------------------------------------------------------

def sensitivity(args, inp):
    """8-GPU ERM / DSP-Reg / SAM run hours and 8- and 16-GPU ERM efficiency under changed assumptions."""
    cases = [
        ("default", {}),
        ("n_knee 32 (the issue's ~32) instead of the fit", {"knee_images": 32.0}),
        ("no per-pass overhead (a = 0: compute scales 1/W)", {"knee_images": 0.0}),
        ("per-pass overhead halved (e.g. CUDA graphs)", {"halve_a": True}),
        ("launch-bound floor: passes below 32 images cost t_pass(32)", {"floor_images": 32.0}),
        ("alpha x 10 (60 us + 7 us per ring step in a node, 470 us across nodes)", {"alpha_x10": True}),
        ("NVLink busbw 370 GB/s (ring, no NVLS; nccl-tests#212)",
         {"nvlink_busbw": NETWORK["nvlink_ring_busbw_gbs"][0]}),
        ("IB busbw 216 GB/s (misconfigured fabric, nccl#2409)", {"ib_busbw": NETWORK["ib_busbw_low_gbs"][0]}),
        ("IB busbw 470 GB/s (NVLS-tree, expected in nccl#2409)", {"ib_busbw": NETWORK["ib_busbw_high_gbs"][0]}),
    ]
    lines = ["| assumption changed | ERM run h, 8 GPUs | DSP-Reg run h, 8 | SAM run h, 8 | ERM efficiency 8 / 2x8 | "
             "ERM comm share of step, 8 / 2x8 |", "|---|---|---|---|---|---|"]
    for label, change in cases:
        a = argparse.Namespace(**vars(args))
        for k, v in change.items():
            if k in ("halve_a", "alpha_x10"):
                continue
            setattr(a, k, v)
        p = build_params(inp, a)
        if change.get("halve_a"):
            y0 = p["a_ms"] + p["b_ms"] * inp["images_per_step"]
            p["a_ms"] /= 2
            p["b_ms"] = (y0 - p["a_ms"]) / inp["images_per_step"]
        if change.get("alpha_x10"):
            p["alpha_intra_us"] *= 10
            p["alpha_step_us"] *= 10
            p["alpha_inter_us"] *= 10
        res = predict(p)
        e8, e16 = find(res, "erm", 8), find(res, "erm", 16)
        lines.append(f"| {label} | {e8['run_h']:.3f} | {find(res, 'dsp_reg', 8)['run_h']:.3f} | "
                     f"{find(res, 'sam', 8)['run_h']:.3f} | {e8['efficiency']:.2f} / {e16['efficiency']:.2f} | "
                     f"{100 * e8['comm_ms'] / e8['step_ms']:.1f}% / {100 * e16['comm_ms'] / e16['step_ms']:.1f}% |")
    return lines


def notes(p, res):
    """The results document's findings, side columns, assumptions and limits, with this run's numbers."""
    e1, e8, e16 = find(res, "erm", 1), find(res, "erm", 8), find(res, "erm", 16)
    d8, d16, s8 = find(res, "dsp_reg", 8), find(res, "dsp_reg", 16), find(res, "sam", 8)
    fixed20 = p["a_ms"] / t_pass(p, 20)
    res_all = predict(dict(p, overlap_scope="all"))
    d8a, s8a, d16a = find(res_all, "dsp_reg", 8), find(res_all, "sam", 8), find(res_all, "dsp_reg", 16)
    # SWAD's fast evaluation: every out split + the test domain's (clipart, configs/domainnet.toml) in split.
    test_n = DOMAINNET_DOMAINS[0][1]
    fast_eval = sum(int(n * 0.2) for _, n in DOMAINNET_DOMAINS) + (test_n - int(test_n * 0.2))
    per_rank_default = 2 * p["loader_img_per_core"]
    bound = []
    for m, name in (("erm", "ERM"), ("dsp_reg", "DSP-Reg"), ("sam", "SAM")):
        ws = [world_label(r["world"], r["nodes"]) for r in table_rows(res, m)
              if r["images_per_s_overlap"] / r["world"] > per_rank_default]
        if ws:
            bound.append(f"{name} at W = {', '.join(ws)}")
    loader_bound = "; ".join(bound) if bound else "no row of the tables"
    L = ["## What the model says", "",
         f"1. **The fixed global batch, not the network, limits scaling.** With 160 images per step, 8 GPUs "
         f"compute 20 images each; a pass of 20 images costs {t_pass(p, 20):.1f} ms, of which the per-pass "
         f"fixed part a = {p['a_ms']:.1f} ms is {100 * fixed20:.0f}%, and the optimizer ({p['t_opt_ms']:.1f} ms) "
         f"runs on every rank. ERM reaches {e8['efficiency']:.2f} efficiency on 8 GPUs and "
         f"{e16['efficiency']:.2f} on 2x8 ({e8['images_per_s']:.0f} and {e16['images_per_s']:.0f} images/s "
         f"against {e1['images_per_s']:.0f} on one GPU).",
         f"2. **Communication is small inside a node:** ERM {100 * e8['comm_ms'] / e8['step_ms']:.1f}% of the "
         f"8-GPU step, SAM {100 * s8['comm_ms'] / s8['step_ms']:.1f}%, DSP-Reg "
         f"{100 * d8['comm_ms'] / d8['step_ms']:.1f}% (its chained domain-group all-reduces and the 2P moments). "
         f"Across two nodes: ERM {100 * e16['comm_ms'] / e16['step_ms']:.1f}%, DSP-Reg "
         f"{100 * d16['comm_ms'] / d16['step_ms']:.1f}% (one domain group spans both nodes on few NICs). "
         f"Gradient-bucket overlap (scope '{p['overlap_scope']}') saves "
         f"{e8['comm_ms'] - e8['comm_exposed_overlap_ms']:.2f} ms (ERM), "
         f"{s8['comm_ms'] - s8['comm_exposed_overlap_ms']:.2f} ms (SAM) and "
         f"{d8['comm_ms'] - d8['comm_exposed_overlap_ms']:.2f} ms (DSP-Reg) per 8-GPU step. Overlapping also "
         f"DSP-Reg's domain-group all-reduces and SAM's perturbed pass (`--overlap-scope all`) would save "
         f"{d8a['comm_ms'] - d8a['comm_exposed_overlap_ms']:.2f} ms (DSP-Reg) and "
         f"{s8a['comm_ms'] - s8a['comm_exposed_overlap_ms']:.2f} ms (SAM) on 8 GPUs, "
         f"{d16a['comm_ms'] - d16a['comm_exposed_overlap_ms']:.2f} ms for DSP-Reg on 2x8 "
         f"({100 * (d16a['comm_ms'] - d16a['comm_exposed_overlap_ms']) / d16a['step_ms']:.0f}% of its step): "
         f"worth having across nodes, marginal inside one.",
         f"3. **Evaluations are a large share of a DomainNet run.** DomainBed's protocol scores every domain's "
         f"in and out split (586,575 images) {res['n_evals']} times: {res['n_evals'] * 586575 / 1e6:.1f} M "
         f"forward images against {p['steps'] * 160 / 1e6:.1f} M training images. They are "
         f"{100 * e1['eval_h'] / e1['run_h']:.0f}% of the one-GPU ERM run and "
         f"{100 * e8['eval_h'] / e8['run_h']:.0f}% "
         f"of the 8-GPU one (evaluations shard perfectly: 64-image batches stay efficient). SWAD's \"fast\" "
         f"evaluation (out splits + the test domain's in split, {fast_eval:,} images, "
         f"{100 * fast_eval / 586575:.0f}%) would cut that part to about a quarter.",
         "4. **What would move the 8-GPU number most:** the per-pass fixed cost (CUDA graphs for the "
         "forward+backward, as the H200 file already proposes for bf16 and DSP-Reg), then the evaluations; "
         "bandwidth figures barely matter (sensitivity table).", "",
         "## Side columns: where the CPU would become the bottleneck (not in the prediction)", "",
         f"- **Training loader.** mgrun's training transform runs at ~{p['loader_img_per_core']:g} images/s per "
         f"core (500x375 JPEGs, 2026-11-26-cpu-data.md). The predicted throughput needs "
         f"{e1['loader_cores_per_gpu']:.1f} loader cores for one GPU and {e8['loader_cores_per_gpu']:.1f} per GPU "
         f"at 8 GPUs (ERM; {8 * e8['loader_cores_per_gpu']:.0f} cores per 8-GPU node). `data.num_workers` "
         f"defaults to 2 per rank (~{per_rank_default:.0f} images/s per GPU), below the predicted per-GPU rate "
         f"for {loader_bound}: at the defaults those runs would be loader-bound, so set num_workers to the "
         f"cores column or more. DomainNet (88 GB of decoded 224 px images) does not fit the 1 GiB image "
         f"cache, so every drawn image is decoded.",
         f"- **Evaluation decoding, as mgrun does it today** (trainer/src/eval.rs, data/src/loader.rs "
         f"`load_eval_batch`): each rank decodes its share with at most {p['eval_threads']} threads, "
         f"synchronously before each forward, uncached. At ~{p['eval_decode_ms']:g} ms per image and thread "
         f"(decode 0.8 + resize 0.5 + normalize 0.05 ms, the per-stage costs of 2026-11-26-cpu-data.md) that is "
         f"{e1['eval_decode_h']:.2f} h of evaluation decoding on one GPU and {e8['eval_decode_h']:.2f} h on 8 "
         f"(the column 'eval JPEG decode h'), {e8['eval_decode_h'] / e8['eval_h']:.1f}x the evaluations' GPU time "
         f"and {100 * e8['eval_decode_h'] / e8['run_h']:.0f}% of the whole predicted 8-GPU ERM run. "
         f"Until the evaluation decodes on more threads and overlaps with the forward, a real 8-GPU "
         f"ERM run would take about {e8['run_h'] + e8['eval_decode_h']:.2f} h, not {e8['run_h']:.2f} h. "
         "The per-core rates come from a shared 2-core VM; a server core is probably faster, and DomainNet's "
         "images are not all 500x375 (quickdraw and clipart are smaller).", "",
         "## Assumptions and what would invalidate them", "",
         f"- **The affine pass model** t_pass(n) = a + b n, fitted to two H200 points (96 images: ERM; 32 "
         f"images: DSP-Reg's per-domain passes) and extrapolated down to 20 and 10 images per GPU. If passes "
         f"below 32 images are launch-bound (time = max(CPU launch, GPU work)) rather than additive, they cost "
         f"about t_pass(32) = {t_pass(p, 32):.1f} ms whatever n: see the 'launch-bound floor' row of the "
         f"sensitivity table. Measuring `mgrun bench step` at 10, 20 and 40 images per domain on one GPU "
         f"would settle it without a multi-GPU machine. The H100 file's three points (96, 192 images and "
         f"3 x 32) lie on such a line (`--gpu h100`: a = 6.4 ms, b = 0.379 ms/image, n_knee = 17), which supports "
         f"the shape above 32 images only.",
         "- **The one-GPU benchmark** used random inputs already on the GPU, BatchNorm in train mode and 3 "
         "domains; the DomainNet job freezes BN (configs/domainnet.toml) and copies each batch from pinned host "
         "memory (160 x 3 x 224 x 224 fp32 = 96 MB per step at one GPU, 1/W of it per rank; not modelled). "
         "DSP-Reg's 1 ms element-wise extra is an estimate, and its one-GPU prediction reuses the point it "
         "was fitted to (5 passes of 32 instead of 3).",
         "- **bf16**: the bf16 fit (a = 16 ms) comes from DSP-Reg's launch-bound bf16 passes; it predicts "
         "bf16 slower than fp32 at 8 GPUs. That is what the measurements imply, but the fit rests on one "
         "small-batch point.",
         "- **Bus bandwidths are large-message peaks** (nccl-tests reach them at hundreds of MB; mgrun sends "
         "25 MiB buckets). The alpha-beta model with alpha per bucket only partly captures the lower "
         "bandwidth of 25 MiB messages. Because communication is a few percent of the step, a 2x error here "
         "moves the 8-GPU step by a few percent; the sensitivity table shows alpha x 10 and ring bandwidth.",
         "- **2 x 8 over InfiniBand** assumes 8 NDR NICs per node with GPUDirect RDMA and NCCL's default "
         "algorithms. A misconfigured fabric (nccl#2409: 216 GB/s) or NCCL falling back to sockets would "
         "change the 2x8 rows; a domain group spanning both nodes is assumed to use one NIC per GPU it has "
         "on each node.",
         f"- **Overlap** (phi = {p['phi']:g}, the flat buffer's first bucket always exposed) follows the "
         "gradient-bucket overlap being added to mgrun (methods/src/overlap.rs, `comm.overlap`, uncommitted "
         "while this was written): it covers the batch gradient of one backward (ERM, SAM's first pass) and, "
         "as written, **not CUDA ranks yet** (worker.rs: 'not implemented for CUDA ranks yet'). On the H200 "
         "the overlap columns are therefore what the feature would give once it runs on CUDA; today's GPU "
         "runs are the no-overlap columns.",
         "- **DSP-Reg's domain groups run one after another** (each rank walks its groups in domain order, "
         "methods/src/gradients.rs), so with every domain split (W = 8, 16) the five group all-reduces chain. "
         "At W = 5 (not tabulated) the balanced plan gives every rank one whole domain and they disappear.",
         "- **Not modelled:** start-up (NCCL init, scanning 586k files, loading weights), checkpoints, "
         "stragglers and step-time jitter (a fixed-batch step waits for the slowest of W ranks), CPU "
         "contention between 8 ranks' loaders on one host, SWAD's averaging, and early stopping.", "",
         "No multi-GPU run was measured for this document. The first check on a lent multi-GPU machine: "
         "`mgrun --gpus 8` on configs/domainnet.toml for a few hundred steps, comparing `step_time` in "
         "steps.jsonl with the 'step ms' column, and one evaluation's wall time with 'one evaluation s' + "
         "the decode share.", ""]
    return L


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-json", help="measured one-GPU breakdown (schema: see the module docstring)")
    ap.add_argument("--gpu", choices=["h200", "h100"], default="h200",
                    help="built-in one-GPU inputs and NVLink figure (default h200)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="built-in inputs' precision")
    ap.add_argument("--json", help="write inputs, derived parameters and every row as JSON here")
    ap.add_argument("--markdown", help="write the results document here")
    ap.add_argument("--self-test", action="store_true", help="check basic properties of the model and exit")
    ap.add_argument("--knee-images", type=float, default=None,
                    help="per-GPU batch below which time per image rises: a = N * b (overrides the fit)")
    ap.add_argument("--floor-images", type=float, default=0.0,
                    help="a pass of fewer images costs what this many cost (launch-bound floor; default 0: none)")
    ap.add_argument("--overlap-efficiency", type=float, default=0.8, help="phi (default 0.8)")
    ap.add_argument("--overlap-scope", choices=["mgrun", "all"], default="mgrun",
                    help="which all-reduces overlap: mgrun = the batch gradient of one backward (ERM, SAM's "
                         "first pass; methods/src/overlap.rs), all = also SAM's perturbed pass and DSP-Reg's "
                         "domain-group all-reduces (default mgrun)")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="comm.bucket_mb (MiB, default 25)")
    ap.add_argument("--steps", type=int, default=15001)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--nvlink-busbw", type=float, default=None, help="GB/s, GPUs inside one node")
    ap.add_argument("--ib-busbw", type=float, default=None, help="GB/s, 2 x 8 GPUs over InfiniBand")
    ap.add_argument("--alpha-intra-us", type=float, default=None)
    ap.add_argument("--alpha-step-us", type=float, default=None)
    ap.add_argument("--alpha-inter-us", type=float, default=None)
    ap.add_argument("--loader-img-per-core", type=float, default=353.0)
    ap.add_argument("--eval-decode-ms", type=float, default=1.35)
    ap.add_argument("--eval-threads", type=int, default=4)
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test(args)
    inp = load_input(args.input_json, args.gpu, args.precision)
    p = build_params(inp, args)
    res = predict(p)
    print(render_text(p, res))
    command = "python3 bench/scaling_model.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": "bench/scaling_model.py", "measured": False, "inputs": inp,
                       "parameters": p, "n_evals": res["n_evals"], "rows": res["rows"]}, f, indent=1)
    if args.markdown:
        extras = {"headline_notes": [], "body": [],
                  "builtin": None if args.input_json else (args.gpu, args.precision)}
        # bf16 headline on the same card, when built-in inputs are used.
        if not args.input_json:
            other = "bf16" if args.precision == "fp32" else "fp32"
            a2 = argparse.Namespace(**vars(args))
            a2.precision = other
            p2 = build_params(load_input(None, args.gpu, other), a2)
            res2 = predict(p2)
            extras["headline_notes"].append(
                f"- Same model with the {other} measurements of the same file: {headline(p2, res2)} "
                f"(fit: a = {p2['a_ms']:.1f} ms, b = {p2['b_ms']:.3f} ms/image).")
            other_gpu = "h100" if args.gpu == "h200" else "h200"
            a3 = argparse.Namespace(**vars(args))
            a3.gpu = other_gpu
            p3 = build_params(load_input(None, other_gpu, args.precision), a3)
            extras["headline_notes"].append(
                f"- With the {other_gpu.upper()} file's measurements (`--gpu {other_gpu}`): "
                f"{headline(p3, predict(p3))}.")
        extras["body"] += ["## Sensitivity (same inputs, one assumption changed at a time)", ""]
        extras["body"] += sensitivity(args, inp) + [""]
        extras["body"] += notes(p, res)
        with open(args.markdown, "w") as f:
            f.write(render_markdown(p, res, command, extras))
    return 0


if __name__ == "__main__":
    sys.exit(main())
