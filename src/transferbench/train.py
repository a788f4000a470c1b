"""One training loop for every arm: scratch is "no pretrained weights, nothing frozen".

A cell = frozen prefix (its output cached) + trainable suffix trained on a k-shot subset within a budget of
optimizer steps, validated every few steps (curves), stopped early on validation, and tested once at the end
with its best validation weights. A linear probe is solved by L-BFGS and the pixel baselines are closed-form
(baselines.py); everything else goes through `Run`.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import create_backbone, split_at_depth, split_for_training
from .baselines import collapsed, fit_linear_probe, pixel_baseline
from .data import load_target, nested_kshot
from .features import FeatureCache, prefix_key
from .schedules import SCHEDULES, layer_lrs, make_optimizer, recipe
from .study import Cell, tuning_label


class Diverged(RuntimeError):
    """The loss went NaN or infinite: the cell fails, the study goes on."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    return torch.device(name)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@torch.inference_mode()
def forward_batched(module: nn.Module, x: torch.Tensor, device: torch.device, amp: bool = False,
                    channels_last: bool = False, batch_size: int | None = None) -> torch.Tensor:
    """module(x) in eval mode, batch by batch, returned as float32 on the CPU."""
    module.eval()
    batch_size = batch_size or (512 if device.type == "cuda" else 64)  # 64: fastest measured on 1 CPU thread
    if channels_last:  # weights in the same layout as the input, or conv falls back to a slow path
        module = module.to(memory_format=torch.channels_last)
    outs = []
    for i in range(0, len(x), batch_size):
        xb = _layout(x[i:i + batch_size].to(device, non_blocking=True), channels_last)
        with _autocast(device, amp):
            outs.append(module(xb).float().cpu())
    return torch.cat(outs)


