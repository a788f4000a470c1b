"""Study file (YAML) + dotted overrides -> validated Study -> list of Cells; and the resolved study a results folder
keeps (study.resolved.yaml: saved before training, read back by report, plan --reference and advise).

Pure: no torch here. Names that need a registry (datasets, shifts, schedules, backbones) are
checked by `planning.plan`, which knows the registries.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
import stat
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PlainValidator,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from transferbench.core import atomic
from transferbench.core.errors import ConfigError, did_you_mean
from transferbench.core.paths import results_subfolder


def _depth(value: Any) -> int | str:
    """A frozen depth: a number of groups (0, 1, ...) or 'all'; one error message, not one per union member."""
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(f"a frozen depth is a number of groups frozen (0 = fine-tune everything) or 'all', not {value!r}")


Depth = Annotated[int | Literal["all"], PlainValidator(_depth)]

# Names that become folders or labels: plain identifiers, so no `../`, no `/`, no markup.
IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # always fullmatch: `$` also matches before "\n"
MAX_STUDY_BYTES = 1 << 20  # a study file is a page of YAML; anything larger is refused unread
MAX_YAML_NODES = 100_000  # nodes after alias expansion: a "billion laughs" file is refused, not expanded
MAX_STEPS, MAX_EPOCHS = 1_000_000, 10_000  # budgets beyond these are typos, and planning one would fill memory
MAX_VALIDATIONS = 100_000  # validations per cell (a scratch budget at a large factor with eval_every: 1)
MAX_SEED = 2**32 - 1  # numpy's and torch's generators take it, and it stays an int64 in every table
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def _identifier(value: str, what: str) -> str:
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a plain identifier; use letters, digits, '_' and '-' "
                         "(at most 64, starting with a letter or digit)")
    return value


class Strict(BaseModel):
    # No inf or nan anywhere: a float field is a finite number (`lr: .inf` and `budget_factor: .nan` are refused).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BackboneSpec(Strict):
    model: str = Field(description="timm model name, e.g. tf_efficientnet_lite0")
    weights: str = Field("imagenet", description="'imagenet' (bundled), 'none', 'hub', or a .pth/.safetensors path")

    @field_validator("weights")
    @classmethod
    def _one_line(cls, v):  # a weights path reaches report lines, table cells and figure legends as it is
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in v):
            raise ValueError(f"{v!r} holds a control character (a line break, a tab); rename the file")
        return v


class TargetSpec(Strict):
    dataset: str
    name: str | None = Field(None, description="label in tables and figures; default: the dataset, or the folder of "
                             "a `path`/`root` option (e.g. imagefolder)")
    shift: str | None = None
    severity: int = Field(0, ge=0, le=5)
    options: dict[str, Any] = Field(default_factory=dict, description="dataset options, e.g. "
                                                                      "{root: data/, download: true}")
    n_per_class: list[PositiveInt] | None = Field(None, description="this target's sizes, instead of grid.n_per_class")
    frozen_depth: list[Depth] | None = Field(None, description="this target's frozen depths, instead of "
                                             "grid.frozen_depth (a fractional design: the full grid on a few anchor "
                                             "targets, fewer arms across the rest)")
    schedule: list[str] | None = Field(None, description="this target's schedules, a subset of grid.schedule's names")
    backbones: list[str] | None = Field(None, description="the backbones (models) trained on this target, a subset of "
                                        "the study's; default: all")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v):
        return v if v is None else _identifier(v, "target name")

    @model_validator(mode="after")
    def _shift_needs_severity(self):
        if self.shift and self.severity == 0:
            raise ValueError("a shift needs a severity from 1 to 5")
        if self.severity and not self.shift:
            raise ValueError("severity given without a shift; name one, e.g. shift: gaussian_noise")
        return self

    @property
    def label(self) -> str:
        return self.name or default_label(self.dataset, self.options)

    @property
    def condition(self) -> str:
        return condition_name(self.label, self.shift, self.severity)


def default_label(dataset: str, options: dict) -> str:
    """A folder-based target is named by its folder: two ImageFolders are never both "imagefolder". (Not by a
    download `root`: torchvision datasets share one, and each is its dataset.) A label reaches file names, markdown
    tables, figure text and HTML, so the folder's name is made a plain identifier: every other character becomes
    '_' ('my photos|v2' -> 'my_photos_v2'); give the target a `name:` to choose another."""
    folder = options.get("path")
    return as_identifier(Path(str(folder)).resolve().name) if folder else dataset


def as_identifier(text: str) -> str:
    """`text` as a plain identifier (IDENTIFIER): unsafe characters become '_', at most 64 characters."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", text)[:64]
    return name if IDENTIFIER.fullmatch(name) else ("x" + name)[:64]


