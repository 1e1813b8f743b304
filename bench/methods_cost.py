"""Cost of every method's training step relative to ERM's, measured in real 2-rank CPU jobs.

Usage: python bench/methods_cost.py [--mgrun target/release/mgrun] [--rounds 2] [--steps 10] [--out DIR]

Each method trains the quickstart job (synthetic dataset, 3 training domains, leave-one-domain-out) as
ResNet-18 on 32x32 images, 16 images per domain and step, `--cpus 2` (TCP communication on loopback,
one thread per rank), with the method's defaults. The step time is the median of rank 0's recorded
`step_time` after the first 3 steps (warm-up; it includes the collectives). Methods run one after
another in each round, ERM first; a method's cost is its median over the rounds of (its step time /
ERM's step time in the same round), so slow drifts of a shared machine cancel. Prints a markdown table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

METHODS = ["erm", "sam", "dsp_reg", "vrex", "group_dro", "coral", "fishr", "disam", "tram", "udim", "mixup",
           "ocnn", "elr", "ps_kd", "advstyle", "weight_compander"]


def step_time(mgrun, method, out, steps):
    args = [mgrun, "--cpus", "2", "--out", out,
            "--set", f"method.name={method}", "--set", "model.arch=resnet18", "--set", "data.image_size=32",
            "--set", "data.batch_per_domain=16", "--set", f"train.steps={steps}", "--set", "eval.every_steps=100000",
            "configs/quickstart.toml"]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{method} failed:\n{result.stdout}\n{result.stderr}")
    with open(os.path.join(out, "steps.jsonl")) as f:
        times = [json.loads(line)["step_time"] for line in f if line.strip()]
    return statistics.median(times[3:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mgrun", default="target/release/mgrun")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    methods = args.methods.split(",")
    if methods[0] != "erm":
        methods = ["erm"] + [m for m in methods if m != "erm"]
    out = args.out or tempfile.mkdtemp(prefix="mgrun-methods-cost-")
    ratios = {m: [] for m in methods}
    seconds = {m: [] for m in methods}
    for r in range(args.rounds):
        erm = None
        for m in methods:
            t = step_time(args.mgrun, m, os.path.join(out, f"r{r}-{m}"), args.steps)
            erm = t if m == "erm" else erm
            seconds[m].append(t)
            ratios[m].append(t / erm)
            print(f"round {r + 1}: {m:16s} {t * 1000:8.1f} ms  {t / erm:5.2f}x ERM", file=sys.stderr, flush=True)
    print("| method | step (ms, median of rounds) | x ERM (median of rounds) | range |")
    print("|---|---|---|---|")
    for m in methods:
        print(f"| {m} | {statistics.median(seconds[m]) * 1000:.0f} | {statistics.median(ratios[m]):.2f} | "
              f"{min(ratios[m]):.2f}-{max(ratios[m]):.2f} |")


if __name__ == "__main__":
    main()
