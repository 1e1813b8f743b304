#!/usr/bin/env python3
"""Time to recover from a killed rank and from a preemption, against the uninterrupted run.

Usage: bench/recovery_bench.py [--ranks 2] [--steps 60] [--at 25] [--dir /tmp/mgrun-recovery-bench]

Three runs of the same job (small_cnn, 3 synthetic domains x 32 images of 32 px, checkpoint every 10
steps, deterministic mode), one after the other on this machine:
  1. uninterrupted: `mgrun --cpus W` to the end;
  2. kill: `mgrun --cpus W --max-restarts 1`, SIGKILL of rank 1 once step --at is recorded; mgrun stops
     every rank, restarts them from the newest checkpoint and finishes;
  3. preemption: SIGUSR1 to the launcher at step --at (checkpoint, exit 75), then the same command with
     `--resume auto` (what a requeued Slurm job runs) to the end.
It prints, per interrupted run: the time from the signal to the first step recorded after it (the
recovery), the steps recomputed, the total wall time and its ratio to the uninterrupted run, and checks
that the final model equals the uninterrupted run's (bit for bit).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.numpy import load_file


def steps_done(out):
    try:
        return sum(1 for _ in open(out / "steps.jsonl"))
    except FileNotFoundError:
        return 0


def step_records(out):
    return [json.loads(line) for line in open(out / "steps.jsonl") if line.strip()]


def wait_for(predicate, limit=600):
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            sys.exit("timed out")
        time.sleep(0.005)


def children(pid):
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def env_of(pid, name):
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(name.encode() + b"="):
            return item.split(b"=", 1)[1].decode()
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--at", type=int, default=25)
    parser.add_argument("--dir", default="/tmp/mgrun-recovery-bench")
    args = parser.parse_args()
    mgrun = os.environ.get("MGRUN", str(Path(os.environ.get("CARGO_TARGET_DIR", "target")) / "release" / "mgrun"))
    base = Path(args.dir)
    subprocess.run(["rm", "-rf", str(base)], check=True)
    base.mkdir(parents=True)
    subprocess.run([mgrun, "datagen", "synthetic", "--out", str(base / "data"), "--images-per-class", "20",
                    "--image-size", "32"], check=True, stdout=subprocess.DEVNULL)
    config = base / "job.toml"
    config.write_text(f"""
[data]
dataset = "synthetic"
root = "{base / 'data'}"
test_domains = ["photo"]
batch_per_domain = 32
image_size = 32
[model]
arch = "small_cnn"
width = 32
[train]
steps = {args.steps}
lr = 1e-3
deterministic = true
micro_batch = 8
progress_every_s = 1000.0
[eval]
every_steps = 1000
[checkpoint]
every_steps = 10
""")
    launch = [mgrun, "--cpus", str(args.ranks)]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    started = time.monotonic()
    subprocess.run(launch + ["--out", str(base / "plain"), str(config)], check=True, **quiet)
    plain_s = time.monotonic() - started
    reference = load_file(str(base / "plain" / "model.safetensors"))
    step_s = plain_s / args.steps

    rows = []

    # Kill a rank; the launcher restarts every rank from the newest checkpoint.
    out = base / "kill"
    started = time.monotonic()
    job = subprocess.Popen(launch + ["--max-restarts", "1", "--out", str(out), str(config)], **quiet)
    wait_for(lambda: steps_done(out) >= args.at)
    rank1 = next(p for p in children(job.pid) if env_of(p, "RANK") == "1")
    killed_at_step = steps_done(out)
    os.kill(rank1, signal.SIGKILL)
    hit = time.monotonic()
    # After the restart, steps.jsonl is cut back to the checkpoint and grows again past it.
    checkpoint_step = (killed_at_step // 10) * 10
    wait_for(lambda: steps_done(out) == checkpoint_step + 1 or job.poll() is not None)
    recovered = time.monotonic() - hit
    if job.wait() != 0:
        sys.exit("the killed run failed")
    rows.append(("SIGKILL of rank 1, --max-restarts 1", killed_at_step, checkpoint_step, recovered,
                 time.monotonic() - started, out))

    # Preemption: SIGUSR1 -> checkpoint -> exit 75; then the requeued job's command.
    out = base / "preempt"
    started = time.monotonic()
    job = subprocess.Popen(launch + ["--out", str(out), "--resume", "auto", str(config)], **quiet)
    wait_for(lambda: steps_done(out) >= args.at)
    hit = time.monotonic()
    job.send_signal(signal.SIGUSR1)
    if job.wait() != 75:
        sys.exit("the preempted run did not exit 75")
    stopped = time.monotonic() - hit
    stopped_at = steps_done(out)
    job = subprocess.Popen(launch + ["--out", str(out), "--resume", "auto", str(config)], **quiet)
    wait_for(lambda: steps_done(out) > stopped_at or job.poll() is not None)
    recovered = time.monotonic() - hit
    if job.wait() != 0:
        sys.exit("the resumed run failed")
    rows.append((f"SIGUSR1 (checkpoint + exit in {stopped:.2f} s), then --resume auto", stopped_at, stopped_at,
                 recovered, time.monotonic() - started, out))

    print(f"mgrun recovery, {args.ranks} CPU ranks, {args.steps} steps of small_cnn (3 x 32 images, 32 px), "
          f"checkpoint every 10 steps; uninterrupted: {plain_s:.1f} s ({step_s * 1e3:.0f} ms/step)\n")
    print("| interruption | at step | resumed from step | signal -> next step (s) | steps recomputed | "
          "total (s) | total / uninterrupted | final model |")
    print("|---|---|---|---|---|---|---|---|")
    for name, at, resumed, recovered, total, out in rows:
        model = load_file(str(out / "model.safetensors"))
        same = all((model[k] == reference[k]).all() for k in reference) and model.keys() == reference.keys()
        records = step_records(out)
        assert len(records) == args.steps, f"{out}: {len(records)} step records"
        print(f"| {name} | {at} | {resumed} | {recovered:.2f} | {at - resumed} | {total:.1f} | "
              f"{total / plain_s:.2f} | {'identical' if same else 'DIFFERENT'} |")


if __name__ == "__main__":
    main()
