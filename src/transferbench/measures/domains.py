"""domains.csv: for every (backbone, target condition), measured on frozen features without fine-tuning:
distance to the source reference set, a source-free BatchNorm divergence profile by depth, and
transferability estimates. The arithmetic lives in `measures/`; this module only feeds it arrays.
"""

from __future__ import annotations

import itertools
import json
from typing import cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from transferbench.core.atomic import write_text
from transferbench.core.paths import cache_dir
from transferbench.core.study import Study
from transferbench.data import load_target, nested_kshot
from transferbench.data.embedded import SOURCE_REFERENCE_IMAGES
from transferbench.measures import MEASURES, gaussian_kl, measures, safely
from transferbench.models.backbones import create_backbone, split_at_depth
from transferbench.models.device import prefix_features
from transferbench.models.features import FeatureCache, feature_key
from transferbench.sweep.store import DOMAIN_COLUMNS
from transferbench.training.source import weights_map

REFERENCE = "source_reference"  # embedded natural-photo patches from photos no target uses
PCA_DIMS = 64  # distances in a fixed 64-d PCA basis of the reference features: few samples, 1280-d features


def _pooled_features(model_name: str, bb, target, study: Study, cache: FeatureCache, device) -> dict[str, np.ndarray]:
    """The backbone's pooled features (the linear probe's input), shared with the training cells' cache."""
    prefix, _, _ = split_at_depth(bb, bb.n_groups)
    t = study.train
    feats, _ = prefix_features(cache, model_name, bb, prefix, bb.n_groups, target, t.image_size, device, t.amp,
                               t.channels_last)
    return {s: v.numpy() for s, v in feats.items()}


