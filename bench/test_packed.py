"""Packed vs per-cell training, side by side in one run (`make bench` here; `bench/gpu_check.sh` on a GPU).

steps: images/s of N cells' runs stepped one after another (each its own optimizer step, as the per-cell path does)
and stepped together as one pack (packed.py), for full fine-tuning and a mid-depth suffix.
cells: cells/s of N whole cells (LR race, validation with precise BN, early stopping, test) trained one by one
and trained together in packs: everything a cell costs, not only its steps.

The device decides the scale: on CUDA the GPU profile's (64 px, batch 64, bf16 per cell, 1/8/16 copies); on this
CPU a small one (32 px, batch 10, 1/4 copies), to show whether packing pays here (the runner packs on CUDA only).
BENCH_COPIES (e.g. "1,8,16") and BENCH_STEPS override. The ratio packed/alone goes into each packed benchmark's
extra_info (`speedup_vs_alone`); nothing is asserted: the issue's targets are for a GPU.
"""

import os

import pytest
import torch
from conftest import TIMES, record, seconds_of

from transferbench.core.study import Cell
from transferbench.models.features import FeatureCache
from transferbench.training.cell import Prepared, train_together
from transferbench.training.loop import alone
from transferbench.training.packed import Pack, packed

GPU = torch.cuda.is_available()
COPIES = [int(c) for c in os.environ.get("BENCH_COPIES", "1,8,16" if GPU else "1,4").split(",")]
STEPS = int(os.environ.get("BENCH_STEPS", 10 if GPU else 4))
BASE = dict(arm="transfer", model="tf_efficientnet_lite0", weights="imagenet", dataset="textures", shift=None,
            severity=0, n_per_class=32 if GPU else 8, schedule="cosine", lr=1e-3, epochs=1, steps=10_000,
            eval_every=10_000, batch_size=64 if GPU else 10, image_size=64 if GPU else 32, optimizer="adamw",
            weight_decay=0.01, augment=False, device="auto", amp=True, channels_last=True, precise_bn=True,
            keep_best=True)
CELLS = dict(steps=100 if GPU else 12, eval_every=20 if GPU else 4, min_steps=40 if GPU else 4, patience=3,
             lrs=[3e-4, 1e-3, 3e-3], lr=0.0)


@pytest.fixture(scope="module")
def cache():
    return FeatureCache()


def runs(cache, copies: int, depth) -> list:
    """One run per cell (seeds 0..copies-1: each its own k-shot subset, data order and head)."""
    return [Prepared(Cell(**BASE, frozen_depth=depth, seed=s), cache).training.runs[0] for s in range(copies)]


def stepper(cache, mode: str, copies: int, depth):
    """A function that moves `copies` runs STEPS steps further, alone or as one pack (warmed up 2 steps)."""
    rs = runs(cache, copies, depth)
    pack = Pack(rs) if mode == "packed" else None
    state = dict(until=2)
    move = (lambda until: pack.advance(until)) if pack else (lambda until: alone(rs, until))
    move(2)

    def step():
        state["until"] += STEPS
        move(state["until"])
        if GPU:
            torch.cuda.synchronize()
    return step


@pytest.mark.parametrize("depth", [0, 6])
@pytest.mark.parametrize("copies", COPIES)
@pytest.mark.parametrize("mode", ["alone", "packed"])
def test_steps(benchmark, cache, mode, copies, depth):
    benchmark.pedantic(stepper(cache, mode, copies, depth), rounds=3, warmup_rounds=1)
    name = f"steps_{mode}_{copies}_{depth}"
    record(benchmark, name, copies * STEPS * BASE["batch_size"])
    if mode == "packed":
        other = seconds_of(f"steps_alone_{copies}_{depth}", stepper(cache, "alone", copies, depth), rounds=3, warmup=1)
        benchmark.extra_info["speedup_vs_alone"] = round(other / TIMES[name], 2)


def cells(cache, copies: int) -> list:
    """`copies` whole cells of one network shape: seeds x two schedules, each racing three LRs."""
    specs = [dict(seed=s // 2, schedule=("cosine", "constant")[s % 2]) for s in range(copies)]
    return [Prepared(Cell(**(BASE | CELLS | spec), frozen_depth=0), cache) for spec in specs]


def train_cells(cache, mode: str, copies: int):
    def run(prepared):
        train_together([p.training for p in prepared], packed(16) if mode == "packed" else alone)
        return [p.measure() for p in prepared]
    return run, lambda: ((cells(cache, copies),), {})


@pytest.mark.parametrize("mode", ["alone", "packed"])
def test_cells(benchmark, cache, mode):
    copies = max(COPIES)
    run, setup = train_cells(cache, mode, copies)
    records = benchmark.pedantic(run, setup=setup, rounds=1)
    name = f"cells_{mode}"
    record(benchmark, name, sum(r["images_seen"] for r in records))
    benchmark.extra_info["cells_per_second"] = round(copies / TIMES[name], 3)
    if mode == "packed":
        run_alone, setup_alone = train_cells(cache, "alone", copies)
        other = seconds_of("cells_alone", lambda: run_alone(*setup_alone()[0]), rounds=1, warmup=0)
        benchmark.extra_info["speedup_vs_alone"] = round(other / TIMES[name], 2)
