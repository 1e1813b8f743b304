"""torchvision's data pipeline as DomainBed runs it, for comparison with `mgrun bench data`: ImageFolder (PIL
decode, convert("RGB")) + DataLoader with N worker processes + DomainBed's training transform
(RandomResizedCrop(S, scale=(0.7, 1.0)), RandomHorizontalFlip, ColorJitter(0.3, 0.3, 0.3, 0.3),
RandomGrayscale, ToTensor, Normalize). Images are drawn with replacement like DomainBed's InfiniteDataLoader.

Usage: torchvision_data.py --root DIR [--workers N] [--images N] [--batch B] [--size S] [--json FILE]
ImageFolder is pointed at every <domain> directory under DIR (the DomainBed layout) and the domains are
concatenated. Prints images/s in total and per worker process after one untimed batch per worker."""
import argparse
import json
import os
import time

import torch
from torch.utils.data import ConcatDataset, DataLoader, RandomSampler
from torchvision import datasets, transforms


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--json")
    a = p.parse_args()
    transform = transforms.Compose([
        transforms.RandomResizedCrop(a.size, scale=(0.7, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(0.3, 0.3, 0.3, 0.3),
        transforms.RandomGrayscale(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    domains = sorted(d for d in os.listdir(a.root) if os.path.isdir(os.path.join(a.root, d)))
    dataset = ConcatDataset([datasets.ImageFolder(os.path.join(a.root, d), transform=transform) for d in domains])
    warmup = max(a.workers, 1)
    steps = -(-a.images // a.batch)
    sampler = RandomSampler(dataset, replacement=True, num_samples=(steps + warmup) * a.batch)
    loader = DataLoader(dataset, batch_size=a.batch, sampler=sampler, num_workers=a.workers,
                        persistent_workers=False, prefetch_factor=2 if a.workers > 0 else None)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(steps):
        x, _ = next(it)
        n += x.shape[0]
    seconds = time.perf_counter() - start
    workers = max(a.workers, 1)
    result = {"workers": workers, "images": n, "seconds": seconds, "images_per_s": n / seconds,
              "images_per_s_per_worker": n / seconds / workers, "image_size": a.size,
              "torch": torch.__version__}
    print(f"torchvision: {n} images in {seconds:.2f} s with {workers} worker process(es): "
          f"{n / seconds:.1f} img/s total, {n / seconds / workers:.1f} img/s per worker")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
