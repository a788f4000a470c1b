"""Train one cell: prepare it (data, frozen prefix cached, the suffix to train), race its LR candidates with the
one loop (`training/loop.py`), and measure the winner into the record's fields. A linear probe is solved by L-BFGS
and the pixel baselines are closed-form (baselines.py); every other arm goes through the loop.
"""

from __future__ import annotations

import copy
import time
from functools import partial
from typing import Any, cast

import torch
from torch import nn

from transferbench.core.study import Cell, tuning_label
from transferbench.data import load_target, nested_kshot
from transferbench.models.backbones import create_backbone, split_at_depth, split_for_training
from transferbench.models.device import forward_batched, prefix_features, resolve_device
from transferbench.models.features import FeatureCache
from transferbench.training.baselines import collapsed, fit_linear_probe, pixel_baseline
from transferbench.training.loop import (
    Diverged,
    Learner,
    alone,
    batch_bounds,
    budget,
    convergence,
    precise_bn,
    race_steps,
)
from transferbench.training.schedules import layer_lrs, recipe


class Prepared:
    """A cell ready to train: its data on the device, its suffix, and the record fields known before training."""

    def __init__(self, cell: Cell, cache: FeatureCache, use_prefix_cache: bool = True, lr: float | None = None):
        self.cell, self.lr, self.t_start = cell, lr, time.perf_counter()
        self.device = device = resolve_device(cell.device)
        target = load_target(cell.dataset, cell.shift, cell.severity, cell.image_size, cell.data_options,
                             cell.target_name)
        self.target, self.num_classes = target, target.num_classes
        self.idx = torch.from_numpy(nested_kshot(target.y["train"].numpy(), cell.n_per_class, cell.seed))
        self.fields = dict(n_train=len(self.idx), n_test=len(target.y["test"]), num_classes=target.num_classes,
                           target=target.name, device_used=str(device))
        self.suffix = self.training = None
        self.t_ready = time.perf_counter()
        if cell.arm == "pixels":
            return
        bb = create_backbone(cell.model, cell.weights, target.num_classes, cell.seed)
        self.plan = recipe(cell.schedule)
        # Augmentation must pass through the frozen layers, so such cells pay full price (no cache).
        split = split_for_training(bb, cell.frozen_depth, cell.train_groups,
                                   allow=use_prefix_cache and not cell.augment)
        t0 = time.perf_counter()
        feats, cache_state = prefix_features(cache, cell.model, bb, split.prefix, split.k if split.cacheable else 0,
                                             target, cell.image_size, device, cell.amp, cell.channels_last)
        prefix_seconds = time.perf_counter() - t0 if cache_state == "miss" else 0.0
        self.feats = {s: v.to(device) for s, v in feats.items()}  # resident on the device for the whole cell
        self.ys = {s: v.to(device) for s, v in target.y.items()}
        head = probe_head(cell, bb, target, self.ys, self.idx.to(device), device) \
            if self.plan.get("probe_first") else {}
        suffix = split.suffix.to(device)
        self.suffix = suffix.to(memory_format=torch.channels_last) if cell.channels_last else suffix
        if cell.solver == "lbfgs" and not (split.cacheable and split.k == bb.n_groups):
            raise ValueError(f"{cell.model} cannot be cut before its head: solve its probe with train.probe: sgd")
        tuning = tuning_label(cell.frozen_depth, split.trained if cell.train_groups is not None else None,
                              self.plan.get("arm")) if cell.arm == "transfer" else cell.arm
        self.fields |= head | dict(
            tuning=tuning, frozen_groups=split.k, n_groups=bb.n_groups, trained_groups=split.trained,
            frozen_fraction=round(1 - split.trained_fraction, 6), trained_fraction=round(split.trained_fraction, 6),
            weights_id=bb.weights_id, trainable_params=sum(p.numel() for p in self.suffix.parameters()
                                                           if p.requires_grad),
            weights_digest=bb.weights_digest, prefix_seconds=prefix_seconds,
            cache=cache_state if split.cacheable else "off")
        decay = self.plan.get("layer_decay")
        self.layer_lrs = partial(layer_lrs, split.depth_of, decay=decay) if decay else None
        if cell.solver != "lbfgs":
            self.training = CellTraining(cell, self.suffix, self.feats, self.ys, self.idx.to(device), device,
                                     target.num_classes, lr, self.layer_lrs)
        self.t_ready = time.perf_counter()

    def measure(self) -> dict:
        """The measured part of the record: a closed-form fit here, or the training's result (trained before).
        cell_seconds: preparation + training (a packed cell's share of its task's) + this measurement."""
        cell, t0 = self.cell, time.perf_counter()
        if cell.arm == "pixels":
            measured = pixel_baseline(cell.model, self.target, self.idx)
        elif self.training is None:
            assert self.suffix is not None  # set for every arm but pixels
            measured = fit_linear_probe(self.suffix, self.feats, self.ys, self.idx.to(self.device))
        elif self.training.error:
            raise self.training.error
        else:
            measured = self.training.result()
        trained = measured["train_seconds"] if self.training else 0.0
        return self.fields | measured | dict(
            cell_seconds=self.t_ready - self.t_start + trained + time.perf_counter() - t0)


