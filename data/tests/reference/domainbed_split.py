"""DomainBed's in/out splits, restated from its source (commit 7df6f06) with torchvision's real ImageFolder.

  domainbed_split.py tree ROOT TRIAL_SEED,... HOLDOUT OUT.json
      {"<trial_seed>": {"<env>": {"in": [...], "out": [...]}}} for every environment of ROOT, paths relative to ROOT, as
      DomainBed's train.py builds them: environments = sorted directories (MultipleEnvironmentImageFolder),
      ImageFolder per environment, out, in_ = split_dataset(env, int(len(env)*holdout), seed_hash(trial_seed, i)).
  domainbed_split.py sizes OUT.json N1,N2,... TRIALS ENVS HOLDOUT
      {"<n>/<trial>/<env>": {"in": [...], "out": [...]}}: split_dataset of n items with seed_hash(trial, env)
      for every trial in range(TRIALS) and env in range(ENVS)
"""
import hashlib
import json
import os
import sys

import numpy as np


def seed_hash(*args):
    # domainbed/lib/misc.py
    args_str = str(args)
    return int(hashlib.md5(args_str.encode("utf-8")).hexdigest(), 16) % (2**31)


def split_dataset(keys_len, n, seed=0):
    # domainbed/lib/misc.py split_dataset, on indices: (first n keys, the rest).
    assert n <= keys_len
    keys = list(range(keys_len))
    np.random.RandomState(seed).shuffle(keys)
    return keys[:n], keys[n:]


def tree(root, trial_seeds, holdout, out):
    from torchvision.datasets import ImageFolder

    environments = sorted(f.name for f in os.scandir(root) if f.is_dir())
    result = {}
    for trial_seed in trial_seeds:
        splits = result.setdefault(str(trial_seed), {})
        for env_i, environment in enumerate(environments):
            env = ImageFolder(os.path.join(root, environment))
            out_keys, in_keys = split_dataset(len(env), int(len(env) * holdout), seed_hash(trial_seed, env_i))
            rel = lambda k: os.path.relpath(env.samples[k][0], root).replace(os.sep, "/")
            splits[environment] = {"in": [rel(k) for k in in_keys], "out": [rel(k) for k in out_keys]}
    json.dump(result, open(out, "w"))


def sizes(out, ns, trials, envs, holdout):
    result = {}
    for n in ns:
        for trial in range(trials):
            for env_i in range(envs):
                out_keys, in_keys = split_dataset(n, int(n * holdout), seed_hash(trial, env_i))
                result[f"{n}/{trial}/{env_i}"] = {"in": in_keys, "out": out_keys}
    json.dump(result, open(out, "w"))


if __name__ == "__main__":
    if sys.argv[1] == "tree":
        tree(sys.argv[2], [int(v) for v in sys.argv[3].split(",")], float(sys.argv[4]), sys.argv[5])
    else:
        sizes(sys.argv[2], [int(v) for v in sys.argv[3].split(",")], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
