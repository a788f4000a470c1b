"""Many cells per pass: the runs of several cells that share a network shape train as one wider model.

The copies are stacked along the channel axis (Packed-Ensembles style, Laurent et al. 2023): copy i's batch fills
channels [i*C, (i+1)*C) of one [batch, copies*C, H, W] tensor; every convolution becomes a grouped convolution
(groups x copies), every BatchNorm one BatchNorm over copies*C channels (its statistics are per channel, so per
copy), the head a batched matrix product. No layer mixes channels across groups, so copies never meet: each trains
on its own batch exactly as it would alone, and on a GPU each layer of all copies is one kernel launch instead of
one per copy (a small cell is launch-bound), with the per-cell path's own kernels: cuDNN's fused BatchNorm, bf16
autocast and channels_last (vmapping over copies would spell BatchNorm out in plain tensor operations, about eight
memory passes where cuDNN makes two, and bf16 autocast breaks its backward). Only layers known to keep channels
apart are stacked (`STACKABLE`); a network with any other layer trains alone.

The optimizer updates every copy in a handful of kernels over one flat [copies, parameters] tensor. What makes a run
its own stays its own: its data order (its seed), LR and schedule (read each step from the run's own torch
optimizer, which its scheduler drives and the pack never steps), AdamW or SGD state (handed back to that optimizer
in torch's own format, so a run can leave a pack and go on alone or in another pack), early stopping, validation
(precise BN and evaluation on the run's own module, into which the pack first writes its copy), best weights and
curves: the learner (`loop.Learner`) does all of that, the pack only replaces its optimizer step.

Equivalence with separate training is tested in float64 on CPU (tests/test_packed.py); the runner packs only on
CUDA: on this 2-core CPU packing loses (`bench/test_packed.py`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, Conv2dSame, SelectAdaptivePool2d
from timm.layers.norm_act import FrozenBatchNorm2d, FrozenBatchNormAct2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual, SqueezeExcite
from timm.models.efficientnet import EfficientNet
from torch import nn
from torch.func import functional_call, stack_module_state

from transferbench.models import device
from transferbench.models.device import as_layout, autocast
from transferbench.models.fastconv import FastConv2d
from transferbench.training import loop
from transferbench.training.loop import Diverged, Learner, alone, batch_bounds, scores, tracked_norms


class StackedLinear(nn.Linear):
    """`copies` linear layers on [batch, copies*in] features, as one batched matrix product."""

    copies: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(self.copies, -1, self.in_features)
        y = torch.einsum("bki,koi->bko", x.view(len(x), self.copies, self.in_features), w)
        return (y if self.bias is None else y + self.bias.view(self.copies, -1).to(y.dtype)).flatten(1)  # as F.linear


def _stack_conv(m: nn.Conv2d, copies: int) -> None:
    m.in_channels, m.out_channels, m.groups = m.in_channels * copies, m.out_channels * copies, m.groups * copies


def _stack_norm(m: nn.BatchNorm2d, copies: int) -> None:
    m.num_features *= copies


def _stack_linear(m: nn.Linear, copies: int) -> None:
    # torch types nn.Module.__setattr__'s value as Tensor | Module; a plain attribute is fine at run time
    m.__class__, m.copies = StackedLinear, copies  # type: ignore[assignment]


def _per_channel(m: nn.Module, copies: int) -> None:
    """Nothing to change: it works channel by channel (activations, average pooling) or only composes layers."""


# The layers a pack can stack, each with how its copy for `copies` networks is made. Exact types only: a subclass
# may mix channels. (FastConv2d's dense matmul path runs only for groups == 1, so never on a stack of several.)
STACKABLE: dict[type, Callable[[Any, int], None]]  # each maker takes its own layer type
STACKABLE = {nn.Conv2d: _stack_conv, Conv2dSame: _stack_conv, FastConv2d: _stack_conv, nn.BatchNorm2d: _stack_norm,
             BatchNormAct2d: _stack_norm, FrozenBatchNorm2d: _per_channel, FrozenBatchNormAct2d: _per_channel,
             nn.Linear: _stack_linear, nn.Identity: _per_channel, nn.ReLU: _per_channel, nn.ReLU6: _per_channel,
             nn.SiLU: _per_channel, nn.Hardswish: _per_channel, nn.Sigmoid: _per_channel,
             nn.AdaptiveAvgPool2d: _per_channel, nn.Flatten: _per_channel, nn.Sequential: _per_channel,
             InvertedResidual: _per_channel, DepthwiseSeparableConv: _per_channel, SqueezeExcite: _per_channel,
             EfficientNet: _per_channel, SelectAdaptivePool2d: _per_channel}


def unstackable(module: nn.Module) -> str | None:
    """Why `module` cannot be stacked (the first layer that could mix copies), or None."""
    for name, m in module.named_modules():
        if type(m) not in STACKABLE:
            return f"{name or 'the network'} ({type(m).__name__}) is not a layer a pack can stack"
        if isinstance(m, SelectAdaptivePool2d) and m.pool_type != "avg":
            return f"{name} pools with {m.pool_type}"
        if getattr(m, "drop_rate", 0):
            return f"{name or 'the network'} has dropout (its masks would not match the run's own)"
    return None


def stacked(module: nn.Module, copies: int) -> nn.Module:
    """A parameter-free (meta) copy of `module` whose layers take `copies` networks stacked along the channels."""
    why = unstackable(module)
    if why:
        raise ValueError(f"cannot pack: {why}")
    template = copy.deepcopy(module).to("meta")
    for m in template.modules():
        STACKABLE[type(m)](m, copies)
    return template


class Pack:
    """Runs (`loop.Learner`s) of one network shape, stepped together. `advance(until)` trains each run to step
    `until` or its early stop with the learner's own bookkeeping (Learner.after_step); a run whose loss diverges
    leaves the pack with the exception recorded in `failed` (its index), the others go on."""

    def __init__(self, runs: list[Learner]):
        modules = [r.suffix for r in runs]
        shapes = {tuple((n, tuple(p.shape), p.requires_grad) for n, p in m.named_parameters()) for m in modules}
        if len(shapes) != 1 or len({type(r.optimizer) for r in runs}) != 1:
            raise ValueError("a pack holds runs of one network shape and one optimizer")
        self.failed: dict[int, Exception]  # run index -> why it diverged
        self.runs, self.failed = runs, {}
        trainable = [(n, p) for n, p in modules[0].named_parameters() if p.requires_grad]
        self.names, self.shapes = [n for n, _ in trainable], [p.shape for _, p in trainable]
        self.sizes = [p.numel() for _, p in trainable]
        params, buffers = stack_module_state(modules)  # copies along dim 0, detached
        # One flat [copies, parameters] tensor holds every trainable weight; each parameter is a leaf view into it
        # (its gradient its own tensor: gradients of slices of one leaf would each allocate the whole flat size).
        self.flat = torch.cat([params[n].detach().reshape(len(runs), -1) for n in self.names], 1)
        self.params, start = {}, 0
        for n, shape, size in zip(self.names, self.shapes, self.sizes):
            self.params[n] = self.flat[:, start:start + size].view(len(runs), *shape).requires_grad_()
            start += size
        self.fixed = {n: v for n, v in params.items() if n not in self.names} | buffers  # frozen weights, BN stats
        self.template = stacked(modules[0], len(runs))
        cell = runs[0].cell
        self.autocast, self.channels_last = lambda: autocast(runs[0].device, cell.amp), cell.channels_last
        self.optimizer = PackedOptimizer(self, [r.optimizer for r in runs], [dict(m.named_parameters())
                                                                            for m in modules])

    def grad(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Every copy's gradient as one flat [copies, parameters] tensor (into `out` when given)."""
        return torch.cat([cast(torch.Tensor, self.params[n].grad).reshape(len(self.runs), -1)  # set by backward
                          for n in self.names], 1, out=out)

    def forward(self, x: torch.Tensor, amp: bool = True) -> torch.Tensor:
        """Logits [copies, batch, classes] of x [copies, batch, channels, ...], each copy on its own batch, with the
        runs' own precision (bf16 autocast on a GPU when train.amp; `amp=False`: as precise BN, without) and
        layout."""
        copies, batch = x.shape[:2]
        xs = as_layout(x.transpose(0, 1).reshape(batch, -1, *x.shape[3:]), self.channels_last)
        # [copies, n, ...] -> [copies * n, ...]: dimension 0 of every stacked weight and statistic is per channel
        tensors = {n: (v.flatten(0, 1) if v.dim() > 1 else v) for n, v in (self.params | self.fixed).items()}
        if self.channels_last:
            tensors = {n: as_layout(v, True) for n, v in tensors.items()}
        with self.autocast() if amp else nullcontext():
            logits = functional_call(self.template, tensors, (xs,), strict=True)
        return logits.to(self.flat.dtype).view(batch, copies, -1).transpose(0, 1)

    def advance(self, until: int, least: int = 1) -> Pack:
        """Step the runs until each reaches step `until` or stops, or until fewer than `least` are still active
        (the caller repacks those: a pack pays for every copy it holds). A run's module holds its state from the
        moment it leaves (stops, diverges or the pack ends): copies that wait in the pack see other batches."""
        self.template.train()
        live = set(range(len(self.runs)))
        while True:
            active = [i for i in sorted(live) if i not in self.failed and self.runs[i].active(until)]
            for i in live - set(active):
                self.write_back(i)
            live = set(active)
            if len(active) < least or not active:
                break
            batches = {i: self.runs[i].next_batch() for i in active}
            losses = self.step(*self._stack(batches), active)
            due = [i for i in active if self.runs[i].validates_after(self.runs[i].steps + 1)]
            measured = self.validate(due, active)
            for i in active:
                epoch, xb, yb, last = batches[i]
                run = self.runs[i]
                try:
                    run.after_step(losses[i], len(yb), epoch, last, until, sync=lambda i=i: self.write_back(i),
                                   measured=measured.get(i))
                except Diverged as e:  # it leaves the pack; the rest go on
                    self.failed[i] = e
                if run.validates_after(run.steps) and i not in measured:
                    self.read_back(i)  # the BatchNorm statistics its own validation recomputed (precise BN) go on
        for i in live:
            self.write_back(i)
        self.optimizer.hand_back()
        return self

    @torch.no_grad()
    def validate(self, due: list[int], active: list[int]) -> dict[int, tuple[float, float]]:
        """Validation (accuracy, loss) of the copies in `due`, measured in stacked passes as a learner measures it
        alone: precise BN over each copy's training subset (the cumulative average over chunks of
        loop.PRECISE_BN_CHUNK, in the weights' precision), then its validation set in eval mode. {} when they should
        validate one by one instead: fewer than half the active copies due (a stacked pass computes every copy), or
        validation data or settings that differ between copies. The copies not due keep their BatchNorm statistics."""
        runs = [self.runs[i] for i in due]
        if len(due) < max(2, len(active) / 2) or not self._same_validation(runs):
            return {}
        if runs[0].cell.precise_bn:
            self._precise_bn(due)
        self.template.eval()
        first = runs[0].examples("val")[0]
        val = {i: self.runs[i].examples("val")[0] for i in due}
        chunk = device.eval_batch_size(first.device)
        stacked = (torch.stack([val.get(i, first)[j:j + chunk] for i in range(len(self.runs))])
                   for j in range(0, len(first), chunk))
        logits = torch.cat([device.widened(self.forward(x)).cpu() for x in stacked], 1)
        self.template.train()
        return {i: scores(logits[i], self.runs[i].examples("val")[1])[:2] for i in due}

    def _same_validation(self, runs: list[Learner]) -> bool:
        shape, c = runs[0].examples("val")[0].shape, runs[0].cell
        return all(r.examples("val")[0].shape == shape and r.cell.precise_bn == c.precise_bn for r in runs)

    def _precise_bn(self, due: list[int]) -> None:
        """loop.precise_bn for the copies in `due`: statistics reset, then the cumulative average over chunks of the
        training subset (momentum 1/j for chunk j). The pass computes every copy; the others get their statistics
        back."""
        norms = tracked_norms(self.template)
        stats = [f"{name}.{b}" for name in norms for b in ("running_mean", "running_var", "num_batches_tracked")]
        before = {n: self.fixed[n].clone() for n in stats}
        for name in norms:
            self.fixed[f"{name}.running_mean"].zero_()
            self.fixed[f"{name}.running_var"].fill_(1)
            self.fixed[f"{name}.num_batches_tracked"].zero_()
        momenta = {name: m.momentum for name, m in norms.items()}
        x = {i: self.runs[i].examples("train")[0] for i in due}
        first = x[due[0]]
        self.template.train()
        for j, (a, b) in enumerate(batch_bounds(len(first), loop.PRECISE_BN_CHUNK)):
            for m in norms.values():
                m.momentum = 1.0 / (j + 1)
            self.forward(torch.stack([x.get(i, first)[a:b] for i in range(len(self.runs))]), amp=False)
        for name, m in norms.items():
            m.momentum = momenta[name]
        keep = torch.tensor([i not in due for i in range(len(self.runs))], device=self.flat.device)
        for n in stats:  # the copies not due: their statistics as they were
            self.fixed[n][keep] = before[n][keep]

    def _stack(self, batches: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Every copy's batch in one tensor; a copy that is not training gets an active copy's batch (its forward
        is wasted work and its update is masked out)."""
        first = next(iter(batches.values()))
        pick = [batches.get(i, first) for i in range(len(self.runs))]
        return torch.stack([b[1] for b in pick]), torch.stack([b[2] for b in pick])

    def step(self, x: torch.Tensor, y: torch.Tensor, active: list[int]) -> torch.Tensor:
        """One optimizer step of the active copies: each copy's loss is the mean over its own batch; the copies
        share no parameter, so the gradient of the summed loss is each copy's own gradient."""
        for p in self.params.values():
            p.grad = None
        logits = self.forward(x)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
        losses.sum().backward()
        mask = torch.zeros(len(self.runs), 1, dtype=torch.bool)
        mask[active] = True
        with torch.no_grad():
            self.optimizer.step(mask.to(self.flat.device, non_blocking=True), len(active) == len(self.runs))
        with warnings.catch_warnings():  # the run's own optimizer never steps: the pack steps for it
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before")
            for i in active:
                self.runs[i].scheduler.step()  # the run's own schedule sets its next LR
        return losses.detach()

    @torch.no_grad()
    def read_back(self, i: int) -> None:
        """Copy i's buffers from its run's module into the pack (after a validation changed them)."""
        own = dict(self.runs[i].suffix.named_buffers())
        for n, v in self.fixed.items():
            if n in own:
                v[i].copy_(own[n])

    @torch.no_grad()
    def write_back(self, i: int) -> None:
        """Copy i's weights and buffers into its run's own module (before it validates, and at the end)."""
        module = self.runs[i].suffix
        own = dict(module.named_parameters()) | dict(module.named_buffers())
        for n, v in (self.params | self.fixed).items():
            own[n].copy_(v[i])


class PackedOptimizer:
    """torch.optim.AdamW (amsgrad off) or SGD (momentum, dampening 0, Nesterov or not) on the flat [copies,
    parameters] tensor, each copy with the LR and weight decay of its own torch optimizer's param groups (layer-wise
    LRs included) and its own step count; masked copies do not move."""

    HYPER = ("betas", "eps", "momentum", "nesterov", "dampening", "amsgrad", "maximize")  # one value per pack

    @staticmethod
    def supports(opt: torch.optim.Optimizer) -> bool:
        g = opt.param_groups[0]
        return type(opt).__name__ in ("AdamW", "SGD") and not (g.get("amsgrad") or g.get("maximize")
                                                                or g.get("dampening"))

    def __init__(self, pack: Pack, opts: list[torch.optim.Optimizer], params: list[dict]):
        self.pack, self.opts, self.kind = pack, opts, type(opts[0]).__name__
        if not self.supports(opts[0]):
            raise ValueError(f"no packed step for {self.kind} {opts[0].defaults}: pack AdamW or SGD runs only")
        group_of = [{id(p): k for k, g in enumerate(o.param_groups) for p in g["params"]} for o in opts]
        self.params = params  # per copy: name -> its module's parameter (where torch keeps its state)
        first = params[0]
        index = [torch.full((size,), group_of[0][id(first[n])], dtype=torch.long)
                 for n, size in zip(pack.names, pack.sizes)]
        self.group_index = torch.cat(index).to(pack.flat.device)  # each element's param group
        g0 = opts[0].param_groups[0]
        self.hyper = {k: g0[k] for k in self.HYPER if k in g0}
        shape = pack.flat.shape
        self.t = torch.zeros(shape[0], 1, dtype=pack.flat.dtype, device=pack.flat.device)
        self.m = torch.zeros(shape, dtype=pack.flat.dtype, device=pack.flat.device)
        self.v = torch.zeros_like(self.m) if self.kind == "AdamW" else None
        self.g, self.tmp = torch.empty_like(self.m), torch.empty_like(self.m)  # the flat gradient, a scratch buffer
        self.weight_decay = self._per_element("weight_decay")  # no schedule touches it
        self._take_state()

    def _per_element(self, key: str) -> torch.Tensor:
        """Each copy's param-group value of `key` (lr, weight_decay): [copies, 1] where every group has the same
        value (broadcast), else [copies, parameters]."""
        values = torch.tensor([[g[key] for g in o.param_groups] for o in self.opts], dtype=self.m.dtype)
        same = bool((values == values[:, :1]).all())  # decided on the host: no device sync
        values = values.to(self.m.device, non_blocking=True)
        return values[:, :1] if same else values[:, self.group_index]

    def step(self, mask: torch.Tensor, every: bool) -> None:
        """One update of the copies in `mask` ([copies, 1]); `every`: all of them (the usual case: no masking). In
        place, in torch's order of operations, into buffers allocated once."""
        p, g, tmp = self.pack.flat, self.pack.grad(out=self.g), self.tmp
        lr = self._per_element("lr") * mask  # the schedules move it every step; a masked copy does not move
        self.t += mask
        if self.kind == "AdamW":
            assert self.v is not None  # AdamW's second moment
            b1, b2 = self.hyper["betas"]
            t = self.t.clamp_min(1)
            p.mul_(1 - lr * self.weight_decay)
            if every:
                self.m.lerp_(g, 1 - b1)
                self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
            else:
                self.m.copy_(torch.where(mask, self.m.lerp(g, 1 - b1), self.m))
                self.v.copy_(torch.where(mask, self.v * b2 + (1 - b2) * g * g, self.v))
            torch.sqrt(self.v, out=tmp).div_((1 - b2 ** t).sqrt()).add_(self.hyper["eps"])  # the denominator
            p.sub_(torch.div(self.m, tmp, out=tmp).mul_(lr / (1 - b1 ** t)))
        else:
            d = torch.mul(p, self.weight_decay, out=tmp).add_(g)
            mom = self.hyper["momentum"]
            if mom:
                if every:
                    self.m.mul_(mom).add_(d)
                else:
                    self.m.copy_(torch.where(mask, self.m * mom + d, self.m))
                d = d.add_(self.m, alpha=mom) if self.hyper["nesterov"] else d.copy_(self.m)
            p.sub_(d.mul_(lr))

    def _take_state(self) -> None:
        """Start from what each run's torch optimizer holds (a run that trained before, alone or in a pack)."""
        for i, (opt, params) in enumerate(zip(self.opts, self.params)):
            states = [opt.state.get(params[n], {}) for n in self.pack.names]
            if not any(states):
                continue
            step = states[0].get("step")
            self.t[i] = float(step) if step is not None else 0.0
            key = "exp_avg" if self.kind == "AdamW" else "momentum_buffer"
            self.m[i] = torch.cat([s[key].reshape(-1) for s in states])
            if self.kind == "AdamW":
                assert self.v is not None
                self.v[i] = torch.cat([s["exp_avg_sq"].reshape(-1) for s in states])

    def hand_back(self) -> None:
        """Write each copy's state into its run's torch optimizer, in torch's format."""
        steps = self.t[:, 0].tolist()  # one device sync
        for i, (opt, params) in enumerate(zip(self.opts, self.params)):
            if steps[i] == 0:
                continue
            start = 0
            for n, size in zip(self.pack.names, self.pack.sizes):
                state = opt.state[params[n]]
                if self.kind == "AdamW":  # where torch keeps the step: on the device when fused or capturable
                    assert self.v is not None
                    on_device = opt.defaults.get("fused") or opt.defaults.get("capturable")
                    state["step"] = torch.tensor(steps[i], device=params[n].device if on_device else "cpu")
                    state["exp_avg"] = like(params[n], self.m[i, start:start + size])
                    state["exp_avg_sq"] = like(params[n], self.v[i, start:start + size])
                else:
                    state["momentum_buffer"] = like(params[n], self.m[i, start:start + size])
                start += size


def like(param: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Flat values as a tensor of the parameter's shape and memory layout (torch's fused optimizers pair state and
    parameter elements in memory order: a contiguous state beside a channels_last weight would be misread)."""
    return torch.empty_like(param).copy_(values.view(param.shape))


def pack_sizes(n: int, most: int) -> list[int]:
    """Split n into parts of at most `most`, as even as possible."""
    k = -(-n // most) if n else 0
    return [n // k + (j < n % k) for j in range(k)]


def chunks(items: list, most: int) -> list[list]:
    """`items` in consecutive parts of at most `most`, as even as possible (pack_sizes)."""
    out, start = [], 0
    for size in pack_sizes(len(items), most):
        out.append(items[start:start + size])
        start += size
    return out


def signature(run: Learner) -> tuple | None:
    """What runs must share to be stacked (None: this run cannot be packed and trains alone): the trainable layers
    and their LR groups, the optimizer and its fixed hyperparameters, the batch shapes (examples and batch size
    decide every batch's size), device, precision and layout."""
    opt = run.optimizer
    if not PackedOptimizer.supports(opt) or unstackable(run.suffix):
        return None
    x = run.examples("train")[0]
    group_of = {id(p): k for k, g in enumerate(opt.param_groups) for p in g["params"]}  # layer-wise LRs
    sizes = run.batch_sizes()
    where = run.steps % len(sizes) if len(set(sizes)) > 1 else 0  # with a short last batch, runs must be in step
    fixed = tuple((k, str(v)) for k, v in sorted(opt.param_groups[0].items()) if k in PackedOptimizer.HYPER)
    return (tuple((n, tuple(p.shape), p.requires_grad, group_of.get(id(p))) for n, p in run.suffix.named_parameters()),
            type(opt).__name__, fixed, len(x), min(run.cell.batch_size, len(x)), where, tuple(x.shape[1:]),
            str(x.dtype), str(x.device), run.cell.amp, run.cell.channels_last)


def packed(most: int = 16, refill: float = 0.75):
    """An advancer for cell.train_together: runs that can share a pack train in packs of at most `most` copies;
    returns {index: error} of the runs that diverged. When early stopping leaves fewer than `refill` of a pack's
    copies active, the rest are repacked without the idle ones, and a last run alone goes on by itself (a pack of
    one is slower than the plain step: 0.4x on an H200)."""
    def advance(runs: list[Learner], until: int) -> dict[int, Exception]:
        groups: dict[tuple | None, list[int]] = {}
        for i, r in enumerate(runs):
            groups.setdefault(signature(r), []).append(i)
        failed: dict[int, Exception] = {}
        for key, members in groups.items():
            for chunk in chunks(members, most):
                chunk_runs = [runs[i] for i in chunk]
                errors = train_pack(chunk_runs, until, refill) if key is not None else alone(chunk_runs, until)
                failed |= {chunk[j]: e for j, e in errors.items()}  # by the caller's index
        return failed

    return advance


def train_pack(runs: list[Learner], until: int, refill: float) -> dict[int, Exception]:
    """Train these runs in one pack, repacked as they stop (see `packed`); {index: error} of those that diverged."""
    failed: dict[int, Exception]
    failed, members = {}, list(range(len(runs)))
    while len(members) > 1:
        pack = Pack([runs[i] for i in members]).advance(until, least=max(2, math.ceil(refill * len(members))))
        failed |= {members[j]: e for j, e in pack.failed.items()}
        members = [members[j] for j, r in enumerate(pack.runs) if j not in pack.failed and r.active(until)]
    failed |= {members[j]: e for j, e in alone([runs[i] for i in members], until).items()}
    return failed