def fit(cell: Cell, cache: FeatureCache | None = None, use_prefix_cache: bool = True,
        lr: float | None = None) -> tuple[nn.Module | None, dict]:
    """Train and evaluate one cell: (the trained suffix, the measured part of its record).

    use_prefix_cache=False runs the frozen layers on every batch (the naive way; for benchmarks). `lr`: the LR
    another seed's cell chose (lr_from_seed), trained without a race.
    """
    prepared = Prepared(cell, cache or FeatureCache(), use_prefix_cache, lr)
    if prepared.training:
        train_together([prepared.training])
    return prepared.suffix, prepared.measure()


def fit_together(cells: list[tuple[Cell, float | None]], cache: FeatureCache,
                 advance) -> list[tuple[dict | None, Exception | None]]:
    """Train several cells at once, their runs moved forward together by `advance` (packed on a GPU): per cell,
    (the measured part of its record, or None) and the error that failed it (or None)."""
    prepared: list[Prepared | Exception]
    out: list[tuple[dict | None, Exception | None]]
    prepared, out = [], []
    for cell, lr in cells:
        try:
            prepared.append(Prepared(cell, cache, lr=lr))
        except Exception as e:  # noqa: BLE001 - one cell's failure is its record, not the pack's
            prepared.append(e)
    trainings = [p.training for p in prepared if isinstance(p, Prepared) and p.training]
    t0 = time.perf_counter()
    try:
        train_together(trainings, advance)
    except Exception as e:  # noqa: BLE001 - a pack that breaks fails its cells, not the study
        for t in trainings:
            t.error = t.error or e
    wall, seen = time.perf_counter() - t0, [sum(r.seen for r in t.runs) for t in trainings]
    for t, n in zip(trainings, seen):  # trained at once: each its share of the wall time by the examples it saw
        t.seconds = wall * (n / sum(seen) if sum(seen) else 1 / len(trainings))  # (they sum to it, as cells alone do)
    for p in prepared:
        if isinstance(p, Exception):
            out.append((None, p))
            continue
        try:
            out.append((p.measure(), None))
        except Exception as e:  # noqa: BLE001
            out.append((None, e))
    return out


def probe_head(cell: Cell, bb, target, ys: dict, idx: torch.Tensor, device) -> dict:
    """LP-FT's first stage: the linear probe fitted to convergence on the pooled features of the frozen network,
    written into the head that fine-tuning then starts from. The features are the network's as fine-tuning sees it:
    BatchNorm statistics of the training subset (train-mode batches, and precise BN before each validation), not
    the source's: a head fitted on the source-statistics features the probe cells use would not match the network
    once training begins (docs/measurements.md)."""
    t0 = time.perf_counter()
    frozen = create_backbone(cell.model, cell.weights, target.num_classes, cell.seed)  # a copy to cut: bb trains
    cast(Any, frozen.model).reset_classifier(0)  # pooled features out (a timm method)
    network = nn.Sequential(split_at_depth(frozen, 0)[0], frozen.model).to(device)  # normalisation, then the net
    precise_bn(network, target.x["train"][idx.cpu()].to(device), cell.channels_last)
    feats = {s: forward_batched(network, x, device, cell.amp, cell.channels_last) for s, x in target.x.items()}
    fields = fit_linear_probe(bb.model.get_classifier(), {s: v.to(device) for s, v in feats.items()}, ys, idx)
    return dict(probe_val_acc=fields["val_acc"], probe_test_acc=fields["test_acc"], probe_l2_C=fields["l2_C"],
                probe_seconds=time.perf_counter() - t0)



