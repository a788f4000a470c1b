"""`transferbench advise DATA`: will pretraining help on this data, and which tuning? From forward passes only:

    results folders (the dial) -> predictor.json (`advise --fit`) ;  DATA -> its measures on the frozen backbones
    -> predicted gain, transfer accuracy and effective data with jackknife+ intervals -> advice.md / advice.json

The arithmetic (ridge, jackknife+ over base datasets, validation) lives in analysis/advice.py; this module reads
results folders, measures the new target with the study's own measuring code, and words the answer.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transferbench.core.atomic import write_text
from transferbench.core.errors import ConfigError
from transferbench.core.paths import check_results_folder, check_writable
from transferbench.core.study import IDENTIFIER, Study, TargetSpec, as_identifier, format_validation_error

if TYPE_CHECKING:
    import pandas as pd

PREDICTOR_FILE = "predictor.json"
DEFAULT_FROM = Path("results/baselines/domain_gap")


def fit_from(folders: list[Path]):
    """The predictor fitted on the records of these study results folders (tables rebuilt from their CSVs)."""
    import pandas as pd

    from transferbench.analysis import advice
    from transferbench.analysis.tables import read_tables
    from transferbench.core.study import load_saved_study

    parts, studies = [], []
    for folder in folders:
        if not (folder / "study.resolved.yaml").exists() or not (folder / "gains.csv").exists():
            raise ConfigError("--fit", f"{folder} holds no study results (study.resolved.yaml, gains.csv)",
                              "give a folder written by `transferbench study`, e.g. results/baselines/domain_gap")
        study = load_saved_study(folder)
        t = read_tables(study, folder)
        if t.domains.empty:
            raise ConfigError("--fit", f"{folder} has no domain measures (domains.csv)",
                              "rerun its study without --skip-domains")
        classes = t.runs.groupby("target")["num_classes"].first()
        parts.append(advice.rows(t.gains, t.domains, t.estimators, classes).assign(study=study.name))
        studies.append(study)
    table = pd.concat(parts, ignore_index=True)
    if table["dataset"].nunique() < advice.MIN_DATASETS + 1:
        raise ConfigError("--fit", f"the records hold {table['dataset'].nunique()} base dataset(s); intervals "
                          f"validated by leaving one out need at least {advice.MIN_DATASETS + 1}",
                          "fit on a study with a domain dial, e.g. results/baselines/domain_gap")
    first = studies[0]
    source = dict(folders=[str(f) for f in folders], studies=[s.name for s in studies],
                  image_size=first.train.image_size, seeds=list(first.grid.seed),
                  backbones=sorted({(b.model, b.weights) for s in studies for b in s.backbones if b.weights != "none"}),
                  rows=len(table), conditions=int(table["target"].nunique()),
                  base_datasets=sorted(table["dataset"].unique().tolist()))
    return advice.fit(table, source)


def save_predictor(predictor, folder: Path) -> Path:
    path = folder / PREDICTOR_FILE
    write_text(path, json.dumps(predictor.to_json(), indent=1, allow_nan=True) + "\n")
    return path


def load_predictor(folder: Path):
    from transferbench.analysis.advice import Predictor

    path = folder / PREDICTOR_FILE
    if not path.is_file():
        raise ConfigError("--from", f"no {PREDICTOR_FILE} in {folder}",
                          f"fit one first: transferbench advise --fit {folder}")
    try:
        return Predictor.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError("--from", f"{path} cannot be read ({e})",
                          f"refit it: transferbench advise --fit {folder}") from None


def target_spec(data: str, shift: str | None, severity: int) -> TargetSpec:
    """DATA as a study target: an existing folder is an ImageFolder, anything else a registered dataset's name."""
    from pydantic import ValidationError

    if Path(data).is_dir():
        raw: dict = dict(dataset="imagefolder", options=dict(path=data))
    elif "/" in data or Path(data).exists():
        raise ConfigError("DATA", f"{data!r} is not a folder", "give an ImageFolder (a folder of class folders) or a "
                          "dataset name (transferbench list datasets)")
    else:
        raw = dict(dataset=data)
    if not 0 <= severity <= 5:
        raise ConfigError("--severity", f"{severity} is not a severity", "give 1 to 5 (with --shift)")
    if bool(shift) != bool(severity):
        raise ConfigError("--severity" if shift else "--shift", "a shift and its severity go together",
                          "give both, e.g. --shift solarize --severity 3")
    try:
        return TargetSpec.model_validate(raw | dict(shift=shift, severity=severity))
    except ValidationError as e:
        raise format_validation_error(e, "DATA") from None


