"""The one training loop: a `Learner` is one network trained by SGD on one cell's k-shot subset, with one LR.

    for step in budget:  batch -> loss -> optimizer and schedule step -> (every few steps) validate, keep the best
                         weights, stop early after `patience` validations without a better one

is `Learner.advance`, read top to bottom below; everything after it is the helpers it calls. What surrounds a loop
(preparing a cell, racing LR candidates, measuring the result) lives in `training/cell.py`; stepping many learners
at once on a GPU is `training/packed.py`, which replaces only the optimizer step and goes through the small
interface marked "for packs" here.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from transferbench.core.study import Cell
from transferbench.models.device import as_layout, autocast, forward_batched
from transferbench.training.schedules import SCHEDULES, make_optimizer


class Learner:
    """One network trained by the one SGD loop, resumable: `advance(until)` trains to step `until` (or to an early
    stop), validating every few steps (precise BN first, when asked), tracking the best validation state.
    Validation accuracy decides (ties: lower loss); early stopping fires after `patience` validations without a
    better one, never before `min_steps`.

    For packs (packed.py), which take the optimizer step for many learners at once and leave the rest to each
    learner: `optimizer` and `scheduler`, `examples(split)`, `batch_sizes()`, `validates_after(step)`, `active`,
    `next_batch` and `after_step`."""

    def __init__(self, cell: Cell, suffix: nn.Module, lr: float, data: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 device, num_classes: int, total: int, evals: set[int], layer_lrs=None):
        """`data`: split ("train": the k-shot subset, "val", "test") -> (inputs to the suffix, labels), on the device;
        `total`: the budget in optimizer steps; `evals`: the steps after which validation runs."""
        self.cell, self.suffix, self.lr, self.data, self.device = cell, suffix, lr, data, device
        self.total, self.evals, self.num_classes = total, evals, num_classes
        opt = make_optimizer(suffix.named_parameters(), cell.optimizer, lr, cell.weight_decay,
                             layer_lrs(lr) if layer_lrs else None)
        sched = SCHEDULES.get(cell.schedule, "grid.schedule")(opt, total)  # the schedule spans the whole budget
        self.step = Step(suffix, opt, sched, device, cell.amp, cell.channels_last)
        self.g = torch.Generator().manual_seed(cell.seed)  # every LR candidate sees the same batches
        self.batches = self._batches()
        self.steps, self.seen, self.since_best = 0, 0, 0
        self.best: tuple[float, float, int] | None  # (val accuracy, -val loss, step)
        self.best_state: dict[str, torch.Tensor] | None
        self.curves: list[dict]
        self.train_losses: list[float]
        self._losses: list[torch.Tensor]
        self.best, self.best_state, self.curves, self.train_losses = None, None, [], []
        self._losses, self._seen_in_epoch = [], 0  # the epoch so far

    def advance(self, until: int) -> Learner:
        """The loop: train alone to step `until` (or the budget, or an early stop)."""
        self.suffix.train()
        while self.active(until):
            epoch, xb, yb, last = self.next_batch()
            loss = self.step(xb, yb)  # forward, backward, optimizer step, schedule step
            self.after_step(loss, len(yb), epoch, last, until)  # validation, best weights, early stopping
        return self

    @property
    def stopped(self) -> bool:
        c = self.cell
        patient = c.patience and self.since_best >= c.patience and self.steps >= c.min_steps
        return self.steps >= self.total or bool(patient)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.step.opt

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """Steps this learner's LR; a pack calls it after each step it takes for the learner."""
        return self.step.sched

    def examples(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs to the suffix, labels) of a split; "train" is the k-shot subset."""
        return self.data[split]

    def batch_sizes(self) -> list[int]:
        """The sizes of an epoch's batches, in order."""
        n = len(self.data["train"][1])
        return [j - i for i, j in batch_bounds(n, min(self.cell.batch_size, n))]

    def validates_after(self, step: int) -> bool:
        return step in self.evals

    def _batches(self):
        x, y = self.data["train"]
        n, epoch = len(y), 0
        bounds = batch_bounds(n, min(self.cell.batch_size, n))
        while True:
            epoch += 1
            perm = torch.randperm(n, generator=self.g).to(self.device)
            for k, (i, j) in enumerate(bounds):
                xb = x[perm[i:j]]
                xb = augment_batch(xb, self.g) if self.cell.augment else xb
                yield epoch, xb, y[perm[i:j]], k == len(bounds) - 1

    def active(self, until: int) -> bool:
        return self.steps < min(until, self.total) and not self.stopped

    def next_batch(self) -> tuple[int, torch.Tensor, torch.Tensor, bool]:
        """(epoch, x, y, last batch of its epoch) in this run's own data order."""
        return next(self.batches)

    def after_step(self, loss: torch.Tensor, n: int, epoch: int, last: bool, until: int, sync=None,
                   measured: tuple[float, float] | None = None) -> None:
        """The bookkeeping of one optimizer step taken on n examples with this loss (by Learner.step, or by a pack that
        calls `sync` to write this run's weights into its module before the module is read, and may hand over the
        validation it `measured` for this run: accuracy and loss)."""
        self._losses.append(loss * n)
        self.steps, self.seen, self._seen_in_epoch = self.steps + 1, self.seen + n, self._seen_in_epoch + n
        if self.validates_after(self.steps):
            if measured is None:
                if sync:
                    sync()
                measured, sync = self._measure(), None  # the module holds the state measured
            self._observe(epoch, *measured, sync)
        if last or self.stopped or self.steps >= until:  # one sync per epoch (or pause), not per step
            self._record_loss(epoch, torch.stack(self._losses).sum().item() / self._seen_in_epoch)
            self._losses, self._seen_in_epoch = [], 0

    def _record_loss(self, epoch: int, train_loss: float) -> None:
        if not math.isfinite(train_loss) or train_loss > 100 * max(1.0, math.log(self.num_classes)):
            raise Diverged(f"train loss {train_loss:.3g} in epoch {epoch} at LR {self.lr:g} (chance is "
                           f"{math.log(self.num_classes):.2f}); lower the LR (grid.schedule lr, train.lrs)")
        self.train_losses.append(train_loss)
        self.curves.append(dict(epoch=epoch, step=self.steps, split="train", metric="loss", value=train_loss,
                                images_seen=self.seen))

    def _measure(self) -> tuple[float, float]:
        """Validation accuracy and loss of the module as it is (precise BN first, when asked)."""
        if self.cell.precise_bn:
            precise_bn(self.suffix, self.data["train"][0], self.cell.channels_last)
        acc, loss, _ = self.evaluate("val")
        self.suffix.train()
        return acc, loss

    def _observe(self, epoch: int, acc: float, loss: float, sync=None) -> None:
        """A validation's curves, best state (its module's, after `sync`) and patience."""
        self.curves += [dict(epoch=epoch, step=self.steps, split="val", metric=m, value=v, images_seen=self.seen)
                        for m, v in (("acc", acc), ("loss", loss))]
        if self.best is None or (acc, -loss) > self.best[:2]:
            self.best, self.since_best = (acc, -loss, self.steps), 0
            if self.cell.keep_best:
                if sync:
                    sync()
                self.best_state = copy.deepcopy(self.suffix.state_dict())
        else:
            self.since_best += 1

    def evaluate(self, split: str) -> tuple[float, float, torch.Tensor]:
        """(accuracy, loss, predicted classes) of the module as it is on a split."""
        return evaluate(self.suffix, *self.data[split], self.device, self.cell.amp, self.cell.channels_last)


