"""Planning a study: every cell of its grid checked against the registries and the data before anything runs,
and how the runner groups cells (by shared prefix features, by pack shape, by LR phase)."""

from __future__ import annotations

import functools
import json

from transferbench.core.errors import ConfigError, did_you_mean
from transferbench.core.paths import cache_dir, check_writable
from transferbench.core.study import SHARE_FEATURES_ACROSS, SHARE_PACK_ACROSS, Cell, Study


def plan(study: Study) -> list[Cell]:
    """Every cell of the grid, after checking each name and range against what exists."""

    from transferbench.data import DATASETS, SHIFTS
    from transferbench.models.backbones import (
        WEIGHTS,
        check_model_name,
        create_backbone,
        resolve_depth,
        resolve_groups,
        trained_here,
        weight_source,
    )
    from transferbench.sweep.memory import check_fits
    from transferbench.training.schedules import OPTIMIZERS, SCHEDULES
    from transferbench.training.source import cells_of, source_cell

    check_device(study.train.device)
    check_writable(cache_dir(), "TRANSFERBENCH_CACHE", "point TRANSFERBENCH_CACHE at a writable folder (data, "
                   "features and sources are cached there) or fix its permissions")
    for i, t in enumerate(study.targets):
        DATASETS.get(t.dataset, f"targets.{i}.dataset")
        if t.shift:
            SHIFTS.get(t.shift, f"targets.{i}.shift")
    for i, s in enumerate(study.grid.schedule):
        SCHEDULES.get(s.name, f"grid.schedule.{i}.name")
        if SCHEDULES.meta(s.name).get("arm"):
            raise ConfigError(f"grid.schedule.{i}.name", f"'{s.name}' is a fine-tuning recipe, an arm of its own",
                              f"list it under grid.recipes: [{s.name}]")
    for i, r in enumerate(study.grid.recipes):
        SCHEDULES.get(r, f"grid.recipes.{i}")
        if not SCHEDULES.meta(r).get("arm"):
            recipes = [n for n, _ in SCHEDULES.items() if SCHEDULES.meta(n).get("arm")]
            raise ConfigError(f"grid.recipes.{i}", f"'{r}' is a plain schedule, not a recipe",
                              f"list it under grid.schedule, or use a recipe: {', '.join(recipes)}")
    OPTIMIZERS.get(study.train.optimizer, "train.optimizer")
    schedules, models = [s.name for s in study.grid.schedule], [b.model for b in study.backbones]
    for i, t in enumerate(study.targets):  # a target's own arms are picked from the study's
        for field, picked, known in (("schedule", t.schedule, schedules), ("backbones", t.backbones, models)):
            for v in picked or []:
                if v not in known:
                    raise ConfigError(f"targets.{i}.{field}", f"'{v}' is not in the study's {field}",
                                      did_you_mean(v, known))
            if picked is not None and not picked:
                raise ConfigError(f"targets.{i}.{field}", "an empty list trains nothing", f"name some of {known}")
    for i, b in enumerate(study.backbones):
        check_model_name(b.model)
        if trained_here(b.weights):
            source_cell(study, b.model, b.weights.split(":", 1)[1])  # the source dataset must exist
        elif not WEIGHTS.meta(weight_source(b.weights)).get("needs_network"):  # those are checked when a cell runs
            try:  # loaded into the model as a cell would (a file that does not fit is refused here, not per cell)
                create_backbone(b.model, b.weights, num_classes=2, seed=0)
            except ConfigError as e:
                raise e.at(f"backbones.{i}.weights") from None
        n_groups = depth_group_count(b.model)
        for d in study.grid.frozen_depth:
            resolve_depth(d, n_groups, field=f"grid.frozen_depth (backbones.{i}: {b.model})")
        for j, t in enumerate(study.targets):
            for d in t.frozen_depth or []:
                resolve_depth(d, n_groups, field=f"targets.{j}.frozen_depth (backbones.{i}: {b.model})")
        for groups in study.grid.train_groups:
            resolve_groups(groups, n_groups, field=f"grid.train_groups (backbones.{i}: {b.model})")
    images = {t.condition: check_target(study, i, t) for i, t in enumerate(study.targets)}
    check_fits(images, [b.model for b in study.backbones], study.train.batch_size, study.train.image_size)
    return cells_of(study)


