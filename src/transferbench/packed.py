"""Many cells per pass: the runs of several cells that share a network shape train as one vmapped model.

`torch.func.vmap(functional_call)` trains every copy on its own batch (x: [copies, batch, ...]), so on a GPU each
layer of all copies runs as one kernel launch instead of one per copy (a small cell is launch-bound), and the
optimizer updates every copy in a handful of kernels over one flat [copies, parameters] tensor. What makes a run
its own stays its own: its data order (its seed), LR and schedule (read each step from the run's own torch
optimizer, which its scheduler drives and the pack never steps), AdamW or SGD state (handed back to that optimizer
in torch's own format, so a run can leave a pack and go on alone or in another pack), early stopping, validation
(precise BN and evaluation on the run's own module, into which the pack first writes its copy), best weights and
curves: `train.Run` does all of that, the pack only replaces its optimizer step. BatchNorm is exact per copy.

Equivalence with separate training is tested in float64 on CPU (tests/test_packed.py); the runner packs only on
CUDA: on 2 CPU cores vmap over 6 lite0 copies ran at 0.93x the speed of separate steps (nothing to gain there).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, SelectAdaptivePool2d
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .train import Diverged, batch_bounds


def batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in plain tensor operations, as F.batch_norm computes it (biased variance to normalise, unbiased into
    the running average): F.batch_norm on CUDA asks the input's memory format, which vmap cannot answer."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    if bn.training:
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        if bn.track_running_stats:
            n = x.numel() / x.shape[1]
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                bn.running_mean.mul_(1 - m).add_(m * mean.detach())
                bn.running_var.mul_(1 - m).add_(m * var.detach() * n / max(n - 1, 1))
    else:
        mean, var = bn.running_mean, bn.running_var
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    return y * bn.weight.view(shape) + bn.bias.view(shape) if bn.affine else y


class VmapBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x):
        return batch_norm(self, x)


class VmapBatchNormAct2d(BatchNormAct2d):
    def forward(self, x):
        return self.act(self.drop(batch_norm(self, x)))


class VmapAvgPool(SelectAdaptivePool2d):
    def forward(self, x):  # adaptive_avg_pool2d has no vmap batching rule (a per-copy fallback): a mean has one
        return self.flatten(x.mean((-2, -1), keepdim=True))


def vmappable(template: nn.Module) -> nn.Module:
    """The template with its BatchNorm layers computed in plain tensor operations (same parameters and buffers) and
    no in-place activations."""
    for m in template.modules():
        if getattr(m, "inplace", False):  # an in-place activation under vmap falls back to a slow per-copy loop
            m.inplace = False
        if type(m) is BatchNormAct2d:
            m.__class__ = VmapBatchNormAct2d
        elif type(m) is nn.BatchNorm2d:
            m.__class__ = VmapBatchNorm2d
        elif type(m) is SelectAdaptivePool2d and m.pool_type == "avg":
            m.__class__ = VmapAvgPool
    return template


class Pack:
    """Runs (train.Run) of one network shape, stepped together. `advance(until)` trains each run to step `until` or
    its early stop with Run's own bookkeeping (Run.after_step); a run whose loss diverges leaves the pack with the
    exception recorded in `failed` (its index), the others go on."""

    def __init__(self, runs: list):
        modules = [r.suffix for r in runs]
        shapes = {tuple((n, tuple(p.shape), p.requires_grad) for n, p in m.named_parameters()) for m in modules}
        if len(shapes) != 1 or len({type(r.step.opt) for r in runs}) != 1:
            raise ValueError("a pack holds runs of one network shape and one optimizer")
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
        self.template = vmappable(copy.deepcopy(modules[0]).to("meta"))
        self.optimizer = PackedOptimizer(self, [r.step.opt for r in runs], [dict(m.named_parameters())
                                                                            for m in modules])

    def grad(self) -> torch.Tensor:
        """Every copy's gradient as one flat [copies, parameters] tensor."""
        return torch.cat([self.params[n].grad.reshape(len(self.runs), -1) for n in self.names], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [copies, batch, classes] of x [copies, batch, ...], each copy on its own batch, in the weights'
        precision: no bf16 autocast inside vmap (BatchNorm's backward then failed on its float32 running statistics,
        torch 2.11 on an H200; TF32 convolutions on the GPU), no channels_last (vmap cannot answer cuDNN's query of
        a batched tensor's layout)."""
        def one(params, fixed, xb):
            return functional_call(self.template, (params, fixed), (xb,))

        return vmap(one)(self.params, self.fixed, x)

    def advance(self, until: int) -> Pack:
        self.template.train()
        while True:
            active = [i for i, r in enumerate(self.runs) if i not in self.failed and r.active(until)]
            if not active:
                break
            batches = {i: self.runs[i].next_batch() for i in active}
            losses = self.step(*self._stack(batches), active)
            for i in active:
                epoch, xb, yb, last = batches[i]
                run = self.runs[i]
                try:
                    run.after_step(losses[i], len(yb), epoch, last, until, sync=lambda i=i: self.write_back(i))
                except Diverged as e:  # it leaves the pack; the rest go on
                    self.failed[i] = e
                if run.steps in run.evals:
                    self.read_back(i)  # the BatchNorm statistics its validation recomputed (precise BN) go on
        for i in range(len(self.runs)):
            self.write_back(i)
        self.optimizer.hand_back()
        return self

    def _stack(self, batches: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Every copy's batch in one tensor; a copy that is not training gets an active copy's batch (its forward
        is wasted work and its update is masked out)."""
        first = next(iter(batches.values()))
        pick = [batches.get(i, first) for i in range(len(self.runs))]
        # contiguous: cuDNN asks a batched tensor's memory format, which vmap cannot answer for channels_last
        return torch.stack([b[1].contiguous() for b in pick]), torch.stack([b[2] for b in pick])

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
                self.runs[i].step.sched.step()  # the run's own schedule sets its next LR
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

    def __init__(self, pack: Pack, opts: list[torch.optim.Optimizer], params: list[dict]):
        self.pack, self.opts, self.kind = pack, opts, type(opts[0]).__name__
        if self.kind not in ("AdamW", "SGD"):
            raise ValueError(f"no packed step for {self.kind}; pack only AdamW or SGD runs")
        group_of = [{id(p): k for k, g in enumerate(o.param_groups) for p in g["params"]} for o in opts]
        self.params = params  # per copy: name -> its module's parameter (where torch keeps its state)
        first = params[0]
        index = [torch.full((size,), group_of[0][id(first[n])], dtype=torch.long)
                 for n, size in zip(pack.names, pack.sizes)]
        self.group_index = torch.cat(index).to(pack.flat.device)  # each element's param group
        g0 = opts[0].param_groups[0]
        self.hyper = {k: g0[k] for k in ("betas", "eps", "momentum", "nesterov") if k in g0}
        shape = pack.flat.shape
        self.t = torch.zeros(shape[0], 1, dtype=pack.flat.dtype, device=pack.flat.device)
        self.m = torch.zeros(shape, dtype=pack.flat.dtype, device=pack.flat.device)
        self.v = torch.zeros_like(self.m) if self.kind == "AdamW" else None
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
        """One update of the copies in `mask` ([copies, 1]); `every`: all of them (the usual case: no masking)."""
        p, g = self.pack.flat, self.pack.grad()
        keep = (lambda new, old: new) if every else (lambda new, old: torch.where(mask, new, old))  # noqa: E731
        lr = self._per_element("lr") * mask  # the schedules move it every step
        wd = self.weight_decay
        self.t += mask
        if self.kind == "AdamW":
            b1, b2 = self.hyper["betas"]
            p.mul_(1 - lr * wd)
            self.m.copy_(keep(self.m.lerp(g, 1 - b1), self.m))
            self.v.copy_(keep(self.v * b2 + (1 - b2) * g * g, self.v))
            t = self.t.clamp_min(1)
            denom = (self.v.sqrt() / (1 - b2 ** t).sqrt()).add_(self.hyper["eps"])
            p.sub_(lr / (1 - b1 ** t) * self.m / denom)
        else:
            d = g + wd * p
            mom = self.hyper["momentum"]
            if mom:
                self.m.copy_(keep(self.m * mom + d, self.m))
                d = d + mom * self.m if self.hyper["nesterov"] else self.m
            p.sub_(lr * d)

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
                self.v[i] = torch.cat([s["exp_avg_sq"].reshape(-1) for s in states])

    def hand_back(self) -> None:
        """Write each copy's state into its run's torch optimizer, in torch's format."""
        for i, (opt, params) in enumerate(zip(self.opts, self.params)):
            if self.t[i].item() == 0:
                continue
            start = 0
            for n, shape, size in zip(self.pack.names, self.pack.shapes, self.pack.sizes):
                state = opt.state[params[n]]
                if self.kind == "AdamW":  # where torch keeps the step: on the device when fused or capturable
                    on_device = opt.defaults.get("fused") or opt.defaults.get("capturable")
                    state["step"] = torch.tensor(float(self.t[i].item()), device=params[n].device if on_device
                                                 else "cpu")
                    state["exp_avg"] = self.m[i, start:start + size].view(shape).clone()
                    state["exp_avg_sq"] = self.v[i, start:start + size].view(shape).clone()
                else:
                    state["momentum_buffer"] = self.m[i, start:start + size].view(shape).clone()
                start += size


def pack_sizes(n: int, most: int) -> list[int]:
    """Split n into parts of at most `most`, as even as possible."""
    k = -(-n // most) if n else 0
    return [n // k + (j < n % k) for j in range(k)]


def signature(run) -> tuple:
    """What runs must share to be stacked: the trainable layers and their LR groups, the optimizer, the batch shapes
    (examples and batch size decide every batch's size), device, precision and layout."""
    x = run.data["x_train"]
    group_of = {id(p): k for k, g in enumerate(run.step.opt.param_groups) for p in g["params"]}  # layer-wise LRs
    sizes = [j - i for i, j in batch_bounds(len(x), min(run.cell.batch_size, len(x)))]
    where = run.steps % len(sizes) if len(set(sizes)) > 1 else 0  # with a short last batch, runs must be in step
    return (tuple((n, tuple(p.shape), p.requires_grad, group_of.get(id(p))) for n, p in run.suffix.named_parameters()),
            type(run.step.opt).__name__, len(x), min(run.cell.batch_size, len(x)), where, tuple(x.shape[1:]),
            str(x.dtype), str(x.device), run.cell.amp, run.cell.channels_last)


def packed(most: int = 16):
    """An advancer for train.train_together: runs that can share a pack train in packs of at most `most` copies;
    returns {index: error} of the runs that diverged."""
    def advance(runs: list, until: int) -> dict[int, Exception]:
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(runs):
            groups.setdefault(signature(r), []).append(i)
        failed = {}
        for members in groups.values():
            start = 0
            for size in pack_sizes(len(members), most):
                chunk = members[start:start + size]
                start += size
                pack = Pack([runs[i] for i in chunk]).advance(until)
                failed |= {chunk[j]: e for j, e in pack.failed.items()}
        return failed

    return advance
