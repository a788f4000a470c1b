"""Packed training (packed.py) equals separate training, in float64 on the CPU: per-copy outputs and gradients,
optimizer steps (AdamW and Nesterov SGD, layer-wise LRs included), and whole cells (LR race, early stopping,
precise BN, best weights, curves) trained in one pack against each trained alone; and to bf16 precision under bf16
autocast. TRANSFERBENCH_TEST_DEVICE=cuda runs the cells of these checks on a GPU (bench/gpu_check.sh does)."""

import copy
import os
from contextlib import nullcontext

import pytest
import torch

from transferbench.core.study import Cell
from transferbench.models.device import as_layout
from transferbench.models.features import FeatureCache
from transferbench.training import cell as training_cell
from transferbench.training import loop
from transferbench.training import packed as packed_module
from transferbench.training.packed import Pack, pack_sizes, packed

DEVICE = os.environ.get("TRANSFERBENCH_TEST_DEVICE", "cpu")
BASE = dict(arm="transfer", model="tf_efficientnet_lite0", weights="imagenet", dataset="textures", shift=None,
            severity=0, frozen_depth=6, n_per_class=2, schedule="cosine", lr=3e-3, seed=0, epochs=1, steps=9,
            eval_every=3, patience=2, min_steps=3, batch_size=8, image_size=32, optimizer="adamw",
            weight_decay=0.01, augment=False, device=DEVICE, amp=False, channels_last=False, precise_bn=True,
            keep_best=True)


def float64(prepared: training_cell.Prepared) -> training_cell.CellTraining:
    """The prepared cell's training rebuilt in float64 (both sides of a comparison start from the same copy)."""
    suffix = copy.deepcopy(prepared.suffix).double()
    feats = {s: v.double() for s, v in prepared.feats.items()}
    return training_cell.CellTraining(prepared.cell, suffix, feats, prepared.ys, prepared.idx, prepared.device,
                                      prepared.num_classes, prepared.lr, prepared.layer_lrs)


# Losses (curves, test loss) of a pack and of the same cells alone, all in float64 (the networks, and since validation
# scores its logits in their own precision, the losses too): they differ only by float64 rounding that training grows
# (AdamW's steps turn rounding-noise gradients into weight differences of up to 5e-6 of a tensor's scale after nine
# steps; see the weights' check below). Measured over three kernel paths (the default, ONEDNN_MAX_CPU_ISA=AVX2,
# ATEN_CPU_CAPABILITY=default): losses apart by at most 9e-8 relative, weights by 5e-6. 1e-6 keeps 10x headroom and
# is still 100x tighter than float32's rounding of a loss would need (it once passed at 1e-7 on one CPU only because
# both sides rounded their logits to the same float32 values, which another CPU's kernels did not).
LOSS_RTOL = 1e-6


def close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    """Equal up to rtol of the tensor's largest magnitude (an elementwise tolerance fails on weights near 0)."""
    a, b = a.double(), b.double()
    return bool((a - b).abs().max() <= rtol * a.abs().max() + 1e-15)


@pytest.fixture(scope="module")
def cache():
    return FeatureCache()


def prepare(cache, **kw) -> training_cell.Prepared:
    return training_cell.Prepared(Cell(**(BASE | kw)), cache)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_pack_trains_each_cell_as_it_trains_alone(optimizer, cache, torch_single_thread):
    """Four cells with their own seeds (data order), LRs (one races two), schedules (one with layer-wise decay)
    and stopping, trained in one pack: the same curves, choices and weights as each trained alone."""
    cells = [dict(seed=0, lr=0.0, lrs=[1e-3, 3e-3]), dict(seed=1, lr=3e-3), dict(seed=2, lr=1e-3,
                                                                                  schedule="cosine_llrd"),
             dict(seed=3, lr=1e-2, schedule="constant", patience=1)]
    prepared = [prepare(cache, optimizer=optimizer, **c) for c in cells]
    alone = [float64(p) for p in prepared]
    together = [float64(p) for p in prepared]
    training_cell.train_together(alone)
    training_cell.train_together(together, packed(most=8))
    for a, b in zip(alone, together):
        ra, rb = a.result(), b.result()
        assert ra["lr_chosen"] == rb["lr_chosen"] and ra["steps_taken"] == rb["steps_taken"]
        assert ra["best_step"] == rb["best_step"] and ra["early_stopped"] == rb["early_stopped"]
        assert ra["test_acc"] == rb["test_acc"] and ra["test_loss"] == pytest.approx(rb["test_loss"], rel=LOSS_RTOL)
        for pa, pb in zip(ra["curves"], rb["curves"]):
            assert (pa["step"], pa["split"], pa["metric"]) == (pb["step"], pb["split"], pb["metric"])
            assert pa["value"] == pytest.approx(pb["value"], rel=LOSS_RTOL, abs=1e-12)
        sa, sb = a.suffix.state_dict(), b.suffix.state_dict()
        # Rounding differs (vmap sums in another order; the pack's BatchNorm is plain tensor arithmetic), and
        # training grows it: AdamW's first step moves a weight by about lr * g / (|g| + eps), so a gradient that is
        # rounding noise (|g| ~ 1e-17) already differs by 1e-9 relative after one step; after nine, AdamW's weights
        # agree to 4e-6 at LR 1e-2 (1e-7 at 3e-3) and SGD's to 1e-8 of each tensor's scale (measured), while every
        # curve, LR choice, stopping step and test accuracy is the same.
        for name in sa:
            assert close(sa[name], sb[name], 1e-5), name


