"""Reference values for mgrun-sweep's hyperparameter registry, drawn with numpy's RandomState the way
DomainBed does (published 7df6f06: one shared stream seeded with seed_hash(hparams_seed, trial_seed),
draws in definition order; current: one stream per hyperparameter seeded with seed_hash(random_seed,
name)). Distributions: DomainBed's image-dataset entries and its GroupDRO, CORAL, VREx and Fishr
entries, plus mgrun's sam/dsp_reg entries.

Usage: python hparams_reference.py OUT.json
Floats are written as {"bits": <IEEE-754 bits as an integer>} so that no JSON parser rounds them.
"""
import hashlib
import json
import struct
import sys

import numpy as np


def seed_hash(*args):
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def definitions(algorithm, dataset):
    """(name, sampler) in definition order."""
    batch_max = 5.0 if dataset == "domain_net" else 5.5
    if dataset in ("rotated_digits", "colored_digits"):
        # DomainBed's SMALL_IMAGES branch (RotatedMNIST, ColoredMNIST); weight decay draws nothing.
        defs = [
            ("resnet_dropout", lambda r: float(r.choice([0.0, 0.1, 0.5]))),
            ("lr", lambda r: float(10 ** r.uniform(-4.5, -2.5))),
            ("batch_size", lambda r: int(2 ** r.uniform(3, 9))),
            ("weight_decay", lambda r: 0.0),
        ]
    else:
        defs = [
            ("resnet_dropout", lambda r: float(r.choice([0.0, 0.1, 0.5]))),
            ("lr", lambda r: float(10 ** r.uniform(-5, -3.5))),
            ("batch_size", lambda r: int(2 ** r.uniform(3, batch_max))),
            ("weight_decay", lambda r: float(10 ** r.uniform(-6, -2))),
        ]
    if algorithm == "sam":
        defs.append(("sam_rho", lambda r: float(10 ** r.uniform(-2, -0.5))))
    elif algorithm == "dsp_reg":
        defs.append(("dsp_lambda", lambda r: float(10 ** r.uniform(-3, 0))))
        defs.append(("dsp_beta", lambda r: float(r.choice([0.9, 0.95, 0.99]))))
    elif algorithm == "disam":
        defs.append(("sam_rho", lambda r: float(10 ** r.uniform(-2, -0.5))))
        defs.append(("disam_lambda", lambda r: float(10 ** r.uniform(-2, 0))))
    # DomainBed's own entries (hparams_registry.py, HEAD), copied as written there.
    elif algorithm == "group_dro":
        defs.append(("groupdro_eta", lambda r: float(10 ** r.uniform(-3, -1))))
    elif algorithm == "coral":
        defs.append(("mmd_gamma", lambda r: float(10 ** r.uniform(-1, 1))))
    elif algorithm == "mixup":
        defs.append(("mixup_alpha", lambda r: float(10 ** r.uniform(-1, 1))))
    elif algorithm == "vrex":
        defs.append(("vrex_lambda", lambda r: float(10 ** r.uniform(-1, 5))))
        defs.append(("vrex_penalty_anneal_iters", lambda r: int(10 ** r.uniform(0, 4))))
    elif algorithm == "fishr":
        defs.append(("lambda", lambda r: float(10 ** r.uniform(1., 4.))))
        defs.append(("penalty_anneal_iters", lambda r: int(r.uniform(0., 5000.))))
        defs.append(("ema", lambda r: float(r.uniform(0.90, 0.99))))
    return defs


# tram, udim and the regularizers (ocnn, elr, ps_kd, advstyle, weight_compander) search nothing of
# their own: only the shared entries.
ALGORITHMS = [
    "erm", "sam", "dsp_reg", "group_dro", "coral", "vrex", "fishr", "disam", "tram", "udim",
    "ocnn", "elr", "ps_kd", "advstyle", "mixup", "weight_compander",
]


def draw(version, algorithm, dataset, hparams_seed, trial_seed):
    random_seed = seed_hash(hparams_seed, trial_seed)
    shared = np.random.RandomState(random_seed)
    out = {}
    for name, sampler in definitions(algorithm, dataset):
        if version == "published":
            out[name] = sampler(shared)
        else:
            out[name] = sampler(np.random.RandomState(seed_hash(random_seed, name)))
    return {k: ({"bits": struct.unpack("<Q", struct.pack("<d", v))[0]} if isinstance(v, float) else v)
            for k, v in out.items()}


def main():
    cases = []
    for version in ["published", "current"]:
        for algorithm in ALGORITHMS:
            for dataset in ["pacs", "domain_net", "rotated_digits"]:
                for trial_seed in range(3):
                    for hparams_seed in range(1, 21):
                        cases.append({
                            "version": version, "algorithm": algorithm, "dataset": dataset,
                            "hparams_seed": hparams_seed, "trial_seed": trial_seed,
                            "hparams": draw(version, algorithm, dataset, hparams_seed, trial_seed),
                        })
    with open(sys.argv[1], "w") as f:
        json.dump(cases, f)


if __name__ == "__main__":
    main()