class CellTraining:
    """One cell's SGD training: a run per LR candidate, raced by successive halving when there are several (each
    trains from the same initial weights on the same batches for the first fifth of the budget; the best on
    validation goes on to the whole budget: Hyperband-style, about 1.4x one run instead of 3x). An advancer moves
    runs forward (`alone`, or packed with other cells' runs on a GPU); the arithmetic of a run is the same."""

    def __init__(self, cell: Cell, suffix: nn.Module, feats: dict, ys: dict, idx: torch.Tensor, device,
                 num_classes: int, lr: float | None = None, layer_lrs=None):
        self.cell, self.suffix = cell, suffix
        data = dict(train=(feats["train"][idx], ys["train"][idx]), val=(feats["val"], ys["val"]),
                    test=(feats["test"], ys["test"]))
        self.total, evals = budget(cell, len(batch_bounds(len(idx), min(cell.batch_size, len(idx)))))
        self.candidates = [lr] if lr else cell.lrs or [cell.lr]
        self.first = race_steps(self.total) if len(self.candidates) > 1 else None
        self.runs = [Learner(cell, copy.deepcopy(suffix) if self.first else suffix, c, data, device, num_classes,
                         self.total, evals | ({self.first} if self.first else set()), layer_lrs)
                     for c in self.candidates]
        self.winner: Learner | None
        self.rung: dict[float, float | None]  # LR -> its best val accuracy in the race (None: diverged)
        self.error: Exception | None
        self.t0: float | None
        self.winner, self.rung, self.error, self.t0 = None if self.first else self.runs[0], {}, None, None
        self.seconds: float | None = None  # its share of the wall time, when trained together with others

    def settle_race(self, failed: set[int]) -> None:
        """After the rung: the best candidate on validation goes on; a diverged candidate loses."""
        self.rung = {r.lr: None if i in failed else cast(tuple, r.best)[0] for i, r in enumerate(self.runs)}
        alive = [r for i, r in enumerate(self.runs) if i not in failed]
        if not alive:
            self.error = Diverged(f"every LR candidate {self.candidates} diverged in the first {self.first} steps; "
                                  "lower train.lrs")
        else:
            self.winner = max(alive, key=lambda r: cast(tuple, r.best)[:2])  # each validated at the rung's end

    def result(self) -> dict:
        """The measured part of the record, from the winner's best validation weights."""
        run = self.winner
        assert run is not None  # with no winner, the training's error is raised instead
        train_seconds = self.seconds if self.seconds is not None else time.perf_counter() - cast(float, self.t0)
        if run.best_state is not None:
            run.suffix.load_state_dict(run.best_state)  # the best validation weights, with their BN statistics
        if run.suffix is not self.suffix:
            self.suffix.load_state_dict(run.suffix.state_dict())  # the caller's module holds the winner
        val_acc, val_loss, _ = run.evaluate("val")
        test_acc, test_loss, pred = run.evaluate("test")
        seen = sum(r.seen for r in self.runs)  # the losers' compute counts too
        return convergence(steps_taken=run.steps, budget_steps=self.total,
                           best_step=run.best[2] if run.best else run.steps,
                           early_stopped=run.stopped and run.steps < self.total,
                           train_loss_first=run.train_losses[0], train_loss_last=run.train_losses[-1],
                           train_acc=run.evaluate("train")[0], collapsed=collapsed(pred.numpy())) | dict(
            lr_chosen=run.lr, lr_rung=self.rung or None, val_acc=val_acc, val_loss=val_loss, test_acc=test_acc,
            test_loss=test_loss, train_seconds=train_seconds, images_per_second=seen / max(train_seconds, 1e-9),
            images_seen=seen, curves=run.curves)


def train_together(trainings: list[CellTraining], advance=alone) -> None:
    """Race every training's candidates, then train each winner to its budget: each phase over all trainings at
    once, so an advancer can step the runs of many cells together. A training that fails keeps its `error`."""
    for t in trainings:
        t.t0 = time.perf_counter()
    racing = [t for t in trainings if t.first]
    for first in sorted({cast(int, t.first) for t in racing}):  # racing: first is set
        group = [t for t in racing if t.first == first]
        runs = [(t, i, r) for t in group for i, r in enumerate(t.runs)]
        failed = advance([r for _, _, r in runs], first)
        for t in group:
            t.settle_race({i for j, (owner, i, _) in enumerate(runs) if owner is t and j in failed})
    going = [t for t in trainings if t.error is None]
    failed = advance([t.winner for t in going], max((t.total for t in going), default=0))
    for j, t in enumerate(going):
        if j in failed:
            t.error = failed[j]


def train_loop(cell: Cell, suffix: nn.Module, feats: dict, ys: dict, idx: torch.Tensor, device,
               num_classes: int, lr: float | None = None, layer_lrs=None) -> dict:
    """The one SGD loop for every arm, for one cell alone. `layer_lrs(lr)`: each parameter's LR for a base LR
    (layer-wise decay). Records what a convergence check needs."""
    training = CellTraining(cell, suffix, feats, ys, idx, device, num_classes, lr, layer_lrs)
    train_together([training])
    if training.error:
        raise training.error
    return training.result()



def train_cell(cell: Cell, cache: FeatureCache | None = None, use_prefix_cache: bool = True,
               lr: float | None = None) -> dict:
    """Train and evaluate one cell; returns the measured part of its record."""
    return fit(cell, cache, use_prefix_cache, lr)[1]