@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_outputs_and_gradients_equal_each_copy_alone(channels_last, cache, torch_single_thread):
    p = prepare(cache)
    runs = []
    for seed in range(3):
        t = float64(prepare(cache, seed=seed, channels_last=channels_last))
        runs.append(t.runs[0])
    pack = Pack(runs)
    x = torch.stack([r.examples("train")[0][:6] for r in runs])
    y = torch.stack([r.examples("train")[1][:6] for r in runs])
    for r in runs:
        r.suffix.train()
    pack.template.train()
    logits = pack.forward(x)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(3, 6).mean(1)
    loss.sum().backward()
    views = {n: g for n, g in zip(pack.names, pack.grad().split(pack.sizes, 1))}
    for i, r in enumerate(runs):
        out = r.suffix(x[i])
        assert torch.allclose(logits[i], out, rtol=1e-10, atol=1e-12)
        torch.nn.functional.cross_entropy(out, y[i]).backward()
        for n, param in r.suffix.named_parameters():
            if param.requires_grad:
                assert torch.allclose(views[n][i].view(param.shape), param.grad, rtol=1e-9, atol=1e-12), n
    assert p.suffix is not None


def test_a_pack_under_bf16_autocast_equals_each_copy_alone_to_bf16_precision(cache, torch_single_thread,
                                                                              monkeypatch):
    """What a GPU runs with train.amp (bf16 autocast, channels_last), on the CPU's own bf16 autocast (the harness
    autocasts on CUDA only): the pack's logits and gradients are each copy's own, to bf16 rounding."""
    def bf16(device, amp):
        return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()

    monkeypatch.setattr(packed_module, "autocast", bf16)
    runs = [training_cell.CellTraining(p.cell, copy.deepcopy(p.suffix), p.feats, p.ys, p.idx, p.device,
                                       p.num_classes, p.lr, p.layer_lrs).runs[0]
            for p in (prepare(cache, seed=seed, amp=True, channels_last=True) for seed in range(3))]
    pack = Pack(runs)
    x = torch.stack([r.examples("train")[0][:6] for r in runs])
    y = torch.stack([r.examples("train")[1][:6] for r in runs])
    pack.template.train()
    logits = pack.forward(x)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(3, 6).mean(1) \
        .sum().backward()
    views = {n: g for n, g in zip(pack.names, pack.grad().split(pack.sizes, 1))}
    for i, r in enumerate(runs):
        module = r.suffix.train().to(memory_format=torch.channels_last)
        exact, exact_grads = forward_backward(module, x[i], y[i], nullcontext())  # float32
        out, grads = forward_backward(module, x[i], y[i], bf16(x.device, True))
        assert out.dtype == torch.bfloat16 and not close(logits[i], exact, 1e-4)  # the pack ran in bf16
        # The pack's logits are as far from float32 as the copy's own bf16 logits (bf16 kernels round differently
        # per CPU: pack and copy once differed by 2.3% of the largest logit under ONEDNN_MAX_CPU_ISA=AVX2)
        assert (logits[i].double() - exact.double()).norm() <= 2 * (out.double() - exact.double()).norm()
        for n, g in grads.items():  # as far from float32 as the copy alone is, whatever the tensor's scale
            error, alone_error = (views[n][i].view(g.shape) - exact_grads[n]).norm(), (g - exact_grads[n]).norm()
            assert error <= 2 * alone_error + 1e-3 * exact_grads[n].norm(), n