def condition_name(label: str, shift: str | None, severity: int) -> str:
    return label + (f"+{shift}@{severity}" if shift else "")


class ScheduleSpec(Strict):
    name: str
    lr: PositiveFloat | None = Field(None, description="base LR; defaults to train.lr")


def _unique(values: list, what: str) -> list:
    seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
    dupes = sorted({s for s in seen if seen.count(s) > 1})
    if dupes:
        raise ValueError(f"duplicate {what} values {dupes}; list each once")
    if not values:
        raise ValueError(f"empty {what} list; give at least one value")
    return values


class Grid(Strict):
    frozen_depth: list[Depth] = Field(description="groups frozen from the input side; 0 = fine-tune all, 'all' = "
                                                  "linear probe")
    n_per_class: list[PositiveInt] = Field(description="labelled target examples per class")
    train_groups: list[list[int]] = Field(default_factory=list, description="more transfer arms, each training only "
                                          "these depth groups and the head (0 = the first group, -1 = the last); the "
                                          "other groups stay frozen, their BatchNorm statistics too (surgical "
                                          "fine-tuning)")
    recipes: list[str] = Field(default_factory=list, description="more transfer arms: full fine-tuning by a recipe "
                               "registered in the schedule registry (lp_ft: linear probe first, then fine-tune; "
                               "cosine_llrd: layer-wise LR decay); an arm of its own, not a schedule chosen on val")
    schedule: list[ScheduleSpec]
    seed: list[Seed]
    per_target: bool = Field(True, description="honour each target's own n_per_class, frozen_depth, schedule and "
                             "backbones (a fractional design); false: every target takes the whole grid (the full "
                             "cross product, e.g. in a GPU profile)")

    @field_validator("schedule", mode="before")
    @classmethod
    def _names_as_specs(cls, v):
        return [{"name": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v

    @field_validator("frozen_depth", "n_per_class", "schedule", "seed")
    @classmethod
    def _no_dupes(cls, v, info):
        values = [s.name if isinstance(s, ScheduleSpec) else s for s in v]  # a schedule name is its identity
        return _unique(values, info.field_name) and v

    @field_validator("train_groups", "recipes")
    @classmethod
    def _no_dupes_if_any(cls, v, info):
        for groups in v if info.field_name == "train_groups" else []:
            if not groups or len(set(groups)) != len(groups):
                raise ValueError(f"train_groups entry {groups} must name each group once, at least one")
        return _unique(v, info.field_name) if v else v  # optional axes: empty is allowed


class Train(Strict):
    epochs: PositiveInt = Field(10, le=MAX_EPOCHS, description="the budget in epochs, where `steps` is not given")
    steps: PositiveInt | None = Field(None, le=MAX_STEPS, description="the budget in optimizer steps, the same for "
                                      "every transfer cell whatever its size (VTAB-1k: 2,500); overrides epochs")
    min_steps: NonNegativeInt = Field(0, description="early stopping never fires before this step")
    eval_every: PositiveInt | None = Field(None, description="steps between validations (default: a 20th of `steps`)")
    patience: NonNegativeInt = Field(5, description="validations without a better val accuracy before stopping "
                                     "early (0 = never); the best-validation weights are the ones tested")
    precise_bn: bool = Field(True, description="recompute BatchNorm statistics on the training subset before each "
                             "evaluation (running averages of a short run are mostly their initial values)")
    probe: Literal["lbfgs", "sgd"] = Field("lbfgs", description="linear probe: logistic regression fitted to "
                                           "convergence with its L2 strength chosen on val, or the SGD loop")
    lrs: list[PositiveFloat] | None = Field(None, min_length=1, description="LR candidates for the transfer arm "
                                            "(and scratch, unless scratch.lrs); default: the schedule's lr (or "
                                            "train.lr)")
    lr_search: Literal["halving", "first_seed", "grid"] = Field(
        "halving", description="halving: inside each cell, the candidates race for the first fifth of the budget and "
        "the best on validation goes on; first_seed: that race only in the first seed's cell of each grid point, the "
        "other seeds train at its choice (one race per point, not one per seed); grid: one cell per LR, chosen on "
        "mean validation over seeds")
    batch_size: PositiveInt = 32
    image_size: PositiveInt = 32
    lr: PositiveFloat = 1e-3
    optimizer: str = Field("adamw", description="a registered optimizer (schedules.OPTIMIZERS): adamw, sgd")
    weight_decay: NonNegativeFloat = 0.01
    augment: bool = Field(False, description="flip+crop each batch; cells with frozen layers then pay full price (no "
                                             "cache)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = True
    eval_at: Literal["epoch", "log"] = Field("log", description="val after every epoch, or at epochs 1, 2, 4, ... and "
                                                                "the last")


    @property
    def validation_every(self) -> int | None:
        """Steps between validations: `eval_every`, else a 20th of the step budget (None with an epoch budget)."""
        return self.eval_every or (max(1, self.steps // 20) if self.steps else None)

    @property
    def keeps_best(self) -> bool:
        """Whether cells test their best-validation weights (with early stopping or a step budget)."""
        return self.patience > 0 or self.steps is not None

class Pretraining(Strict):
    """Budget of `weights: pretrain:<dataset>` sources: scratch training on the source's whole train split."""

    epochs: PositiveInt = 15
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 0.01
    schedule: str = "cosine"
    augment: bool = False
    seed: Seed = 0


class Scratch(Strict):
    enabled: bool = True
    lr: PositiveFloat | None = Field(None, description="base LR for scratch cells; defaults to each schedule's")
    lrs: list[PositiveFloat] | None = Field(None, min_length=1, description="scratch's own LR candidates (chosen on "
                                            "validation)")
    budget_factor: PositiveFloat = Field(1.0, le=100, description="scratch's budget relative to transfer's (He, "
                                         "Girshick & Dollar 2019: scratch catches up with longer schedules)")
    curve: list[PositiveInt] = Field(default_factory=list, description="more sizes (examples per class) at which "
                                     "scratch and the pixel baselines alone train, to draw scratch's learning curve: "
                                     "the effective data transferred reads transfer's accuracy off it")


class Baselines(Strict):
    """Trivial baselines on raw pixels of the same k-shot subsets: every comparison shows them beside its arms."""

    methods: list[Literal["nearest_centroid", "logistic_pixels"]] = ["nearest_centroid", "logistic_pixels"]


class Run(Strict):
    max_cells: PositiveInt = Field(100_000, description="a larger grid is refused before it is planned")
    jobs: PositiveInt = 2
    threads_per_worker: PositiveInt = 1
    backend: Literal["loky", "dask", "sequential"] = "loky"
    pack: Literal["auto", "always", "never"] = Field("auto", description="train cells of one network shape together "
                                                     "as one model, their copies stacked along the channels: auto = "
                                                     "on CUDA only (on CPU packing is slower), always, never")
    pack_size: PositiveInt = Field(16, description="most cells' runs in one pack")
    scheduler: str | None = Field(None, description="dask scheduler address (backend: dask)")


class Analysis(Strict):
    n_bootstrap: PositiveInt = Field(2000, description="bootstrap resamples for the estimators' rank correlations")
    confidence: float = Field(0.95, gt=0, lt=1, description="of the t-intervals of gains over seeds")
    fdr: float = Field(0.05, gt=0, lt=1, description="Benjamini-Hochberg level across the study's grid points")
    min_effect: NonNegativeFloat = Field(0.01, description="smallest |gain| (accuracy) a verdict may call positive or "
                                                           "negative")


class Study(Strict):
    name: str
    description: str = ""
    backbones: list[BackboneSpec]
    targets: list[TargetSpec] = Field(description="ordered from near the source to far from it")
    grid: Grid
    train: Train = Train()
    scratch: Scratch = Scratch()
    baselines: Baselines = Baselines()
    pretraining: Pretraining = Pretraining()
    run: Run = Run()
    analysis: Analysis = Analysis()
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict, description="named override sets")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v):
        return _identifier(v, "study name")

    @field_validator("backbones", "targets")
    @classmethod
    def _no_dupes(cls, v, info):
        return _unique([s.model_dump() for s in v], info.field_name) and v

    @field_validator("targets")
    @classmethod
    def _distinct_names(cls, v):
        names = [t.condition for t in v]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise ValueError(f"two targets are both named {clash}; give each a distinct `name:`")
        return v

    @model_validator(mode="after")
    def _bounded_validations(self):
        t, longest = self.train, math.ceil((self.train.steps or 0) * max(1.0, self.scratch.budget_factor))
        if t.steps and longest / t.validation_every > MAX_VALIDATIONS:
            raise ValueError(f"a cell of {longest:,} steps validated every {t.validation_every} would validate more "
                             f"than {MAX_VALIDATIONS:,} times; raise train.eval_every or lower the budget")
        return self

    @model_validator(mode="after")
    def _bounded_grid(self):
        if n_cells(self, most=self.run.max_cells) > self.run.max_cells:
            raise ValueError(f"the grid has more than {self.run.max_cells:,} cells, above run.max_cells = "
                             f"{self.run.max_cells:,}; shrink an axis or raise run.max_cells")
        return self


def n_cells(study: Study, most: int | None = None) -> int:
    """The number of cells `expand` makes, counted from the same fields without building the cells; counting stops
    past `most` (a grid of a trillion cells is refused after `most` + 1, not enumerated)."""
    seen: set[bytes] = set()
    for fields in cell_fields(study):
        seen.add(hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).digest())
        if most is not None and len(seen) > most:
            break
    return len(seen)


def probe_by_lbfgs(study: Study) -> bool:
    """A linear probe on fixed features is convex: solved to convergence, not by the SGD loop (not with augmentation,
    whose features change every step)."""
    return study.train.probe == "lbfgs" and not study.train.augment


def lr_settings(study: Study, candidates: list[float], seed: int) -> list[dict]:
    """The LR fields of the cells for these candidates: one cell racing them all (halving; with first_seed, the other
    seeds' cells take the first seed's choice), or one cell each (grid)."""
    search, first = study.train.lr_search, min(study.grid.seed)
    if len(candidates) > 1 and search in ("halving", "first_seed"):
        reuse = dict(lr_from_seed=first) if search == "first_seed" and seed != first else {}
        return [dict(lr=0.0, lrs=list(candidates)) | reuse]
    return [dict(lr=lr) for lr in candidates]


def recipe_specs(g: Grid) -> list[ScheduleSpec]:
    """Recipes as schedules (a recipe names a registered schedule) at the train LRs."""
    return [ScheduleSpec(name=r) for r in g.recipes]


def transfer_lrs(study: Study, schedule: ScheduleSpec) -> list[float]:
    t = study.train
    return t.lrs or [schedule.lr or t.lr]


def scratch_lrs(study: Study, schedule: ScheduleSpec) -> list[float]:
    s, t = study.scratch, study.train
    return s.lrs or t.lrs or [s.lr or schedule.lr or t.lr]


class Cell(Strict):
    """One point of the grid and one seed: everything that decides its numbers."""

    arm: Literal["transfer", "scratch", "pixels"]
    model: str
    weights: str
    dataset: str
    shift: str | None
    severity: int
    frozen_depth: Depth
    n_per_class: int
    schedule: str
    lr: float
    seed: int
    epochs: int
    batch_size: int
    image_size: int
    optimizer: str
    weight_decay: float
    augment: bool
    device: str
    amp: bool
    channels_last: bool
    # A field with a default enters the id only when set otherwise, so adding one keeps every id.
    eval_at: Literal["epoch", "log"] = "log"
    data_options: dict[str, Any] = Field(default_factory=dict)
    target_name: str | None = None  # set only where the target's label is not its dataset's name
    # The training protocol. Defaults are the epoch-budget protocol's (final weights, running BN statistics), so
    # those cells keep their ids; studies set the protocol explicitly.
    steps: int | None = None
    min_steps: int = 0
    eval_every: int | None = None
    patience: int = 0
    precise_bn: bool = False
    keep_best: bool = False
    solver: Literal["sgd", "lbfgs"] = "sgd"
    lrs: list[float] | None = None  # LR candidates raced inside the cell (successive halving); `lr` is then 0
    lr_from_seed: int | None = None  # train at the LR this seed's cell of the same point chose (raced if none)
    train_groups: list[int] | None = None  # only these depth groups (and the head) train; None: all after the prefix

    @property
    def cell_id(self) -> str:
        return cell_hash(self.model_dump(exclude_defaults=True))

    @property
    def lr_source_id(self) -> str | None:
        """The cell whose LR choice this one reuses (lr_from_seed), or None."""
        if self.lr_from_seed is None:
            return None
        return self.model_copy(update=dict(seed=self.lr_from_seed, lr_from_seed=None)).cell_id

    @property
    def condition(self) -> str:
        return condition_name(self.target_name or self.dataset, self.shift, self.severity)


def depth_label(frozen_depth, arm: str = "transfer") -> str:
    if arm == "scratch":
        return "scratch"
    return "probe (all)" if str(frozen_depth) == "all" else f"frozen {frozen_depth}"


def tuning_label(frozen_depth, trained: list[int] | None = None, recipe: str | None = None) -> str:
    """A transfer arm as tables name it: which layers train ('frozen 6', 'probe (all)', 'groups 0' for
    train_groups) and by which recipe ('LP-FT', or 'LP-FT (frozen 6)' beside a frozen prefix)."""
    layers = depth_label(frozen_depth) if trained is None else "groups " + "+".join(map(str, trained))
    if not recipe:
        return layers
    return recipe if layers == "frozen 0" else f"{recipe} ({layers})"


def cell_hash(config: dict) -> str:
    """The one way a cell's config is hashed (its id)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def machine_protocol(t: Train) -> dict:
    """The Cell fields every cell of a study takes from `train` as they are, pretraining sources included."""
    return dict(image_size=t.image_size, optimizer=t.optimizer, weight_decay=t.weight_decay, device=t.device, amp=t.amp,
                channels_last=t.channels_last, eval_at=t.eval_at)


def expand(study: Study, weights_map: dict[tuple[str, str], str] | None = None) -> list[Cell]:
    """The grid as cells, in `cell_fields`' order, each once (the scratch cells of one model are shared by its
    backbones). `weights_map` renames weight sources (`pretrain:glyphs` -> `pretrain:glyphs:<hash>`)."""
    cells: dict[str, Cell] = {}
    for fields in cell_fields(study, weights_map):
        c = Cell(**fields)
        cells.setdefault(c.cell_id, c)
    return list(cells.values())


def cell_fields(study: Study, weights_map: dict[tuple[str, str], str] | None = None) -> Iterator[dict]:
    """Every cell of the grid as its fields, repeats included: every transfer cell at each of its LR candidates, the
    matched scratch cells (same architecture, nothing frozen, no weights, their own LR candidates and budget), and
    the pixel baselines of each k-shot subset; the grid's plain axes (`cell_axes`) cross every trained cell. The
    one expansion: `expand` builds these cells and `n_cells` counts them."""
    t, g = study.train, study.grid
    weights_map = weights_map or {}
    protocol = machine_protocol(t) | dict(
        epochs=t.epochs, batch_size=t.batch_size, augment=t.augment, steps=t.steps, min_steps=t.min_steps,
        eval_every=t.validation_every, patience=t.patience, precise_bn=t.precise_bn, keep_best=t.keeps_best)
    factor = study.scratch.budget_factor
    scratch_budget = dict(steps=math.ceil(t.steps * factor) if t.steps else None,
                          epochs=t.epochs if t.steps else math.ceil(t.epochs * factor))
    lbfgs = probe_by_lbfgs(study)
    axes = [dict(zip(cell_axes(), values)) for values in itertools.product(*(getattr(g, a) for a in cell_axes()))]
    for bb, tg in itertools.product(study.backbones, study.targets):
        own = tg if g.per_target else TargetSpec(dataset=tg.dataset)  # a fractional design, or the whole grid
        if own.backbones is not None and bb.model not in own.backbones:
            continue
        weights = weights_map.get((bb.model, bb.weights), bb.weights)
        sizes = own.n_per_class or g.n_per_class
        depths = g.frozen_depth if own.frozen_depth is None else own.frozen_depth
        schedules = [s for s in g.schedule if own.schedule is None or s.name in own.schedule]
        curve_only = [n for n in study.scratch.curve if n not in sizes]
        for n, seed in itertools.product(sizes + curve_only, g.seed):
            data = dict(dataset=tg.dataset, shift=tg.shift, severity=tg.severity, n_per_class=n, seed=seed,
                        data_options=tg.options, target_name=tg.label if tg.label != tg.dataset else None)
            transfer = dict(arm="transfer", model=bb.model, weights=weights, **data, **protocol)
            on_grid = n in sizes  # a curve-only size trains scratch and the pixel baselines, no transfer arm
            for axis, sch in itertools.product(axes, schedules):
                arms = [dict(frozen_depth=d) for d in depths if not (d == "all" and lbfgs)] + \
                    [dict(frozen_depth=0, train_groups=groups) for groups in g.train_groups] if on_grid else []
                for arm, lr in itertools.product(arms, lr_settings(study, transfer_lrs(study, sch), seed)):
                    yield dict(schedule=sch.name, **arm, **lr, **axis, **transfer)
                for lr in lr_settings(study, scratch_lrs(study, sch), seed) if study.scratch.enabled else []:
                    yield dict(arm="scratch", model=bb.model, weights="none", frozen_depth=0, schedule=sch.name,
                               **lr, **axis, **data, **(protocol | scratch_budget))  # shared by the model's backbones
            for axis, sch in itertools.product(axes, recipe_specs(g) if on_grid else []):  # an arm of its own
                for lr in lr_settings(study, transfer_lrs(study, sch), seed):
                    yield dict(frozen_depth=0, schedule=sch.name, **lr, **axis, **transfer)
            if "all" in depths and lbfgs and on_grid:  # one convex fit; schedule and LR do not apply
                for axis in axes:
                    yield dict(frozen_depth="all", schedule="lbfgs", lr=0.0, solver="lbfgs", **axis, **transfer)
            for method in study.baselines.methods:  # shared by every backbone
                yield dict(arm="pixels", model=method, weights="none", frozen_depth=0, schedule="none", lr=0.0,
                           **data, **protocol)


def cell_axes() -> list[str]:
    """The grid's plain axes: `Grid` fields marked `cell_axis`, each a list of values of the `Cell` field of its
    name, crossed with every trained arm. Tables key their grid points by them too (analysis.gains.POINT), and
    cells that differ in one never share features or packs (planning), so an axis is declared once, here."""
    return [name for name, f in Grid.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("cell_axis")]


# What cells may differ in and still share work; every other Cell field must be equal, so a new field (a new axis)
# keeps its cells apart until it is listed here.
SHARE_FEATURES_ACROSS = frozenset({  # the frozen prefix's features do not depend on the training of the suffix
    "n_per_class", "seed", "schedule", "lr", "lrs", "lr_from_seed", "solver", "steps", "epochs", "min_steps",
    "eval_every", "patience", "precise_bn", "keep_best", "eval_at", "batch_size", "optimizer", "weight_decay"})
SHARE_PACK_ACROSS = frozenset({  # a pack's runs share a network shape and a loop; each keeps its own data, LR and seed
    "arm", "weights", "dataset", "shift", "severity", "data_options", "target_name", "schedule", "lr", "lrs",
    "lr_from_seed", "seed", "steps", "epochs"})


# ---------------------------------------------------------------- loading ---------------------------------

def _parse_value(text: str):
    try:
        return safe_yaml(text, "override")
    except ConfigError as e:
        if not e.problem.startswith("malformed YAML"):  # an alias bomb or a key given twice is refused, not a string
            raise
        return text


def _is_list(annotation) -> bool:
    """A list field, optional or not (`list[X]`, `list[X] | None`)."""
    origin = typing.get_origin(annotation)
    if origin is list:
        return True
    return origin in (typing.Union, types.UnionType) and any(map(_is_list, typing.get_args(annotation)))


def _known_path(model: type[BaseModel], path: list[str]) -> tuple[str, str] | None:
    """None if `path` names a field of the schema; else (what is wrong, the fix)."""
    cls: Any = model
    for i, key in enumerate(path):
        if _is_list(cls):
            whole = ".".join(path[:i])
            return (f"'{whole}' is a list: one of its entries cannot be overridden",
                    f"replace the whole list, every entry written out, e.g. {whole}='[...]'")
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None  # inside a dict value: the schema validation judges it
        if key not in cls.model_fields:
            return (f"unknown override path: '{'.'.join(path[:i + 1])}' is not a field",
                    did_you_mean(key, cls.model_fields))
        cls = cls.model_fields[key].annotation
    return None


def apply_overrides(raw: dict, overrides: list[str] | dict, source: str = "override") -> dict:
    """Hydra-style `a.b.c=value` (value parsed as YAML) onto a nested dict; unknown paths are refused."""
    out = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    given: list[str] = []
    for path, value in items:
        keys = path.split(".")
        earlier = next((g for g in given if (g + ".").startswith(path + ".") or (path + ".").startswith(g + ".")),
                       None)
        if earlier:  # `train.steps=10 train.steps=1000`, or `train.steps` beside `train: {steps: ...}`
            raise ConfigError(f"{source} {path}", f"overlaps '{earlier}' given before it; the last would silently "
                              "win", "give each field once")
        given.append(path)
        problem = _known_path(Study, keys)
        if problem:
            raise ConfigError(f"{source} {path}", *problem)
        node = out
        for k in keys[:-1]:
            if not isinstance(node.setdefault(k, {}), dict):
                raise ConfigError(f"{source} {path}", f"'{k}' is not a mapping", "override a leaf field")
            node = node[k]
        node[keys[-1]] = value
    return out


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}'", "expected KEY=VALUE", "write e.g. grid.seed=[0,1]")
    key, value = text.split("=", 1)
    return key.strip(), _parse_value(value)


def format_validation_error(err: ValidationError, where: str) -> ConfigError:
    """All errors at once, each with its dotted path."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent: Any = Study
            for key in e["loc"][:-1]:
                fields = getattr(parent, "model_fields", {})
                parent = fields[key].annotation if key in fields else None
            known = getattr(parent, "model_fields", {})
            msg = f"unknown key; {did_you_mean(e['loc'][-1], known)}" if known else "unknown key"
        lines.append(f"  {path}: {msg}")
    if len(lines) == 1:  # the usual case: one line naming the field and the fix
        return ConfigError(where, lines[0].strip(), "edit the study file or the override")
    return ConfigError(where, f"{len(lines)} invalid fields:\n" + "\n".join(lines),
                       "edit the study file or the override (all are listed)")


def study_path(name_or_path: str, studies_dir: Path = Path("studies")) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ConfigError("study", f"no file {p}", "give an existing studies/NAME.yaml")
        return p
    p = studies_dir / f"{name_or_path}.yaml"
    if not p.exists():
        known = [q.stem for q in studies_dir.glob("*.yaml")]
        raise ConfigError("study", f"no study '{name_or_path}' in {studies_dir}/", did_you_mean(name_or_path, known))
    return p


def _expanded_size(node, memo: dict) -> int:
    """Nodes of the YAML tree once every alias is expanded (memoised: a shared node is sized once)."""
    if id(node) not in memo:
        memo[id(node)] = 0  # a recursive alias counts once, then the bound below stops it
        children = node.value if isinstance(node.value, list) else []
        flat = [x for c in children for x in (c if isinstance(c, tuple) else (c,))]
        memo[id(node)] = 1 + sum(_expanded_size(c, memo) for c in flat)
    return memo[id(node)]


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently, so
    `steps: 10` then `steps: 100000` would train 100,000 steps). Merge keys (`<<: *defaults`) may still be
    overridden: that is what they are for."""

    where = "YAML"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            merges = [k for k, _ in node.value if k.tag == "tag:yaml.org,2002:merge"]
            if len(merges) > 1:  # PyYAML keeps the last; `<<: [*a, *b]` is the one way to merge several
                raise ConfigError(f"{self.where}:{merges[1].start_mark.line + 1}", "merge key '<<' is given twice "
                                  "in one mapping; YAML would silently keep the last", "merge a list: <<: [*a, *b]")
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                mark = key_node.start_mark
                if key in first:
                    line, column = first[key]
                    at = f"columns {column} and {mark.column + 1} of line {line}" if line == mark.line + 1 else \
                        f"lines {line} and {mark.line + 1}"
                    raise ConfigError(f"{self.where}:{mark.line + 1}", f"key '{key}' is given twice ({at}); YAML "
                                      "would silently keep the last", "keep one of them")
                first[key] = (mark.line + 1, mark.column + 1)
        return super().construct_mapping(node, deep)


def safe_yaml(text: str, where: str):
    """yaml.safe_load, refusing documents that expand past MAX_YAML_NODES (alias bombs) before building them, and
    mappings that give a key twice."""
    try:
        loader = _StrictLoader(text)  # its reader refuses control characters (a NUL byte) here already
    except yaml.YAMLError as e:
        raise ConfigError(where, f"not YAML text ({getattr(e, 'reason', e)})", "save the file as plain UTF-8 text") \
            from None
    loader.where = where
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ConfigError(where, f"YAML expands to more than {MAX_YAML_NODES:,} nodes (aliases)",
                              "write the values out instead of nesting aliases")
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        raise ConfigError(at, f"malformed YAML ({getattr(e, 'problem', e)})", "fix the YAML syntax") from None
    except RecursionError:
        raise ConfigError(where, "YAML nested too deeply", "flatten the file") from None
    finally:
        loader.dispose()


def load_study(path: Path | str, overrides: list[str] | tuple[str, ...] = (), profile: str | None = None) -> Study:
    path = Path(path)
    if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or a device would block the read or never end
        raise ConfigError(str(path), "a study file must be a regular file (this is a FIFO, device or folder)",
                          "give a YAML file, e.g. studies/smoke.yaml")
    if path.stat().st_size > MAX_STUDY_BYTES:
        raise ConfigError(str(path), f"study file is {path.stat().st_size:,} bytes, above {MAX_STUDY_BYTES:,}",
                          "a study file is a page of YAML; check you gave the right file")
    raw = safe_yaml(path.read_text(errors="replace"), str(path))
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "a study file must be a mapping of keys", "start from studies/smoke.yaml")
    if profile:
        profiles = raw.get("profiles") or {}
        if not isinstance(profiles, dict) or not isinstance(profiles.get(profile, {}), dict):
            raise ConfigError("profiles", "must map each profile's name to its overrides",
                              "write profiles: {NAME: {train.steps: 100, ...}}")
        if profile not in profiles:
            raise ConfigError("profile", f"no profile '{profile}' in {path}", did_you_mean(profile, profiles)
                              if profiles else "this study defines no profiles: drop --profile, or add `profiles:`")
        raw = apply_overrides(raw, profiles[profile], source=f"profiles.{profile}")
    raw = apply_overrides(raw, list(overrides))
    try:
        return Study.model_validate(raw)
    except ValidationError as e:
        raise format_validation_error(e, str(path)) from None


def save_study(study: Study, out: Path) -> None:
    results_subfolder(out)
    atomic.write_text(out / "study.resolved.yaml", yaml.safe_dump(json.loads(study.model_dump_json()), sort_keys=False))


def load_saved_study(out: Path) -> Study:
    """The study a results folder was run with; refused (not a traceback) if that file was edited into nonsense."""
    path = out / "study.resolved.yaml"
    raw = safe_yaml(path.read_text(errors="replace"), str(path))
    try:
        return Study.model_validate(raw)
    except ValidationError as e:
        problem = format_validation_error(e, str(path))
        raise ConfigError(problem.field, problem.problem, "do not edit study.resolved.yaml: rerun `transferbench "
                          "study` with the study file (it rewrites it; finished cells are kept)") from None
