"""numpy's legacy RandomState draws and DomainBed's seed_hash, as JSON, for nprand's tests.

Usage: numpy_streams.py OUT.json
"""
import hashlib
import json
import struct
import sys

import numpy as np


def seed_hash(*args):
    # DomainBed domainbed/lib/misc.py seed_hash, restated.
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)



def bits(x):
    # JSON decimal floats may not round-trip exactly through every parser: send the IEEE-754 bits.
    return struct.unpack("<Q", struct.pack("<d", float(x)))[0]


SEEDS = [0, 1, 2, 42, 12345, 2**31 - 1, 2**32 - 1] + [seed_hash(t, e) for t in range(3) for e in range(6)]
SHUFFLE_SIZES = [0, 1, 2, 3, 5, 17, 100, 1000, 2048, 4879, 9767]
RANDINT_RANGES = [(0, 1), (0, 2), (0, 3), (-5, 5), (0, 2**31), (0, 2**32), (0, 2**32 + 1), (-(2**40), 2**40 + 7), (10, 2**62)]
TUPLES = [(0, 0), (0, 1), (2, 5), (7,), ("PACS", "ERM", [0], 0, 1), ("VLCS", "SAM", [0, 2], 19, 2), (3, "lr")]

cases = []
for seed in SEEDS:
    rs = np.random.RandomState(seed)
    case = {"seed": seed, "u32": [int(v) for v in rs.randint(0, 2**32, size=8, dtype=np.uint64)]}
    rs = np.random.RandomState(seed)
    case["random_sample"] = [bits(rs.random_sample()) for _ in range(6)]
    case["uniform"] = [bits(rs.uniform(-5, -3.5)) for _ in range(4)]
    case["randint"] = [[lo, hi, [int(rs.randint(lo, hi)) for _ in range(5)]] for lo, hi in RANDINT_RANGES]
    case["choice"] = [int(rs.choice([0.0, 0.1, 0.5, 1.0, 2.0]) * 10) for _ in range(5)]
    case["permutation"] = [int(v) for v in rs.permutation(37)]
    case["after"] = bits(rs.random_sample())
    shuffles = []
    for n in SHUFFLE_SIZES:
        keys = list(range(n))
        np.random.RandomState(seed).shuffle(keys)
        shuffles.append(keys)
    case["shuffle"] = shuffles
    cases.append(case)

hashes = [[list(map(lambda v: v if not isinstance(v, list) else {"list": v}, t)), seed_hash(*t)] for t in TUPLES]
json.dump({"shuffle_sizes": SHUFFLE_SIZES, "cases": cases, "seed_hashes": hashes}, open(sys.argv[1], "w"))