def forward_backward(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, context) -> tuple[torch.Tensor, dict]:
    """module's logits on x in this context and the gradients of the cross-entropy, by parameter name."""
    module.zero_grad()
    with context:
        out = module(as_layout(x, True))
    torch.nn.functional.cross_entropy(out.float(), y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_run_moves_between_packs_and_alone_without_losing_its_optimizer_state(optimizer, channels_last, cache,
                                                                                 torch_single_thread):
    """Race in a pack, go on alone: the same as one run throughout. The whole network trains (its stem is a 3x3
    convolution, whose channels_last weights are laid out unlike a contiguous tensor: the state handed back must be
    laid out as its weight, or the fused optimizer pairs the wrong elements)."""
    prepared = prepare(cache, seed=4, lr=3e-3, frozen_depth=0, optimizer=optimizer, channels_last=channels_last)
    straight, moved = float64(prepared).runs[0], float64(prepared).runs[0]
    straight.advance(9)
    Pack([moved]).advance(4)
    moved.advance(9)
    for (n, a), b in zip(straight.suffix.state_dict().items(), moved.suffix.state_dict().values()):
        # Rounding grown by training (see above): the whole network under SGD moves its BatchNorm variances by up
        # to 4e-6 of their scale this way; the same run alone in NCHW and in channels_last (another summation order)
        # differs by 2.6e-5 (measured). Without the layout fix the handed-back state was off by 0.1-0.45.
        assert close(a, b, 1e-5), n


def test_pack_sizes_are_even_and_bounded():
    assert pack_sizes(10, 4) == [4, 3, 3] and pack_sizes(3, 8) == [3] and pack_sizes(0, 8) == []
    assert all(sum(pack_sizes(n, m)) == n and max(pack_sizes(n, m)) <= m for n in range(1, 40) for m in (1, 5, 16))


def test_the_runner_writes_the_same_records_packed_or_not(tmp_path, torch_single_thread):
    """A small study run cell by cell and packed (run.pack: always, to exercise on CPU what CUDA does by default):
    the same cells, columns and statuses (and a `packed` flag); the numbers agree up to float32 rounding grown by
    training."""
    import pandas as pd

    from transferbench.core.study import expand, load_study, study_path
    from transferbench.sweep.runner import run_cells
    from transferbench.sweep.store import read_records, runs_table

    tables = {}
    for mode in ("never", "always"):
        study = load_study(study_path("smoke"), [
            "backbones=[{model: tf_efficientnet_lite0}]", "targets=[{dataset: textures}, {dataset: digits}]",
            "scratch.enabled=false",
            "grid.frozen_depth=[6, all]", "grid.n_per_class=[2]", "grid.schedule=[cosine, constant]",
            "grid.seed=[0,1]", "train.steps=6", "train.eval_every=3", "train.min_steps=3",
            "train.lrs=[0.001,0.003]", "train.lr_search=first_seed", "scratch.lr=0.01", f"run.pack={mode}",
            "run.pack_size=2"], None)  # packs of two: tasks of two cells, several packs per phase
        out = tmp_path / mode
        run_cells(study, expand(study), out, jobs=1, backend="sequential", progress=False)
        tables[mode] = runs_table(list(read_records(out).values())).set_index("cell_id").sort_index()
    alone, together = tables["never"], tables["always"]
    assert list(alone.index) == list(together.index) and list(alone.columns) == list(together.columns)
    assert (alone["status"] == "ok").all() and (together["status"] == "ok").all()
    assert not alone["packed"].any() and together["packed"].all()  # each record says how it trained
    assert (alone["jobs"] == 1).all() and (together["jobs"] == 1).all()  # and how many workers ran (sequential)
    nets = alone["arm"] != "pixels"
    assert pd.Series(alone.loc[nets, "lr_source"].fillna("") == together.loc[nets, "lr_source"].fillna("")).all()
    assert (alone.loc[nets, "test_acc"] - together.loc[nets, "test_acc"]).abs().max() <= 0.1


def test_only_layers_that_keep_copies_apart_are_stacked(cache, torch_single_thread):
    """A layer that could mix the copies' channels (or draw dropout masks of its own) keeps its run out of packs:
    it trains alone, with the same result."""
    from torch import nn

    from transferbench.training.packed import signature, stacked, unstackable

    assert unstackable(prepare(cache).suffix) is None and unstackable(prepare(cache, frozen_depth=0).suffix) is None
    mixing = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
    assert "GroupNorm" in unstackable(mixing)
    with pytest.raises(ValueError, match="GroupNorm"):
        stacked(mixing, 2)
    odd = float64(prepare(cache, seed=5))
    odd.suffix.add_module("drop", nn.Dropout(0.0))  # a module no forward calls, but not one a pack knows
    run = odd.runs[0]
    assert signature(run) is None
    reference = float64(prepare(cache, seed=5))
    reference.suffix.add_module("drop", nn.Dropout(0.0))
    training_cell.train_together([odd], packed(most=4))
    training_cell.train_together([reference])
    assert odd.result()["curves"] == reference.result()["curves"]


def test_a_pack_sheds_its_stopped_copies(cache, torch_single_thread, monkeypatch):
    """Runs with budgets of 3, 6 and 9 steps: a pack of three, then of two, then the last run alone, each the same
    as trained alone."""
    from transferbench.training import packed as packed_module

    sizes = []
    init = packed_module.Pack.__init__
    monkeypatch.setattr(packed_module.Pack, "__init__", lambda self, runs: sizes.append(len(runs)) or init(self, runs))
    specs = [dict(seed=s, lr=3e-3, steps=n, patience=0) for s, n in ((0, 3), (1, 6), (2, 9))]
    prepared = [prepare(cache, **c) for c in specs]
    alone, together = [float64(p) for p in prepared], [float64(p) for p in prepared]
    training_cell.train_together(alone)
    training_cell.train_together(together, packed(most=8))
    assert sizes == [3, 2]
    for a, b in zip(alone, together):
        ra, rb = a.result(), b.result()
        assert ra["steps_taken"] == rb["steps_taken"] and ra["test_acc"] == rb["test_acc"]
        for pa, pb in zip(ra["curves"], rb["curves"]):
            assert pa["value"] == pytest.approx(pb["value"], rel=LOSS_RTOL, abs=1e-12)


def test_tasks_hold_one_network_shape():
    """The runner's tasks: textures and digits (10 classes each) share a shape, glyphs (20 classes) does not, not
    even at half the examples per class (the same number of examples, another head); layer-wise LR decay (an LR
    group per depth) packs apart; scratch shares full fine-tuning's shape; every cell is in exactly one task of at
    most `most`."""
    from transferbench.core.study import expand, load_study, study_path
    from transferbench.sweep.planning import pack_groups

    study = load_study(study_path("smoke"), [
        "backbones=[{model: tf_efficientnet_lite0}]",
        "targets=[{dataset: textures, n_per_class: [4]}, {dataset: digits, n_per_class: [4]}, "
        "{dataset: glyphs, n_per_class: [2]}]", "grid.frozen_depth=[0, all]", "grid.recipes=[cosine_llrd]",
        "grid.schedule=[cosine, constant]", "grid.seed=[0,1,2]"], None)
    cells = [c for c in expand(study) if c.arm != "pixels" and c.solver != "lbfgs"]
    tasks = pack_groups(cells, most=16)
    assert sorted(c.cell_id for t in tasks for c in t) == sorted(c.cell_id for c in cells)
    assert all(len(t) <= 16 for t in tasks)
    for t in tasks:
        assert len({(c.dataset == "glyphs", c.schedule == "cosine_llrd") for c in t}) == 1
    plain = [t for t in tasks if t[0].dataset != "glyphs" and t[0].schedule != "cosine_llrd"]
    assert {c.arm for t in plain for c in t} == {"scratch", "transfer"}
    assert len(plain) == -(-sum(len(t) for t in plain) // 16)  # as few tasks as the bound allows


@pytest.mark.parametrize("chunk", [512, 7])
def test_validation_in_the_pack_equals_each_run_validating_alone(chunk, cache, torch_single_thread, monkeypatch):
    """Four runs in one pack validating every 3 steps (three of them) and every 2 (one): when most are due they
    validate in stacked passes (precise BN, then the validation set), the one not due keeping its BatchNorm
    statistics; a copy due alone validates by itself. Precise BN in one chunk and in several (the cumulative
    average). Curves, best steps and best weights equal each run trained alone."""
    from transferbench.training import packed as packed_module

    monkeypatch.setattr(loop, "PRECISE_BN_CHUNK", chunk)
    stacked_passes = []
    validate = packed_module.Pack.validate

    def counted(self, due, active):
        measured = validate(self, due, active)
        stacked_passes.append(len(measured))
        return measured

    monkeypatch.setattr(packed_module.Pack, "validate", counted)
    specs = [dict(seed=s, lr=3e-3, steps=6, patience=0, eval_every=e) for s, e in ((0, 3), (1, 3), (2, 3), (3, 2))]
    prepared = [prepare(cache, n_per_class=2, batch_size=20, **c) for c in specs]
    alone, together = [float64(p) for p in prepared], [float64(p) for p in prepared]
    training_cell.train_together(alone)
    training_cell.train_together(together, packed(most=8))
    assert stacked_passes == [0, 0, 3, 0, 0, 4]  # steps 2 and 4: one copy due; 3: three of four; 6: all
    for a, b in zip(alone, together):
        ra, rb = a.result(), b.result()
        assert ra["best_step"] == rb["best_step"]
        assert [(p["step"], p["split"], p["metric"]) for p in ra["curves"]] == \
            [(p["step"], p["split"], p["metric"]) for p in rb["curves"]]
        for pa, pb in zip(ra["curves"], rb["curves"]):
            assert pa["value"] == pytest.approx(pb["value"], rel=LOSS_RTOL, abs=1e-12)
        for name, v in a.suffix.state_dict().items():
            assert close(v, b.suffix.state_dict()[name], 1e-6), name


def test_a_stacked_validation_leaves_the_copies_not_due_as_they_were(cache, torch_single_thread):
    runs = [float64(prepare(cache, seed=s)).runs[0] for s in range(3)]
    pack = Pack(runs)
    before = {n: v.clone() for n, v in pack.fixed.items()}
    measured = pack.validate([0, 1], [0, 1, 2])
    assert set(measured) == {0, 1}
    stats = [n for n in pack.fixed if n.endswith("running_mean")]
    assert stats and all(torch.equal(pack.fixed[n][2], before[n][2]) for n in pack.fixed)
    assert all(not torch.equal(pack.fixed[n][i], before[n][i]) for n in stats for i in (0, 1))  # precise BN ran
    assert pack.validate([0], [0, 1, 2]) == {}  # one of three due: it validates by itself


@pytest.mark.parametrize("groups", [[0], [-1]])
def test_arms_that_train_chosen_groups_pack(groups, cache, torch_single_thread):
    """Cells that train only the stem or only the last group (the groups between frozen in place, their BatchNorm
    frozen too) pack like any other: the same curves and weights as alone."""
    prepared = [prepare(cache, seed=s, frozen_depth=0, train_groups=groups, steps=4, eval_every=2) for s in (0, 1)]
    alone, together = [float64(p) for p in prepared], [float64(p) for p in prepared]
    training_cell.train_together(alone)
    training_cell.train_together(together, packed(most=4))
    for a, b in zip(alone, together):
        ra, rb = a.result(), b.result()
        for pa, pb in zip(ra["curves"], rb["curves"]):
            assert pa["value"] == pytest.approx(pb["value"], rel=LOSS_RTOL, abs=1e-12)
        for name, v in a.suffix.state_dict().items():
            assert close(v, b.suffix.state_dict()[name], 1e-6), name


def test_a_run_that_diverges_in_a_pack_fails_its_own_cell(cache, torch_single_thread):
    """Four cells in packs of two, the last at an LR that diverges: the last fails, alone or packed."""
    specs = [dict(seed=s, lr=3e-3, optimizer="sgd") for s in range(3)] + [dict(seed=3, lr=1e4, optimizer="sgd")]
    prepared = [prepare(cache, **c) for c in specs]
    alone, together = [float64(p) for p in prepared], [float64(p) for p in prepared]
    training_cell.train_together(alone)
    training_cell.train_together(together, packed(most=2))
    assert [t.error is not None for t in alone] == [t.error is not None for t in together] == [False] * 3 + [True]


def test_cells_trained_together_each_take_their_share_of_the_time(cache, torch_single_thread):
    """Per cell, train_seconds is its share of the task's training wall time by the examples it saw (so they sum to
    the wall time, as the times of cells trained one by one do, and every cell of a task shows the task's images/s),
    and cell_seconds holds it. The second cell trains twice as many steps."""
    import time

    cells = [(Cell(**(BASE | dict(seed=s, steps=3 * (s + 1), eval_every=3))), None) for s in range(2)]
    t0 = time.perf_counter()
    (a, _), (b, _) = training_cell.fit_together(cells, cache, packed(most=2))
    wall = time.perf_counter() - t0
    assert b["images_seen"] == 2 * a["images_seen"] and b["train_seconds"] == pytest.approx(2 * a["train_seconds"])
    assert a["images_per_second"] == pytest.approx(b["images_per_second"])
    assert a["train_seconds"] + b["train_seconds"] <= wall
    assert a["cell_seconds"] > a["train_seconds"] and a["cell_seconds"] + b["cell_seconds"] <= wall
