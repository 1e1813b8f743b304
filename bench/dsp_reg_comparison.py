"""DSP-Reg against ERM and SAM on the offline digits datasets, from scratch and from a pretrained start.

Usage: python bench/dsp_reg_comparison.py [--mgrun target/release/mgrun] [--out runs/dsp-comparison]
                                          [--trials 5] [--steps 300] [--width 16] [--collect-only]

1. `mgrun datagen rotated_digits` and `colored_digits` (scikit-learn's digits), and the synthetic shapes.
2. The pretrained start: ERM on the synthetic shapes (another task: 5 shape classes, 4 styles) at 28 px,
   the same small CNN; fine-tuning loads its featurizer (the 5-class head is skipped).
3. For each dataset (held-out domain: rot75, minus90), each regime (scratch, pretrained) and each
   variant (erm, sam, dsp_reg anchor, shrink and gate, gate with the layer_norm and rank scores, and
   vrex, group_dro, coral, fishr, mixup, elr, ps_kd, each at its defaults), `mgrun sweep --n-hparams 1
   --n-trials T --test-domains D --run` (hparams seed 0, i.e. the defaults; T trial seeds, which reshuffle
   the in/out splits and seed the run), one CPU rank each, then `mgrun collect`.
4. Prints, and writes to OUT/comparison.md, held-out accuracy (DomainBed's training-domain validation
   selection, mean +/- standard error over trials) and DSP-Reg's per-layer sensitivity over training.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

DATASETS = [("rotated_digits", "rot75"), ("colored_digits", "minus90")]
VARIANTS = [
    ("erm", "erm", []),
    ("sam", "sam", []),
    ("dsp_reg anchor", "dsp_reg", ["method.dsp_reg.mode=anchor"]),
    ("dsp_reg shrink", "dsp_reg", ["method.dsp_reg.mode=shrink"]),
    ("dsp_reg gate", "dsp_reg", ["method.dsp_reg.mode=gate"]),
    # The other sensitivity scores, with the default mode.
    ("dsp_reg gate layer_norm", "dsp_reg", ["method.dsp_reg.mode=gate", "method.dsp_reg.score=layer_norm"]),
    ("dsp_reg gate rank", "dsp_reg", ["method.dsp_reg.mode=gate", "method.dsp_reg.score=rank"]),
    # DomainBed's baselines whose step costs about ERM's (bench/results/2026-12-02-methods-cost.md); the
    # SAM family beyond SAM, OCNN, AdvStyle and Weight Compander (1.8-25x ERM) are left out for time.
    ("vrex", "vrex", []),
    ("group_dro", "group_dro", []),
    ("coral", "coral", []),
    ("fishr", "fishr", []),
    ("mixup", "mixup", []),
    ("elr", "elr", []),
    ("ps_kd", "ps_kd", []),
]


def finished(sweep, trials):
    """Every run of an earlier invocation is done (a sweep is not re-expanded over finished runs)."""
    runs = [d for d in os.listdir(sweep) if os.path.isdir(os.path.join(sweep, d))] if os.path.isdir(sweep) else []
    return len(runs) == trials and all(os.path.exists(os.path.join(sweep, r, "done")) for r in runs)


def run(args, log=None):
    started = time.time()
    result = subprocess.run(args, capture_output=True, text=True)
    if log:
        with open(log, "w") as f:
            f.write(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result.stdout, time.time() - started


def sets(pairs):
    return [x for p in pairs for x in ("--set", p)]


def training_domain_average(collect_output):
    """The 'Averages' row of the training-domain validation selection: (mean, standard error)."""
    section = collect_output.split("## Model selection: training-domain validation set")[1]
    section = section.split("## Model selection:")[0]
    averages = section.split("### Averages")[1]
    for line in averages.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.match(r"^[-\d.]+ \+/- [-\d.]+$", cells[1]):
            mean, err = cells[1].split(" +/- ")
            return float(mean), float(err)
    raise ValueError(f"no averages row in:\n{section}")


def sensitivity_by_layer(sweep_dir):
    """Per penalised layer (weight w > 0), the mean DSP-Reg sensitivity at the first and the last
    evaluation, averaged over runs (excluded norms and biases have w = 0)."""
    first, last, penalised = {}, {}, set()
    for root, _, files in os.walk(sweep_dir):
        if "results.jsonl" not in files:
            continue
        records = [json.loads(l) for l in open(os.path.join(root, "results.jsonl")) if l.strip()]
        records = [r for r in records if "dsp_sensitivity" in r]
        if not records:
            continue
        for target, record in ((first, records[0]), (last, records[-1])):
            for layer, stats in record["dsp_sensitivity"].items():
                target.setdefault(layer, []).append(stats["mean"])
                if stats["w_mean"] > 0:
                    penalised.add(layer)
    mean = lambda xs: sum(xs) / len(xs)
    return {layer: (mean(first[layer]), mean(last.get(layer, [float("nan")]))) for layer in first if layer in penalised}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mgrun", default="target/release/mgrun")
    parser.add_argument("--out", default="runs/dsp-comparison")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--collect-only", action="store_true", help="tables from the sweeps already in --out")
    args = parser.parse_args()
    mgrun, out = os.path.abspath(args.mgrun), os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    started = time.time()

    data = os.path.join(out, "data")
    for dataset, _ in [] if args.collect_only else DATASETS:
        if not os.path.isdir(os.path.join(data, dataset)):
            run([mgrun, "datagen", dataset, "--out", os.path.join(data, dataset), "--python", sys.executable])
    pretrained = os.path.join(out, "pretrain", "model.safetensors")
    if not args.collect_only and not os.path.exists(pretrained):
        run([mgrun, "--cpus", "1", "--out", os.path.join(out, "pretrain"), "--overwrite", "configs/quickstart.toml"]
            + sets(["method.name=erm", f"data.root={data}/synthetic", "data.image_size=28", "data.test_domains=[]",
                    f"model.width={args.width}", f"train.steps={args.pretrain_steps}", "checkpoint.every_steps=0"]),
            log=os.path.join(out, "pretrain.log"))

    base = [f"model.width={args.width}", f"train.steps={args.steps}", "eval.every_steps=50"]
    results, sensitivity = {}, {}
    for dataset, test_domain in DATASETS:
        for regime, start in (("scratch", "none"), ("pretrained", pretrained)):
            for name, algorithm, extra in VARIANTS:
                sweep = os.path.join(out, "sweeps", f"{dataset}-{regime}-{name.replace(' ', '-')}")
                overrides = base + [f"data.root={data}/{dataset}", f"model.pretrained={start}"] + extra
                if not args.collect_only and not finished(sweep, args.trials):
                    run([mgrun, "sweep", f"configs/{dataset}.toml", "--algorithms", algorithm, "--n-hparams", "1",
                         "--n-trials", str(args.trials), "--test-domains", test_domain, "--cpus", "1", "--out",
                         sweep, "--run"] + sets(overrides), log=sweep + ".log")
                collected, _ = run([mgrun, "collect", sweep])
                results[(dataset, regime, name)] = training_domain_average(collected)
                if algorithm == "dsp_reg":
                    sensitivity[(dataset, regime, name)] = sensitivity_by_layer(sweep)
                mean, err = results[(dataset, regime, name)]
                print(f"{dataset} {regime} {name}: {mean:.1f} +/- {err:.1f} ({time.time() - started:.0f} s)", flush=True)

    lines = [f"Held-out accuracy (%), training-domain validation, mean +/- SE over {args.trials} trials; "
             f"small CNN width {args.width}, {args.steps} steps, 1 CPU rank.", ""]
    header = ["method"] + [f"{d} ({t}) {r}" for d, t in DATASETS for r in ("scratch", "pretrained")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, _, _ in VARIANTS:
        cells = [f"{results[(d, r, name)][0]:.1f} +/- {results[(d, r, name)][1]:.1f}"
                 for d, _ in DATASETS for r in ("scratch", "pretrained")]
        lines.append("| " + " | ".join([name] + cells) + " |")
    lines += ["", "DSP-Reg's sensitivity s = V/(V+M+eps) per penalised weight tensor (norms and biases are excluded), "
              "mean over the tensor at the first evaluation after the warm-up -> the last, averaged over trials "
              "(gate's w = s too):"]
    dsp_variants = [name for name, algorithm, extra in VARIANTS if algorithm == "dsp_reg" and len(extra) == 1]
    for dataset, _ in DATASETS:
        for regime in ("scratch", "pretrained"):
            layers = sensitivity[(dataset, regime, dsp_variants[0])]
            lines += ["", f"{dataset}, {regime}:", "", "| layer | " + " | ".join(dsp_variants) + " |",
                      "|" + "---|" * (len(dsp_variants) + 1)]
            for layer in layers:
                cells = [sensitivity[(dataset, regime, v)].get(layer, (float("nan"),) * 2) for v in dsp_variants]
                lines.append(f"| {layer} | " + " | ".join(f"{a:.2f} -> {b:.2f}" for a, b in cells) + " |")
    lines += ["", f"Total {time.time() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
