#!/usr/bin/env python3
"""All-reduce benchmark with torch.distributed's gloo backend, timed the same way as mgrun's
`bench comm` (collectives/src/bench.rs): f32 sum, sizes 1 KiB x4 .. --max-mb, 2 warm-up calls,
iterations = clamp(512 MiB / size, 3, 50), a barrier before the timed loop, mean time per call of the
slowest rank; algbw = bytes / time, busbw = algbw * 2(n-1)/n (nccl-tests).

Usage: gloo_allreduce.py --ranks N [--max-mb M] [--json FILE]
"""

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BYTES_PER_SIZE = 512 << 20
MIN_ITERS, MAX_ITERS, WARMUP = 3, 50, 2


def sizes(max_bytes):
    size, out = 1 << 10, []
    while size <= max_bytes:
        out.append(size)
        size *= 4
    return out


def iterations(nbytes):
    return max(MIN_ITERS, min(MAX_ITERS, BYTES_PER_SIZE // nbytes))


def human(nbytes):
    if nbytes >= 1 << 20 and nbytes % (1 << 20) == 0:
        return f"{nbytes >> 20} MiB"
    if nbytes >= 1 << 10 and nbytes % (1 << 10) == 0:
        return f"{nbytes >> 10} KiB"
    return f"{nbytes} B"


def worker(rank, world, port, max_bytes, json_path):
    # Like torchrun with several workers per node: one intra-op thread per rank.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = []
    for nbytes in sizes(max_bytes):
        tensor = torch.ones(nbytes // 4, dtype=torch.float32)
        for _ in range(WARMUP):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        iters = iterations(nbytes)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        mean = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64)
        dist.all_reduce(mean, op=dist.ReduceOp.MAX)
        seconds = mean.item()
        algbw = nbytes / seconds / 1e9
        rows.append(
            dict(
                bytes=nbytes,
                elements=nbytes // 4,
                iterations=iters,
                time_us=seconds * 1e6,
                algbw_gbps=algbw,
                busbw_gbps=algbw * 2 * (world - 1) / world,
            )
        )
    if rank == 0:
        print(f"all_reduce f32 sum, backend gloo, {world} ranks\n")
        print("| size | elements | iters | time (us) | algbw (GB/s) | busbw (GB/s) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {human(r['bytes'])} | {r['elements']} | {r['iterations']} | {r['time_us']:.1f} "
                f"| {r['algbw_gbps']:.3f} | {r['busbw_gbps']:.3f} |"
            )
        if json_path:
            report = dict(backend="gloo", world_size=world, collective="all_reduce_f32_sum", rows=rows)
            with open(json_path, "w") as f:
                json.dump(report, f, indent=2)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, required=True)
    parser.add_argument("--max-mb", type=float, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    max_bytes = int(args.max_mb * (1 << 20))
    mp.spawn(worker, args=(args.ranks, free_port(), max_bytes, args.json), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
