"""What a study will cost before it runs (`transferbench plan`): per arm, the cells, the SGD runs (LR candidates
included), optimizer steps and training images before early stopping (which only shortens a run); and how full
the runner's packs would be on a GPU (copies per pack step). Nothing is trained or loaded but the datasets' class
lists."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import cast

from transferbench.core.study import Cell, Study, tuning_label
from transferbench.sweep.planning import depth_group_count, lr_phases, num_classes, pack_groups


@dataclass(frozen=True)
class CellCost:
    runs: int  # SGD runs: its LR candidates, or one at another seed's choice (lr_from_seed)
    first: int  # steps of the LR race (0: no race)
    total: int  # the winner's budget in optimizer steps
    batches: tuple[int, ...]  # the sizes of an epoch's batches, in order

    @property
    def steps(self) -> int:
        return self.total + (self.runs - 1) * self.first

    @property
    def images(self) -> int:
        """Examples seen: every run starts an epoch at its first step (the losers stop at the end of the race)."""
        return self.seen(self.total) + (self.runs - 1) * self.seen(self.first)

    def seen(self, steps: int) -> int:
        whole, part = divmod(steps, len(self.batches))
        return whole * sum(self.batches) + sum(self.batches[:part])


def cell_cost(cell: Cell) -> CellCost | None:
    """A cell's SGD training as cell.CellTraining plans it, before early stopping; None for a closed-form cell
    (pixels, L-BFGS probe). A cell that reuses another seed's LR counts one run (it races if that cell failed)."""
    from transferbench.training.loop import batch_bounds, budget, race_steps

    if cell.arm == "pixels" or cell.solver == "lbfgs":
        return None
    n = cell.n_per_class * num_classes(cell)
    batches = tuple(j - i for i, j in batch_bounds(n, min(cell.batch_size, n)))
    total, _ = budget(cell, len(batches))
    runs = 1 if cell.lr_from_seed is not None else len(cell.lrs or [cell.lr])
    return CellCost(runs, race_steps(total) if runs > 1 else 0, total, batches)


# The runner's progress bar weighs cells by their work, in images through the whole network: an SGD cell's planned
# images times the share of depth groups it trains (a frozen prefix is cached, so its cost is mostly the suffix),
# plus a fixed cost per cell (data, model, evaluation). Fitted on the recorded smoke and which_layers runs (1.7 ms
# per whole-network image, 1.3 s per cell: 800 images) and checked on domain_gap, which it was not fitted on
# (docs/measurements.md). Counting cells instead put the ETA 70% short at a tenth of domain_gap.
CELL_OVERHEAD = 800
HEAD_ONLY = 0.01  # a linear probe by SGD trains the head alone: about 1% of full fine-tuning's time per image


def cell_work(cell: Cell) -> float:
    """A cell's expected wall time in units of one image through the whole network (see CELL_OVERHEAD)."""
    k = cell_cost(cell)
    if k is None:
        return CELL_OVERHEAD
    return k.images * max(trained_share(cell), HEAD_ONLY) + CELL_OVERHEAD


def trained_share(cell: Cell) -> float:
    """The share of the backbone's depth groups a cell trains (0 for a linear probe)."""
    from transferbench.models.backbones import trained_groups

    n = depth_group_count(cell.model)
    return len(trained_groups(cell.frozen_depth, cell.train_groups, n)) / n


def arm_of(cell: Cell) -> str:
    """The arm as tables name it ('transfer frozen 6', 'transfer groups 7', 'transfer LP-FT', 'scratch')."""
    if cell.arm != "transfer":
        return cell.arm
    from transferbench.models.backbones import resolve_groups
    from transferbench.training.schedules import recipe

    groups = cell.train_groups
    trained = resolve_groups(groups, depth_group_count(cell.model)) if groups is not None else None
    return "transfer " + tuning_label(cell.frozen_depth, trained, recipe(cell.schedule).get("arm"))


def shed(steps: list[int], refill: float) -> tuple[int, int]:
    """(pack steps, steps of the run finished alone) of runs of these lengths in one pack that sheds its stopped
    copies as packed.train_pack does: repacked when fewer than `refill` of its copies are active, a last run alone."""
    left, taken = sorted(s for s in steps if s > 0), 0
    while len(left) > 1:
        until = left[len(left) - max(2, math.ceil(refill * len(left)))]  # fewer than that many active after it
        taken += until
        left = [s - until for s in left if s > until]
    return taken, left[0] if left else 0


def gpu_packing(cells: list[Cell], most: int, refill: float = 0.75) -> tuple[int, int]:
    """(run-steps trained in packs, pack steps) of the runner's tasks on a GPU: each task's LR races (the
    candidates of its cells with one race length, in packs of at most `most`), then its winners to their budgets.
    As if every run of a task shared one shape (packed.signature may split a few more: runs at different offsets of
    an epoch whose last batch is short, such as scratch and fine-tuning winners after races of different lengths)."""
    from transferbench.training.packed import chunks

    in_packs = taken = 0
    for phase in lr_phases(cells):
        for task in pack_groups([c for c in phase if cell_cost(c)], most):
            costs = [cast(CellCost, cell_cost(c)) for c in task]  # not None: closed-form cells are left out above
            groups = [[first] * sum(k.runs for k in costs if k.first == first)
                      for first in sorted({k.first for k in costs if k.first})]
            for steps in groups + [[k.total - k.first for k in costs]]:
                for chunk in chunks(steps, most):
                    if len(chunk) > 1:
                        pack, alone = shed(chunk, refill)
                        taken, in_packs = taken + pack, in_packs + sum(chunk) - alone
    return in_packs, taken


def plan_table(study: Study, cells: list[Cell]) -> str:
    """The cost of a study's cells, as `transferbench plan` prints it."""
    rows: dict[str, list] = {}
    for c in cells:
        k = cell_cost(c)
        row = rows.setdefault(arm_of(c), [0, 0, 0, 0.0, k is None])
        row[0] += 1
        if k:
            row[1], row[2], row[3] = row[1] + k.runs, row[2] + k.steps, row[3] + k.images
    arms = Counter(c.arm for c in cells)
    lines = [f"{study.name}: {len(cells)} cells (" + ", ".join(f"{a} {n}" for a, n in sorted(arms.items())) + ")",
             "SGD training before early stopping (which only shortens runs), LR races included (a cell that reuses "
             "another seed's LR counts one run):",
             f"{'arm':<28}{'cells':>7}{'runs':>8}{'optimizer steps':>17}{'images':>14}"]
    for arm, (n, runs, steps, images, closed) in sorted(rows.items()):
        lines.append(f"{arm:<28}{n:>7}" + (f"{'closed form':>39}" if closed else
                                            f"{runs:>8}{steps:>17,}{images / 1e6:>13.1f}M"))
    total = sum(r[3] for r in rows.values())
    lines.append(f"{'total':<28}{len(cells):>7}{sum(r[1] for r in rows.values()):>8}"
                 f"{sum(r[2] for r in rows.values()):>17,}{total / 1e6:>13.1f}M")
    in_packs, taken = gpu_packing(cells, study.run.pack_size)
    steps = sum(r[2] for r in rows.values())
    if taken:
        lines.append(f"packed on a GPU (run.pack_size {study.run.pack_size}), before early stopping: "
                     f"{in_packs / max(steps, 1):.0%} of the optimizer steps in packs, {in_packs / taken:.1f} copies "
                     "per pack step on average (early stopping empties packs: fewer)")
    return "\n".join(lines)