def measuring_study(spec: TargetSpec, predictor, backbones: list[str] | None, sizes: list[int]) -> Study:
    """The one-target study whose domain measures `advise` needs, validated and planned like any study (the same
    refusals), at the predictor's image size and seeds."""
    from pydantic import ValidationError

    from transferbench.sweep.planning import plan

    fitted = {m: w for m, w in predictor.source["backbones"]}
    chosen = backbones or sorted(fitted)
    unknown = [b for b in chosen if b not in fitted]
    if unknown:
        raise ConfigError("--backbone", f"{unknown} not among the backbones the predictor was fitted on",
                          f"choose from {sorted(fitted)}")
    raw = dict(name="advice", backbones=[dict(model=m, weights=fitted[m]) for m in chosen],
               targets=[spec.model_dump(exclude_defaults=True)],
               grid=dict(n_per_class=sizes, seed=predictor.source["seeds"], frozen_depth=[0], schedule=["cosine"]),
               train=dict(image_size=predictor.source["image_size"]))
    try:
        study = Study.model_validate(raw)
    except ValidationError as e:  # built from the predictor's own settings: a damaged predictor.json
        problem = format_validation_error(e, "predictor.json").problem
        raise ConfigError("--from", f"the predictor's settings make no study ({problem})",
                          "refit it: transferbench advise --fit RESULTS") from None
    try:
        plan(study)
    except ConfigError as e:  # planning names study fields; the user gave DATA, --shift, --sizes and --backbone
        raise e.at(_flag(e.field)) from None
    return study


def _flag(field: str) -> str:
    """The command-line flag behind a study field that planning refused."""
    for prefix, flag in (("grid.n_per_class", "--sizes"), ("targets.0.n_per_class", "--sizes"),
                         ("scratch.curve", "--sizes"), ("targets.0.shift", "--shift"),
                         ("targets.0.severity", "--severity"), ("targets", "DATA"), ("backbones", "--backbone")):
        if field.startswith(prefix):
            return flag
    return field


@dataclass(frozen=True)
class Advice:
    predictions: pd.DataFrame  # per backbone x tuning x size: each outcome with its intervals
    nearest: list[dict]
    outside: list[str]
    lines: list[str]


def advise(data: str, predictor, results: Path, shift: str | None = None, severity: int = 0,
           backbones: list[str] | None = None, sizes: list[int] | None = None, accuracy: float | None = None,
           progress: bool = True) -> tuple[Advice, Path]:
    """Measure DATA on the frozen backbones, predict, word the advice and write advice.md and advice.json under
    results/advice/<target>/; returns the advice and the folder."""
    import pandas as pd

    from transferbench.analysis.advice import MIN_DATASETS, rows_for_new_target
    from transferbench.data import load_target
    from transferbench.measures.domains import domain_tables

    spec = target_spec(data, shift, severity)
    sizes = sizes or [int(n) for n in well_supported(predictor, "n_per_class")]
    study = measuring_study(spec, predictor, backbones or well_supported(predictor, "backbone"), sizes)
    name = as_identifier(spec.condition)
    if not IDENTIFIER.fullmatch(name):
        raise ConfigError("DATA", f"{spec.condition!r} does not make a folder name", "rename the folder")
    out = results / "advice" / name
    check_writable(out, "--results", "choose a writable --results folder")
    check_results_folder(results / "advice")  # before anything is measured: a link or a FIFO on the way to advice.md
    if progress:
        print(f"measuring {spec.condition} on {len(study.backbones)} frozen backbone(s) at {sizes} per class...",
              flush=True)
    parts = []
    for i, backbone in enumerate(study.backbones, 1):  # one at a time, so the wait is shown
        started = time.perf_counter()
        parts.append(domain_tables(study.model_copy(update=dict(backbones=[backbone]))))
        if progress:
            print(f"  [{i}/{len(study.backbones)}] {backbone.model}: {time.perf_counter() - started:.1f} s", flush=True)
    domains, kshot = (pd.concat(frames, ignore_index=True) for frames in zip(*parts))
    out.mkdir(parents=True, exist_ok=True)
    target = load_target(spec.dataset, spec.shift, spec.severity, study.train.image_size, spec.options, spec.label)
    table = rows_for_new_target(domains, kshot, predictor.tunings, target.num_classes)
    found = predictor.predict(table)
    nearest, outside = placement(predictor, table)
    for key, asked, what in (("n_per_class", sizes, "{} per class"), ("backbone", [b.model for b in study.backbones],
                                                                      "{}")):
        seen = support(predictor, key)
        outside += [f"{what.format(v)} was measured on {seen.get(v, 0)} base dataset(s) only" for v in asked
                    if seen.get(v, 0) < MIN_DATASETS]
    result = Advice(found, nearest, outside, recommendation(found, predictor, accuracy))
    write_text(out / "advice.md", render(spec.condition, result, predictor))
    write_text(out / "advice.json", json.dumps(_finite(dict(
        target=spec.condition, predictions=found.to_dict("records"), nearest=nearest, outside_range=outside,
        advice=result.lines, validation=predictor.validation, predictor_source=predictor.source)),
        indent=1, allow_nan=False, default=str) + "\n")
    return result, out