@torch.inference_mode()
def bn_profile(model: nn.Module, groups: list[list[str]], x: torch.Tensor, device, data_config: dict) -> list[float]:
    """Per depth group: mean over its BatchNorm layers of KL(target activation stats || running stats)."""
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(data_config["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(data_config["std"], device=device).view(1, -1, 1, 1)
    stats: dict[str, list] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            def hook(mod, inp, out, name=name):
                a = inp[0].float()
                stats.setdefault(name, []).append((a.mean((0, 2, 3)), a.pow(2).mean((0, 2, 3)), a.shape[0]))
            hooks.append(m.register_forward_hook(hook))
    for i in range(0, len(x), 256):
        model((x[i:i + 256].to(device) - mean) / std)
    for h in hooks:
        h.remove()
    profile = []
    for names in groups:
        kls = []
        for name in stats:
            if any(name == n or name.startswith(n + ".") for n in names):
                m1, m2, n = zip(*stats[name])
                w = torch.tensor(n, dtype=torch.float32, device=m1[0].device)[:, None] / sum(n)
                mean, sq = (torch.stack(m1) * w).sum(0), (torch.stack(m2) * w).sum(0)
                bn = cast(nn.BatchNorm2d, model.get_submodule(name))  # hooked above
                assert bn.running_mean is not None and bn.running_var is not None  # the backbones' BN layers track them
                kls.append(gaussian_kl(mean.cpu().numpy(), (sq - mean ** 2).clamp_min(0).cpu().numpy(),
                                       bn.running_mean.cpu().numpy(), bn.running_var.cpu().numpy()))
        profile.append(float(np.mean(kls)) if kls else float("nan"))
    return profile


ESTIMATORS = tuple(measures("labelled", "source", "labelled_pair"))  # need labels: computed on each k-shot subset too
DISTANCES = tuple(measures("pair"))


def estimates(f: np.ndarray, y: np.ndarray, probs: np.ndarray | None, src: dict) -> tuple[dict, list[str]]:
    """Every registered estimator on features f with labels y (and the source head's probabilities, and the labelled
    source reference `src` in its PCA basis): values, and for each undefined one the reason."""
    found: dict[str, tuple[float, str | None]] = {}
    for name in ESTIMATORS:
        fn, inputs = MEASURES.get(name), MEASURES.meta(name)["inputs"]
        if inputs == "source" and probs is None:
            found[name] = (np.nan, "no source head")
        elif inputs == "labelled_pair":
            found[name] = safely(fn, (f - src["mean"]) @ src["basis"], y, src["ref_pc"], src["ref_y"])
        else:
            found[name] = safely(fn, probs if inputs == "source" else f, y)
    return {k: v for k, (v, _) in found.items()}, [f"{k}: {why}" for k, (_, why) in found.items() if why]


DOMAINS_FORMAT = 4  # bump when a measure is added or its arithmetic or inputs change: cached rows are then recomputed


def domain_tables(study: Study, cache: FeatureCache | None = None,
                  max_samples: int = 500) -> tuple[pd.DataFrame, pd.DataFrame]:
    """domains.csv: one row per (backbone, target condition) -- distances to the source reference (no labels), the
    BatchNorm profile, and the estimators on the whole training pool (more labels than any cell sees, kept for
    reference); estimators.csv: the estimators on each k-shot subset a cell trains on, the labels a practitioner
    has. Backbones without source weights get no row. Each (backbone, target) pair is cached on disk under a key of
    everything it depends on (weights and target by content, image size, sizes and seeds), so a rerun that changes
    only the grid's other axes, or the report, measures nothing again."""
    cache = cache or FeatureCache.default()
    device = torch.device("cuda" if torch.cuda.is_available() and study.train.device != "cpu" else "cpu")
    size = study.train.image_size
    reference = load_target(REFERENCE, None, 0, size)
    rows, kshot = [], []
    resolved = weights_map(study)
    for spec in study.backbones:
        if spec.weights == "none":
            continue
        weights = resolved.get((spec.model, spec.weights), spec.weights)
        bb = create_backbone(spec.model, weights, num_classes=2, seed=0)
        source = None  # the source reference's side, computed once per backbone and only when a pair is not cached
        for t in study.targets:
            target = load_target(t.dataset, t.shift, t.severity, size, t.options, t.label)
            sizes = t.n_per_class or study.grid.n_per_class
            key = feature_key(kind="domains", version=DOMAINS_FORMAT, model=spec.model, weights=bb.weights_id,
                              target=target.key, reference=reference.key, image_size=size, max_samples=max_samples,
                              measures=measures(), sizes=sorted(sizes), seeds=sorted(study.grid.seed))
            found = _read_cached(key)
            if found is None:
                source = source or _source_side(spec.model, bb, reference, study, cache, device, max_samples)
                found = _store(key, _measure_target(bb, target, t, source, study, cache, sizes, device, max_samples))
            where = dict(backbone=spec.model, weights=weights, target=t.condition)
            rows.append(where | found["row"])
            kshot += [where | r for r in found["kshot"]]
    domains = pd.DataFrame(rows) if rows else pd.DataFrame(columns=DOMAIN_COLUMNS)
    return domains, pd.DataFrame(kshot, columns=["backbone", "weights", "target", "n_per_class", "seed", "n_labels",
                                                 *ESTIMATORS, "notes"])


def _source_side(model_name: str, bb, reference, study: Study, cache: FeatureCache, device, max_samples: int) -> dict:
    """The source reference's pooled features (a fixed subsample) with their labels (one class per photo), their 64-d
    PCA basis and its BN profile."""
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    feats = _pooled_features(model_name, bb, reference, study, cache, device)
    keep = rng.permutation(sum(len(v) for v in feats.values()))[:max_samples]
    ref = np.concatenate([feats[s] for s in feats])[keep]
    ref_y = np.concatenate([reference.y[s].numpy() for s in feats])[keep]
    mean = ref.mean(0)
    basis = np.linalg.svd(ref - mean, full_matrices=False)[2][:PCA_DIMS].T
    ref_x = torch.cat(list(reference.x.values()))
    profile = bn_profile(bb.model, bb.groups, ref_x[torch.randperm(len(ref_x), generator=g)[:max_samples]], device,
                         bb.data_config)
    return dict(ref=ref, ref_y=ref_y, ref_pc=(ref - mean) @ basis, mean=mean, basis=basis, profile=profile,
                model=model_name)


def _measure_target(bb, target, t, src: dict, study: Study, cache: FeatureCache, sizes: list[int], device,
                    max_samples: int) -> dict:
    """One (backbone, target) pair: its domains.csv row and its estimators.csv rows. Random draws are seeded per
    pair, so a pair's values do not depend on which other pairs were cached."""
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    feats = _pooled_features(src["model"], bb, target, study, cache, device)
    f, y = feats["train"], target.y["train"].numpy()
    sub = f[rng.permutation(len(f))[:max_samples]]
    pa, pb = (sub - src["mean"]) @ src["basis"], src["ref_pc"]
    with torch.inference_mode():
        probs = torch.softmax(bb.source_head(torch.from_numpy(f)).float(), 1).numpy() if bb.source_head else None
    x = target.x["train"]
    profile = bn_profile(bb.model, bb.groups, x[torch.randperm(len(x), generator=g)[:max_samples]], device,
                         bb.data_config)
    distances = {k: safely(MEASURES.get(k), pa, pb) for k in DISTANCES}
    pool, notes = estimates(f, y, probs, src)
    row = dict(dataset=t.dataset, shift=t.shift, severity=t.severity,
               reference=f"{REFERENCE} ({', '.join(SOURCE_REFERENCE_IMAGES)})", n_target=len(sub),
               n_reference=len(src["ref"]), **{k: v for k, (v, _) in distances.items()}, **pool,
               **{k: MEASURES.get(k)(profile) for k in measures("bn_profile")},
               notes="; ".join(notes + [f"{k}: {why}" for k, (_, why) in distances.items() if why]))
    row |= {f"bn_kl_group{i}": v for i, v in enumerate(profile)}
    row |= {f"bn_kl_ref_group{i}": v for i, v in enumerate(src["profile"])}
    kshot = []
    for n, seed in itertools.product(sizes, study.grid.seed):
        idx = nested_kshot(y, n, seed)
        values, notes = estimates(f[idx], y[idx], probs[idx] if probs is not None else None, src)
        kshot.append(dict(n_per_class=n, seed=seed, n_labels=len(idx), **values, notes="; ".join(notes)))
    return dict(row=row, kshot=kshot)


def _cache_path(key: str):
    return cache_dir("domains") / f"{key}.json"


def _read_cached(key: str) -> dict | None:
    """A pair's measures from the on-disk cache (JSON), or None (absent or unreadable: then recomputed)."""
    try:
        return json.loads(_cache_path(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _store(key: str, found: dict) -> dict:
    found = json.loads(json.dumps(found, default=_plain))  # exactly what a later read will return
    write_text(_cache_path(key), json.dumps(found, allow_nan=True))  # cache_dir made the folder
    return found


def _plain(v):
    return v.item() if isinstance(v, np.generic) else str(v)