def check_target(study: Study, i: int, t) -> int:
    """The target's data exists, has at least two classes and enough images per class for the sizes asked; its
    number of images (every split)."""
    from transferbench.data import class_counts, load_raw

    try:
        raw = load_raw(t.dataset, t.options)
    except ConfigError as e:  # the data layer names `targets.options...`; the user needs to know which target
        raise e.at(e.field.replace("targets.", f"targets.{i}.", 1) if e.field.startswith("targets.") else e.field) \
            from None
    if len(raw.classes) < 2:
        raise ConfigError(f"targets.{i}", f"'{t.label}' has {len(raw.classes)} class(es) {raw.classes}: a "
                          "classification target needs at least 2", "add a class folder, or choose another target")
    counts = class_counts(raw.splits["train"][1])
    smallest = min(counts.get(c, 0) for c in range(len(raw.classes)))  # a class absent from train counts as 0
    for field, sizes in ((f"targets.{i}.n_per_class" if t.n_per_class else "grid.n_per_class",
                          t.n_per_class or study.grid.n_per_class), ("scratch.curve", study.scratch.curve)):
        too_big = [n for n in sizes if n > smallest]
        if too_big:
            raise ConfigError(field, f"{too_big} examples per class asked, but '{t.label}' holds only {smallest} in "
                              "its smallest class", f"use sizes up to {smallest}" if smallest
                              else "give every class enough images for its train split")
    return sum(len(labels) for _, labels in raw.splits.values())


def check_device(device: str) -> None:
    """`device: cuda` where no CUDA device is visible is refused at planning, not cell by cell."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda asked for, but no CUDA device is visible on this machine",
                          "use device: auto (CUDA when present, else CPU) or cpu")


@functools.cache
def depth_group_count(model_name: str) -> int:
    """How many depth groups the model has (an untrained instance is built once per process to count them)."""
    import timm

    from transferbench.models.backbones import depth_groups

    return len(depth_groups(timm.create_model(model_name, pretrained=False)))


def num_classes(cell: Cell) -> int:
    """The classes of a cell's target (read once per dataset and options)."""
    return _classes(cell.dataset, json.dumps(cell.data_options, sort_keys=True))


@functools.cache
def _classes(dataset: str, options: str) -> int:
    from transferbench.data import load_raw

    return len(load_raw(dataset, json.loads(options)).classes)


def packs(study: Study) -> bool:
    """Whether this run packs cells: run.pack, where auto means on CUDA only."""
    if study.run.pack != "auto":
        return study.run.pack == "always"
    from transferbench.models.device import resolve_device

    return resolve_device(study.train.device).type == "cuda"


def lr_phases(cells: list[Cell]) -> list[list[Cell]]:
    """The cells that choose their LR, then those that reuse another seed's choice (lr_from_seed): run in that
    order, so that every reuse reads a finished record."""
    return [[c for c in cells if c.lr_from_seed is None], [c for c in cells if c.lr_from_seed is not None]]


def chosen_lr(cell: Cell, records: dict[str, dict]) -> float | None:
    """The LR this cell takes from another seed's cell (lr_from_seed), if that cell finished; else None (it races)."""
    source = records.get(cell.lr_source_id) if cell.lr_source_id else None
    return source.get("lr_chosen") if source and source.get("status") == "ok" else None


def feature_groups(cells: list[Cell]) -> list[list[Cell]]:
    """Cells grouped by what their frozen prefix computes (weights, depth, target condition: every field but those in
    SHARE_FEATURES_ACROSS)."""
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:  # same_fields decides the groups; the fields before it only set the order they run in
        key = (c.model, c.weights, c.dataset, str(c.shift), c.severity, str(c.frozen_depth), str(c.train_groups), c.arm,
               same_fields(c, SHARE_FEATURES_ACROSS))
        groups.setdefault(key, []).append(c)
    return [sorted(g, key=lambda c: (c.n_per_class, c.schedule, c.seed)) for _, g in sorted(groups.items())]


def same_fields(cell: Cell, across: frozenset[str]) -> str:
    """The cell's fields but those cells may differ in (`across`), as text: equal for cells that may share work."""
    return json.dumps(cell.model_dump(exclude=set(across)), sort_keys=True, default=str)


def pack_groups(cells: list[Cell], most: int) -> list[list[Cell]]:
    """Tasks of at most `most` cells that can share packs: one network shape (model, trainable layers, examples per
    class and classes: the batch and head shapes), solver and LR grouping (layer-wise decay gives each depth its
    own LR group); they differ in arm (scratch and full fine-tuning share a shape), weights, target condition,
    schedule, LR and seed (packed.signature decides the exact packs). Grouped by shape first, so that a task does
    not hold a few cells of one shape beside a few of another (each a pack of its own). A task writes its records
    when it ends, so tasks stay about one pack large."""
    from transferbench.training.packed import chunks
    from transferbench.training.schedules import recipe

    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        key = (c.arm == "pixels", c.model, str(c.frozen_depth), str(c.train_groups), c.n_per_class, num_classes(c),
               c.solver, bool(recipe(c.schedule).get("layer_decay")), same_fields(c, SHARE_PACK_ACROSS))
        groups.setdefault(key, []).append(c)
    return [task for _, g in sorted(groups.items())
            for task in chunks(sorted(g, key=lambda c: (c.arm, c.dataset, str(c.shift), c.severity, c.schedule,
                                                        c.seed)), most)]
