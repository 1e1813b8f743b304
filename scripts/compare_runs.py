"""Compares training runs' per-step losses (steps.jsonl) and final weights (model.safetensors)
against a reference run, for the GPU checks.

Usage: compare_runs.py OUT_MD TOLERANCE LABEL=REFERENCE_DIR:RUN_DIR[:FIRST_STEP] ...

For each pair: the largest relative loss difference over the steps both cover from FIRST_STEP on (the
run must cover every step of the reference from there), whether losses and weights are bit-identical.
Writes a markdown table to OUT_MD, prints it, and exits 1 when a difference exceeds TOLERANCE or a run
is missing.
"""
import json
import os
import sys


def losses(run):
    path = os.path.join(run, "steps.jsonl")
    if not os.path.exists(path):
        return None
    return {r["step"]: r["loss"] for r in map(json.loads, open(path))}


def weights(run):
    """Every tensor's raw bytes, by name (the safetensors layout: u64 header size, JSON header, data),
    so that no package beyond the standard library is needed on the GPU machine."""
    path = os.path.join(run, "model.safetensors")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        blob = f.read()
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    data = blob[8 + size:]
    return {name: data[t["data_offsets"][0]:t["data_offsets"][1]]
            for name, t in header.items() if name != "__metadata__"}


def main():
    out_md, tolerance, pairs = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    rows, ok = [], True
    for pair in pairs:
        label, spec = pair.split("=", 1)
        parts = spec.split(":")
        reference, run = parts[0], parts[1]
        first = int(parts[2]) if len(parts) > 2 else 0
        ref, got = losses(reference), losses(run)
        if not ref or got is None:
            rows.append(f"| {label} | missing | missing | no |")
            ok = False
            continue
        steps = [s for s in sorted(ref) if s >= first]
        if any(s not in got for s in steps):
            rows.append(f"| {label} | steps missing | - | no |")
            ok = False
            continue
        worst = max(abs(got[s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in steps)
        same_losses = all(got[s] == ref[s] for s in steps)
        wr, wg = weights(reference), weights(run)
        same_weights = wr is not None and wg is not None and wr.keys() == wg.keys() and all(
            wr[k] == wg[k] for k in wr)
        ok &= worst <= tolerance
        rows.append(f"| {label} | {len(steps)} | {worst:.2e} | {'yes' if same_losses and same_weights else 'no'} |")
    table = ("| run vs reference | steps compared | max relative loss difference | bit-identical losses and weights |\n"
             "|---|---|---|---|\n" + "\n".join(rows) + "\n")
    with open(out_md, "w") as f:
        f.write(table)
    print(table)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