def alone(runs: list[Learner], until: int) -> dict[int, Exception]:
    """Advance each run by itself (its own optimizer step); returns {index: error} of the runs that diverged."""
    failed: dict[int, Exception] = {}
    for i, r in enumerate(runs):
        try:
            r.advance(until)
        except Diverged as e:
            failed[i] = e
    return failed



def convergence(**facts) -> dict:
    """The record's convergence check for the SGD loop. A cell converged when more steps would not have helped:
    validation stopped improving before the budget ran out (early stopping fired, or the best validation came in
    the first 75% of the steps taken), or the network fits its training subset (train accuracy >= 99%); and it
    does not predict one class for more than 90% of the test set. (A decaying schedule often peaks at its last
    step: fitting the training set is then the sign of a finished optimisation.)"""
    plateau = facts["early_stopped"] or facts["best_step"] <= 0.75 * facts["steps_taken"]
    fitted = facts["train_acc"] >= 0.99
    return facts | dict(converged=bool((plateau or fitted) and not facts["collapsed"]))



class Diverged(RuntimeError):
    """The loss went NaN or infinite: the cell fails, the study goes on."""


def augment_batch(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-sample horizontal flip and one random translation per batch, on tensors (airbench-style)."""
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    dx, dy = torch.randint(-pad, pad + 1, (2,), generator=g).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def evaluate(module: nn.Module, x: torch.Tensor, y: torch.Tensor, device, amp,
             channels_last) -> tuple[float, float, torch.Tensor]:
    """(accuracy, loss, predicted classes)."""
    return scores(forward_batched(module, x, device, amp, channels_last), y)


def scores(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean cross-entropy, predicted classes) of CPU logits, in their precision (`device.widened`)."""
    y = y.cpu()
    pred = logits.argmax(1)
    return (pred == y).float().mean().item(), F.cross_entropy(logits, y).item(), pred


PRECISE_BN_CHUNK = 512  # examples per forward pass of precise BN


def tracked_norms(module: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics (those precise BN recomputes), by name."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


@torch.no_grad()
def precise_bn(module: nn.Module, x: torch.Tensor, channels_last: bool) -> None:
    """BatchNorm statistics recomputed over the training subset (Wu & Johnson 2021, "precise BN"): exact in one pass
    when the subset fits PRECISE_BN_CHUNK examples (k-shot subsets do), else the average of chunk statistics. With
    momentum 0.1, 6 steps leave 53% of the initial statistics in timm's running averages."""
    bns = list(tracked_norms(module).values())
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = module.training
    module.train()
    for i, j in batch_bounds(len(x), PRECISE_BN_CHUNK):
        module(as_layout(x[i:j], channels_last))
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


def race_steps(total: int) -> int:
    """The steps of an LR race: the first fifth of the budget."""
    return max(1, total // 5)


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
        self.autocast = lambda: autocast(device, amp)
        self.channels_last = channels_last

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            loss = F.cross_entropy(self.module(as_layout(xb, self.channels_last)), yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss.detach()

