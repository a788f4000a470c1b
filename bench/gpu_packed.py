"""Packed vs per-cell training on one GPU, side by side in one run: images/s of N cells' runs stepped one after
another (each its own optimizer step, as the per-cell path does) and stepped together as one pack (packed.py),
for full fine-tuning and for a mid-depth suffix, at the GPU profile's size (64 px, batch 64, bf16).

    python3 bench/gpu_packed.py [copies ...]      # default: 1 4 8 16 32
"""

import os
import sys
import time

import torch

sys.path.insert(0, "src")
from transferbench.features import FeatureCache  # noqa: E402
from transferbench.packed import Pack  # noqa: E402
from transferbench.study import Cell  # noqa: E402
from transferbench.train import Prepared  # noqa: E402

STEPS, WARMUP = int(os.environ.get("BENCH_STEPS", 20)), 3
BASE = dict(arm="transfer", model="tf_efficientnet_lite0", weights="imagenet", dataset="textures", shift=None,
            severity=0, n_per_class=32, schedule="cosine", lr=1e-3, epochs=1, steps=10_000, eval_every=10_000,
            batch_size=64, image_size=64, optimizer="adamw", weight_decay=0.01, augment=False, device="auto",
            amp=True, channels_last=True, precise_bn=True, keep_best=True)


def runs(copies: int, depth, cache: FeatureCache) -> list:
    """One run per cell (seeds 0.. copies-1: each its own k-shot subset, data order and head)."""
    return [Prepared(Cell(**BASE, frozen_depth=depth, seed=s), cache).training.runs[0] for s in range(copies)]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main(copies=(1, 4, 8, 16, 32)):
    cache = FeatureCache()
    batch = BASE["batch_size"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}: lite0, {BASE['image_size']} px, batch {batch}, bf16, AdamW; "
          f"{STEPS} timed steps per run after {WARMUP} warm-up")
    for depth in (0, 6):
        for n in copies:
            alone = runs(n, depth, cache)
            for r in alone:
                r.advance(WARMUP)
            t_alone = timed(lambda alone=alone: [r.advance(WARMUP + STEPS) for r in alone])
            pack = Pack(runs(n, depth, cache))
            pack.advance(WARMUP)
            t_pack = timed(lambda pack=pack: pack.advance(WARMUP + STEPS))
            images = n * STEPS * batch
            print(f"frozen_depth {depth}, {n:2d} cells: per-cell {images / t_alone:8.0f} img/s, packed "
                  f"{images / t_pack:8.0f} img/s, ratio {t_alone / t_pack:5.2f}x" + (
                      f"; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
                      if torch.cuda.is_available() else ""), flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main(tuple(int(a) for a in sys.argv[1:]) or (1, 4, 8, 16, 32))