def augment_batch(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-sample horizontal flip and one random translation per batch, on tensors (airbench-style)."""
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    dx, dy = torch.randint(-pad, pad + 1, (2,), generator=g).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def prefix_features(cache: FeatureCache, model_name: str, bb, prefix: nn.Module, depth: int, target, image_size: int,
                    device, amp: bool, channels_last: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The frozen prefix's output on every split of a target, through the cache: (features, memory|disk|miss)."""
    return cache.get(
        prefix_key(model_name, bb, depth, target.key, image_size),
        lambda: {s: forward_batched(prefix.to(device), x, device, amp, channels_last) for s, x in target.x.items()},
        disk=depth > 0)  # depth-0 "features" are normalised images: cheaper to redo than to read


def evaluate(module: nn.Module, x: torch.Tensor, y: torch.Tensor, device, amp,
             channels_last) -> tuple[float, float, torch.Tensor]:
    """(accuracy, loss, predicted classes)."""
    logits = forward_batched(module, x, device, amp, channels_last)
    y = y.cpu()
    pred = logits.argmax(1)
    return (pred == y).float().mean().item(), F.cross_entropy(logits, y).item(), pred


@torch.no_grad()
def precise_bn(module: nn.Module, x: torch.Tensor, channels_last: bool, chunk: int = 512) -> None:
    """BatchNorm statistics recomputed over the training subset (Wu & Johnson 2021, "precise BN"): exact in one pass
    when the subset fits `chunk` examples (k-shot subsets do), else the average of chunk statistics. With momentum
    0.1, 6 steps leave 53% of the initial statistics in timm's running averages."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = module.training
    module.train()
    for i, j in batch_bounds(len(x), chunk):
        module(_layout(x[i:j], channels_last))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    module.train(was_training)


def eval_epochs(epochs: int, mode: str) -> set[int]:
    """Epochs after which val is evaluated: every one, or log-spaced (1, 2, 4, ... and the last),
    which keeps the accuracy-vs-compute curve and costs a fraction of the forward passes."""
    if mode == "epoch":
        return set(range(1, epochs + 1))
    return {e for e in (2 ** i for i in range(epochs.bit_length())) if e <= epochs} | {epochs}


def budget(cell: Cell, batches_per_epoch: int) -> tuple[int, set[int]]:
    """(optimizer steps, the steps after which val is evaluated)."""
    if cell.steps:
        every = cell.eval_every or max(1, cell.steps // 20)
        return cell.steps, set(range(every, cell.steps + 1, every)) | {cell.steps}
    return cell.epochs * batches_per_epoch, {e * batches_per_epoch for e in eval_epochs(cell.epochs, cell.eval_at)}


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of each batch of an epoch. A last batch of one example joins the one before it:
    BatchNorm in training mode cannot normalise a single example (and its statistics would be noise)."""
    bounds = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


class Step:
    """One optimizer step: the whole harness overhead over a bare PyTorch step lives here."""

    def __init__(self, module, opt, sched, device, amp: bool, channels_last: bool):
        self.module, self.opt, self.sched = module, opt, sched
        self.autocast = lambda: _autocast(device, amp)
        self.channels_last = channels_last

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            loss = F.cross_entropy(self.module(_layout(xb, self.channels_last)), yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss.detach()


def fit(cell: Cell, cache: FeatureCache | None = None, use_prefix_cache: bool = True,
        lr: float | None = None) -> tuple[nn.Module | None, dict]:
    """Train and evaluate one cell: (the trained suffix, the measured part of its record).

    use_prefix_cache=False runs the frozen layers on every batch (the naive way; for benchmarks). `lr`: the LR
    another seed's cell chose (lr_from_seed), trained without a race.
    """
    cache = cache or FeatureCache()
    device = resolve_device(cell.device)
    t_start = time.perf_counter()
    target = load_target(cell.dataset, cell.shift, cell.severity, cell.image_size, cell.data_options, cell.target_name)
    idx = torch.from_numpy(nested_kshot(target.y["train"].numpy(), cell.n_per_class, cell.seed))
    common = dict(n_train=len(idx), n_test=len(target.y["test"]), num_classes=target.num_classes, target=target.name,
                  device_used=str(device))
    if cell.arm == "pixels":
        return None, common | pixel_baseline(cell.model, target, idx) | dict(cell_seconds=time.perf_counter() - t_start)
    bb = create_backbone(cell.model, cell.weights, target.num_classes, cell.seed)
    plan = recipe(cell.schedule)
    # Augmentation must pass through the frozen layers, so such cells pay full price (no cache).
    split = split_for_training(bb, cell.frozen_depth, cell.train_groups, allow=use_prefix_cache and not cell.augment)
    k, suffix = split.k, split.suffix
    t0 = time.perf_counter()
    feats, cache_state = prefix_features(cache, cell.model, bb, split.prefix, k if split.cacheable else 0, target,
                                         cell.image_size, device, cell.amp, cell.channels_last)
    prefix_seconds = time.perf_counter() - t0 if cache_state == "miss" else 0.0
    feats = {s: v.to(device) for s, v in feats.items()}  # resident on the device for the whole cell
    ys = {s: v.to(device) for s, v in target.y.items()}
    head = probe_head(cell, bb, target, ys, idx.to(device), device) if plan.get("probe_first") else {}
    suffix = suffix.to(device)
    if cell.channels_last:
        suffix = suffix.to(memory_format=torch.channels_last)
    if cell.solver == "lbfgs":
        if not (split.cacheable and k == bb.n_groups):
            raise ValueError(f"{cell.model} cannot be cut before its head: solve its probe with train.probe: sgd")
        measured = fit_linear_probe(suffix, feats, ys, idx.to(device))
    else:
        lrs = partial(layer_lrs, split.depth_of, decay=plan["layer_decay"]) if plan.get("layer_decay") else None
        measured = train_loop(cell, suffix, feats, ys, idx.to(device), device, target.num_classes, lr, lrs)
    tuning = tuning_label(cell.frozen_depth, split.trained if cell.train_groups is not None else None,
                          plan.get("arm")) if cell.arm == "transfer" else cell.arm
    return suffix, common | head | measured | dict(
        tuning=tuning, frozen_groups=k, n_groups=bb.n_groups, trained_groups=split.trained,
        frozen_fraction=round(1 - split.trained_fraction, 6), trained_fraction=round(split.trained_fraction, 6),
        weights_id=bb.weights_id, trainable_params=sum(p.numel() for p in suffix.parameters() if p.requires_grad),
        weights_digest=bb.weights_digest, prefix_seconds=prefix_seconds, cell_seconds=time.perf_counter() - t_start,
        cache=cache_state if split.cacheable else "off")


def probe_head(cell: Cell, bb, target, ys: dict, idx: torch.Tensor, device) -> dict:
    """LP-FT's first stage: the linear probe fitted to convergence on the pooled features of the frozen network,
    written into the head that fine-tuning then starts from. The features are the network's as fine-tuning sees it:
    BatchNorm statistics of the training subset (train-mode batches, and precise BN before each validation), not
    the source's. (Fitted on the source-statistics features the probe cells use, the head no longer matched the
    network once training began: on noise@5 its validation accuracy fell from 0.52 to 0.27 in the first 30 steps
    and one seed diverged.)"""
    t0 = time.perf_counter()
    frozen = create_backbone(cell.model, cell.weights, target.num_classes, cell.seed)  # a copy to cut: bb trains
    frozen.model.reset_classifier(0)  # pooled features out
    network = nn.Sequential(split_at_depth(frozen, 0)[0], frozen.model).to(device)  # normalisation, then the net
    precise_bn(network, target.x["train"][idx.cpu()].to(device), cell.channels_last)
    feats = {s: forward_batched(network, x, device, cell.amp, cell.channels_last) for s, x in target.x.items()}
    fields = fit_linear_probe(bb.model.get_classifier(), {s: v.to(device) for s, v in feats.items()}, ys, idx)
    return dict(probe_val_acc=fields["val_acc"], probe_test_acc=fields["test_acc"], probe_l2_C=fields["l2_C"],
                probe_seconds=time.perf_counter() - t0)


class Run:
    """One network trained by the one SGD loop, resumable: `advance(until)` trains to step `until` (or to an early
    stop), validating every few steps (precise BN first, when asked), tracking the best validation state.
    Validation accuracy decides (ties: lower loss); early stopping fires after `patience` validations without a
    better one, never before `min_steps`."""

    def __init__(self, cell: Cell, suffix: nn.Module, lr: float, data: dict, device, num_classes: int, total: int,
                 evals: set[int], layer_lrs=None):
        self.cell, self.suffix, self.lr, self.data, self.device = cell, suffix, lr, data, device
        self.total, self.evals, self.num_classes = total, evals, num_classes
        opt = make_optimizer(suffix.named_parameters(), cell.optimizer, lr, cell.weight_decay,
                             layer_lrs(lr) if layer_lrs else None)
        sched = SCHEDULES.get(cell.schedule, "grid.schedule")(opt, total)  # the schedule spans the whole budget
        self.step = Step(suffix, opt, sched, device, cell.amp, cell.channels_last)
        self.g = torch.Generator().manual_seed(cell.seed)  # every LR candidate sees the same batches
        self.batches = self._batches()
        self.steps, self.seen, self.since_best = 0, 0, 0
        self.best, self.best_state, self.curves, self.train_losses = None, None, [], []

    @property
    def stopped(self) -> bool:
        c = self.cell
        patient = c.patience and self.since_best >= c.patience and self.steps >= c.min_steps
        return self.steps >= self.total or bool(patient)

    def _batches(self):
        x, y = self.data["x_train"], self.data["y_train"]
        n, epoch = len(y), 0
        bounds = batch_bounds(n, min(self.cell.batch_size, n))
        while True:
            epoch += 1
            perm = torch.randperm(n, generator=self.g).to(self.device)
            for k, (i, j) in enumerate(bounds):
                xb = x[perm[i:j]]
                xb = augment_batch(xb, self.g) if self.cell.augment else xb
                yield epoch, xb, y[perm[i:j]], k == len(bounds) - 1

    def advance(self, until: int) -> Run:
        losses, seen_in_epoch = [], 0
        self.suffix.train()
        while self.steps < min(until, self.total) and not self.stopped:
            epoch, xb, yb, last = next(self.batches)
            losses.append(self.step(xb, yb) * len(yb))
            self.steps, self.seen, seen_in_epoch = self.steps + 1, self.seen + len(yb), seen_in_epoch + len(yb)
            if self.steps in self.evals:
                self._validate(epoch)
            if last or self.stopped or self.steps >= until:  # one sync per epoch (or pause), not per step
                self._record_loss(epoch, torch.stack(losses).sum().item() / seen_in_epoch)
                losses, seen_in_epoch = [], 0
        return self

    def _record_loss(self, epoch: int, train_loss: float) -> None:
        if not math.isfinite(train_loss) or train_loss > 100 * max(1.0, math.log(self.num_classes)):
            raise Diverged(f"train loss {train_loss:.3g} in epoch {epoch} at LR {self.lr:g} (chance is "
                           f"{math.log(self.num_classes):.2f}); lower the LR (grid.schedule lr, train.lrs)")
        self.train_losses.append(train_loss)
        self.curves.append(dict(epoch=epoch, step=self.steps, split="train", metric="loss", value=train_loss,
                                images_seen=self.seen))

    def _validate(self, epoch: int) -> None:
        c = self.cell
        if c.precise_bn:
            precise_bn(self.suffix, self.data["x_train"], c.channels_last)
        acc, loss, _ = self.evaluate("val")
        self.curves += [dict(epoch=epoch, step=self.steps, split="val", metric=m, value=v, images_seen=self.seen)
                        for m, v in (("acc", acc), ("loss", loss))]
        if self.best is None or (acc, -loss) > self.best[:2]:
            self.best, self.since_best = (acc, -loss, self.steps), 0
            self.best_state = copy.deepcopy(self.suffix.state_dict()) if c.keep_best else None
        else:
            self.since_best += 1
        self.suffix.train()

    def evaluate(self, split: str):
        d = self.data
        x, y = (d["x_train"], d["y_train"]) if split == "train" else (d[split], d[f"y_{split}"])
        return evaluate(self.suffix, x, y, self.device, self.cell.amp, self.cell.channels_last)


def train_loop(cell: Cell, suffix: nn.Module, feats: dict, ys: dict, idx: torch.Tensor, device,
               num_classes: int, lr: float | None = None, layer_lrs=None) -> dict:
    """The one SGD loop for every arm. With several LR candidates (`cell.lrs`), successive halving: each trains from
    the same initial weights on the same batches for the first rung of the budget, the best on validation goes on
    to the whole budget (Hyperband-style: about 1.4x one run instead of 3x). `layer_lrs(lr)`: each parameter's LR
    for a base LR (layer-wise decay). Records what a convergence check needs."""
    data = dict(x_train=feats["train"][idx], y_train=ys["train"][idx], val=feats["val"], y_val=ys["val"],
                test=feats["test"], y_test=ys["test"])
    total, evals = budget(cell, len(batch_bounds(len(idx), min(cell.batch_size, len(idx)))))
    t0 = time.perf_counter()
    candidates = [lr] if lr else cell.lrs or [cell.lr]
    if len(candidates) == 1:
        run, rung, extra_seen = Run(cell, suffix, candidates[0], data, device, num_classes, total, evals,
                                    layer_lrs), {}, 0
    else:
        first = max(1, total // 5)
        runs = [Run(cell, copy.deepcopy(suffix), lr, data, device, num_classes, total, evals | {first}, layer_lrs)
                for lr in candidates]
        rung = {r.lr: race(r, first) for r in runs}
        alive = [r for r in runs if rung[r.lr] is not None]
        if not alive:
            raise Diverged(f"every LR candidate {candidates} diverged in the first {first} steps; lower train.lrs")
        run = max(alive, key=lambda r: r.best[:2])
        extra_seen = sum(r.seen for r in runs if r is not run)  # the losers' compute counts too
    run.advance(total)
    train_seconds = time.perf_counter() - t0
    if run.best_state is not None:
        run.suffix.load_state_dict(run.best_state)  # the best validation weights, with their BN statistics
    if run.suffix is not suffix:
        suffix.load_state_dict(run.suffix.state_dict())  # the caller's module holds the winner
    val_acc, val_loss, _ = run.evaluate("val")
    test_acc, test_loss, pred = run.evaluate("test")
    seen = run.seen + extra_seen
    return convergence(steps_taken=run.steps, budget_steps=total, best_step=run.best[2] if run.best else run.steps,
                       early_stopped=run.stopped and run.steps < total, train_loss_first=run.train_losses[0],
                       train_loss_last=run.train_losses[-1], train_acc=run.evaluate("train")[0],
                       collapsed=collapsed(pred.numpy())) | dict(
        lr_chosen=run.lr, lr_rung=rung or None, val_acc=val_acc, val_loss=val_loss, test_acc=test_acc,
        test_loss=test_loss, train_seconds=train_seconds, images_per_second=seen / max(train_seconds, 1e-9),
        images_seen=seen, curves=run.curves)


def race(run: Run, steps: int) -> float | None:
    """A candidate's best validation accuracy after its rung; None when it diverged (it loses, the cell goes on)."""
    try:
        return run.advance(steps).best[0]
    except Diverged:
        return None


def convergence(**facts) -> dict:
    """The record's convergence check for the SGD loop. A cell converged when more steps would not have helped:
    validation stopped improving before the budget ran out (early stopping fired, or the best validation came in
    the first 75% of the steps taken), or the network fits its training subset (train accuracy >= 99%); and it
    does not predict one class for more than 90% of the test set. (A decaying schedule often peaks at its last
    step: fitting the training set is then the sign of a finished optimisation.)"""
    plateau = facts["early_stopped"] or facts["best_step"] <= 0.75 * facts["steps_taken"]
    fitted = facts["train_acc"] >= 0.99
    return facts | dict(converged=bool((plateau or fitted) and not facts["collapsed"]))


def train_cell(cell: Cell, cache: FeatureCache | None = None, use_prefix_cache: bool = True,
               lr: float | None = None) -> dict:
    """Train and evaluate one cell; returns the measured part of its record."""
    return fit(cell, cache, use_prefix_cache, lr)[1]