def support(predictor, key: str) -> dict:
    """Each fitted value of `key` (a size, a backbone) and the number of base datasets it was measured on: one
    measured on fewer than MIN_DATASETS rests on too few to predict elsewhere (advised on only when asked, with a
    warning)."""
    counts: dict = {}
    for c in predictor.conditions:
        counts.setdefault(c[key], set()).add(c["dataset"])
    return {k: len(v) for k, v in sorted(counts.items())}


def well_supported(predictor, key: str) -> list:
    from transferbench.analysis.advice import MIN_DATASETS

    found = support(predictor, key)
    return [k for k, n in found.items() if n >= MIN_DATASETS] or list(found)


def _finite(value):
    """Valid JSON: a NaN or an infinite bound (an interval open on that side) becomes null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def placement(predictor, table) -> tuple[list[dict], list[str]]:
    """The three known conditions nearest the new target (standardised measures, same backbone and size) and the
    measures on which it lies outside the fitted range (by more than OUT_OF_RANGE_SD training SDs)."""
    import numpy as np
    import pandas as pd

    from transferbench.analysis.advice import OUT_OF_RANGE_SD, TRIVIAL

    known = pd.DataFrame(predictor.conditions)
    measured = [f for f in predictor.features if f not in TRIVIAL]
    mean, sd = known[measured].mean(), known[measured].std().replace(0, 1).fillna(1)
    nearest: list[dict] = []
    for (backbone, n), new in table.groupby(["backbone", "n_per_class"]):
        pool = known[(known["backbone"] == backbone) & (known["n_per_class"] == n)]
        if pool.empty:
            continue
        z_new = ((new[measured].iloc[0] - mean) / sd).fillna(0)
        z_pool = ((pool[measured] - mean) / sd).fillna(0)
        d = np.sqrt(((z_pool - z_new) ** 2).sum(axis=1))
        for i in d.nsmallest(3).index:
            nearest.append(dict(backbone=backbone, n_per_class=int(n), condition=pool.loc[i, "target"],
                                distance=round(float(d[i]), 2)))
    outside = []
    for (backbone, n), new in table.groupby(["backbone", "n_per_class"]):  # scales differ by backbone, estimators by n
        own = known[(known["backbone"] == backbone) & (known["n_per_class"] == n)]
        if own.empty:
            continue
        lo, hi, spread = own[measured].min(), own[measured].max(), own[measured].std().fillna(0)
        values = new[measured].mean()
        margin = OUT_OF_RANGE_SD * spread.where(spread > 0, sd)
        outside += [f"{backbone} at {n}: {m} = {values[m]:.3g} (fitted {lo[m]:.3g} to {hi[m]:.3g})" for m in measured
                    if np.isfinite(values[m]) and not lo[m] - margin[m] <= values[m] <= hi[m] + margin[m]]
    return nearest, outside


def _pp(v: float) -> str:
    return "inf" if math.isinf(v) else f"{100 * v:+.1f}"


def recommendation(found, predictor, accuracy: float | None) -> list[str]:
    """Per backbone and size: pretrain or not, with which tuning, read off the 80% interval of the predicted gain;
    "no reliable advice" where it includes 0. With `accuracy`, the fewest labels per class whose 80% interval of
    transfer accuracy clears it."""
    lines = []
    for (backbone, n), g in found.groupby(["backbone", "n_per_class"]):
        best = g.sort_values("gain", ascending=False).iloc[0]
        where = f"{backbone} at {n} per class"
        span = f"{_pp(best['gain'])} pp [80%: {_pp(best['gain_lo80'])}, {_pp(best['gain_hi80'])}]"
        if best["gain_lo80"] > 0:
            lines.append(f"{where}: pretrain -- {best['tuning']} is predicted to gain {span} over scratch.")
        elif best["gain_hi80"] < 0:
            lines.append(f"{where}: train from scratch -- even {best['tuning']}, the best tuning, is predicted at "
                         f"{span}.")
        else:
            lines.append(f"{where}: no reliable advice -- the best tuning ({best['tuning']}) is predicted at {span}, "
                         "an interval that includes 0.")
    if accuracy is not None and "transfer_mean_lo80" in found:
        ok = found[found["transfer_mean_lo80"] >= accuracy]
        first = ok.sort_values(["n_per_class", "transfer_mean_lo80"], ascending=[True, False]).head(1)
        lines.append(f"To reach {accuracy:.0%} test accuracy (80% lower bound): " + (
            f"{int(first['n_per_class'].iloc[0])} labelled examples per class ({first['backbone'].iloc[0]}, "
            f"{first['tuning'].iloc[0]})." if len(first) else
            "none of the sizes predicted reaches it with confidence; label more, or check a larger size."))
    return lines


def _span(row, outcome: str, level: int, exp: bool = False, signed: bool = True) -> str:
    """A row's interval at `level`: in pp (signed for a gain), or as a multiplier for log2 effective data."""
    lo, hi = getattr(row, f"{outcome}_lo{level}"), getattr(row, f"{outcome}_hi{level}")
    if exp:
        return f"[{2 ** lo:.2g}, {2 ** hi:.2g}]"
    return f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" if signed else f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def render(condition: str, a: Advice, predictor) -> str:
    """advice.md: the recommendation, the predictions with their intervals, where the target sits, the validation."""
    from transferbench.analysis.advice import OUTCOMES

    v = predictor.validation
    out = [f"# Advice for `{condition}`", "", *[f"- {line}" for line in a.lines], ""]
    if a.outside:
        out += ["**Warning: outside the conditions the predictor was fitted on** -- " + "; ".join(a.outside) +
                ". The predictions extrapolate.", ""]
    out += ["Effective data is read off scratch's learning curve, which ends at the largest size scratch trained; "
            "where it never reached transfer the fitted value was a lower bound, so a predicted multiplier near the "
            "top of the fitted range is a lower bound too.", ""]
    out += ["## Predictions (80% and 90% jackknife+ intervals over base datasets)", "",
            "| backbone | tuning | per class | gain (pp) | 80% | 90% | transfer acc | 80% | eff. data (x) | 80% |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in a.predictions.itertuples():
        eff = f"{2 ** r.eff_log2:.2g} | {_span(r, 'eff_log2', 80, exp=True)}" if hasattr(r, "eff_log2") else "- | -"
        accuracy = f"{100 * r.transfer_mean:.1f} | {_span(r, 'transfer_mean', 80, signed=False)}"
        out.append(f"| {r.backbone} | {r.tuning} | {r.n_per_class} | {100 * r.gain:+.1f} | {_span(r, 'gain', 80)} | "
                   f"{_span(r, 'gain', 90)} | {accuracy} | {eff} |")
    out += ["", "## Nearest known conditions (standardised measures)", ""]
    out += [f"- {n['backbone']} at {n['n_per_class']}: {n['condition']} (distance {n['distance']})"
            for n in a.nearest] or ["- none at these backbones and sizes"]
    src = predictor.source
    out += ["", "## How far to trust it (leave one base dataset out)", "",
            f"Fitted on {src['rows']} rows: {src['conditions']} conditions of {len(src['base_datasets'])} base "
            f"datasets ({', '.join(src['base_datasets'])}) from {', '.join(src['folders'])}.", "",
            "| outcome | model | held-out rows | mean abs. error | 80% coverage | 90% coverage |",
            "|---|---|---|---|---|---|"]
    for o, label in OUTCOMES.items():
        for kind in ("measures", "trivial"):
            s = v.get(o, {}).get(kind)
            if s:
                err = f"{100 * s['mae']:.1f} pp" if o != "eff_log2" else f"{s['mae']:.2f} (log2)"
                out.append(f"| {label} | {kind} | {s['n']} | {err} | {s['coverage80']:.0%} | {s['coverage90']:.0%} |")
    for o, label in OUTCOMES.items():
        if o in v:
            out.append("")
            out.append(f"- {label}: " + ("the measures beat the trivial predictor (size, classes and tuning only)."
                                         if v[o]["beats_trivial"] else
                                         "the measures do **not** beat the trivial predictor (size, classes and "
                                         "tuning only); the predictions above use the trivial one."))
    return "\n".join(out) + "\n"
