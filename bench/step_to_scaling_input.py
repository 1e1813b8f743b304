#!/usr/bin/env python3
"""The one-GPU step breakdown that `mgrun bench step --phases --json FILE` measured, as the input of
bench/scaling_model.py (`--input-json`): the ERM row's phases, the DSP-Reg row as the calibration of
per-domain passes, and the SAM row's step time.

    python3 bench/step_to_scaling_input.py STEP_JSON --card "NVIDIA H200" [--precision fp32]
        [--images-per-step 96] [--domains 3] [--source TEXT] > scaling-input.json

scripts/gpu-check.sh runs it after its step benchmark and feeds the result to the scaling model.
"""
import argparse
import json
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step_json")
    parser.add_argument("--card", required=True)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--channels-last", default="true", choices=["true", "false"],
                        help="which rows to read (the GPU benchmark's default layout is channels_last)")
    parser.add_argument("--images-per-step", type=int, default=96, help="images of the benchmark's step (3 x 32)")
    parser.add_argument("--domains", type=int, default=3, help="training domains of the benchmark's step")
    parser.add_argument("--source", default=None)
    args = parser.parse_args()

    with open(args.step_json) as f:
        rows = json.load(f)
    channels_last = args.channels_last == "true"

    def row(method):
        for r in rows:
            if r["method"] == method and r["precision"] == args.precision and r["channels_last"] == channels_last:
                return r
        return None

    erm = row("erm")
    if erm is None or not erm.get("phases_ms"):
        sys.exit(f"{args.step_json}: no ERM {args.precision} row with phases (run bench step with --phases)")
    phases = dict(erm["phases_ms"])
    missing = [p for p in ("forward+loss", "backward", "optimizer") if p not in phases]
    if missing:
        sys.exit(f"{args.step_json}: the ERM row lacks the phases {missing}")
    out = {
        "card": args.card,
        "precision": args.precision,
        "images_per_step": args.images_per_step,
        "forward_ms": phases["forward+loss"],
        "backward_ms": phases["backward"],
        "optimizer_ms": phases["optimizer"],
        "step_ms": erm["ms_per_step"],
        "source": args.source or args.step_json,
    }
    if "eval forward" in phases:
        out["eval_forward_ms_per_image"] = phases["eval forward"] / args.images_per_step
    dsp = row("dsp_reg")
    if dsp is not None:
        # One backward per domain over its images; ~1 ms of element-wise statistics (the H200 file's estimate).
        out["calibration"] = [{
            "images_per_pass": args.images_per_step // args.domains,
            "passes": args.domains,
            "step_ms": dsp["ms_per_step"],
            "extra_ms": 1.0,
            "what": f"dsp_reg, {args.domains} domains",
        }]
    sam = row("sam")
    if sam is not None:
        out["sam_step_ms"] = sam["ms_per_step"]
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
