"""Speed of the harness, side by side with the naive way, in one run (`make bench`).

Ratios go into each benchmark's extra_info and are asserted where the speed issue sets a target:
harness step <= 1.10x a bare PyTorch step; a cached linear-probe cell >= 10x faster than the
naive one that forwards every image through the frozen network in every epoch. The small-map
convolution fast paths and the mid-depth cache are reported, not gated.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TIMES, record, seconds_of

from transferbench.core.study import Cell
from transferbench.data import load_target
from transferbench.models.backbones import create_backbone, split_at_depth
from transferbench.models.device import forward_batched
from transferbench.models.fastconv import use_plain_convs
from transferbench.models.features import FeatureCache
from transferbench.training.cell import train_cell
from transferbench.training.loop import Step
from transferbench.training.schedules import SCHEDULES, make_optimizer

BATCH = 32
CELL = dict(arm="transfer", model="tf_efficientnet_lite0", weights="imagenet", dataset="textures", shift=None,
            severity=0, n_per_class=10, schedule="cosine", lr=1e-3, seed=0, epochs=20, batch_size=BATCH,
            image_size=32, optimizer="adamw", weight_decay=0.01, augment=False, device="cpu", amp=False,
            channels_last=True)


def _model_and_batch():
    bb = create_backbone("tf_efficientnet_lite0", "imagenet", 10, 0)
    model = bb.model.to(memory_format=torch.channels_last).train()
    x = torch.rand(BATCH, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    return model, x, torch.randint(0, 10, (BATCH,))


def _step(loop: str):
    """One training step of lite0 at 32 px: a bare PyTorch step, the harness's Step, or the harness's Step with
    timm's plain convolutions instead of the exact small-map fast paths."""
    model, x, y = _model_and_batch()
    if loop == "plain":
        use_plain_convs(model)
    opt = make_optimizer(model.named_parameters(), "adamw", 1e-3, 0.01)
    if loop == "bare":
        def step():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    step_fn = Step(model, opt, SCHEDULES.get("cosine")(opt, 10_000), torch.device("cpu"), amp=False,
                   channels_last=True)
    return lambda: step_fn(x, y)


@pytest.mark.parametrize("loop", ["bare", "harness"])
def test_train_step(benchmark, loop):
    benchmark.pedantic(_step(loop), rounds=15, warmup_rounds=3)
    record(benchmark, f"step_{loop}", BATCH)
    if loop == "harness":
        ratio = TIMES["step_harness"] / seconds_of("step_bare", _step("bare"))
        benchmark.extra_info["ratio_vs_bare"] = round(ratio, 3)
        assert ratio <= 1.10


@pytest.mark.parametrize("convs", ["plain", "fast"])
def test_small_map_convs(benchmark, convs):
    """A full fine-tuning step at 32 px, with timm's convolutions vs the exact small-map fast paths
    (transferbench.models.fastconv): the last stages run 5x5 depthwise convolutions on 1x1 and 2x2 maps."""
    benchmark.pedantic(_step("plain" if convs == "plain" else "harness"), rounds=15, warmup_rounds=3)
    record(benchmark, f"convs_{convs}", BATCH)
    if convs == "fast":
        plain = seconds_of("convs_plain", _step("plain"))
        benchmark.extra_info["speedup_vs_plain"] = round(plain / TIMES["convs_fast"], 2)


@pytest.mark.parametrize("depth", ["all", 5])
@pytest.mark.parametrize("mode", ["naive", "cached"])
def test_frozen_cell(benchmark, depth, mode):
    """20 epochs of one cell. naive: the frozen layers run on every batch of every epoch."""
    cell = Cell(**(CELL | dict(frozen_depth=depth)))
    cache = FeatureCache()
    train_cell(cell, cache, use_prefix_cache=mode == "cached")  # warm: data built, features cached
    result = benchmark.pedantic(lambda: train_cell(cell, cache, use_prefix_cache=mode == "cached"), rounds=3)
    record(benchmark, f"cell_{depth}_{mode}", result["images_seen"])
    if mode == "cached":
        naive = seconds_of(f"cell_{depth}_naive", lambda: train_cell(cell, cache, use_prefix_cache=False), rounds=3,
                           warmup=1)
        speedup = naive / TIMES[f"cell_{depth}_cached"]
        benchmark.extra_info["speedup_vs_naive"] = round(speedup, 2)
        if depth == "all":
            assert speedup >= 10


def test_feature_extraction(benchmark):
    bb = create_backbone("tf_efficientnet_lite0", "imagenet", 10, 0)
    prefix, _, _ = split_at_depth(bb, bb.n_groups)
    x = load_target("glyphs", None, 0, 32).x["train"]
    benchmark.pedantic(lambda: forward_batched(prefix, x, torch.device("cpu"), channels_last=True), rounds=3)
    record(benchmark, "extract", len(x))


def test_smoke_study_end_to_end(benchmark, tmp_path):
    from transferbench.cli import main

    study = Path(__file__).parents[1] / "studies" / "smoke.yaml"
    benchmark.pedantic(lambda: main(["study", str(study), "--results", str(tmp_path), "--no-progress"]), rounds=1,
                       setup=lambda: __import__("shutil").rmtree(tmp_path / "smoke", ignore_errors=True))
    record(benchmark, "smoke", 96)
