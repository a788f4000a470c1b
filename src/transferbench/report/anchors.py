"""The findings of the literature a correct harness reproduces or refutes, one registered function each: given the
study and its tables, the line the report writes (with its numbers and a verdict), or None where the study cannot
test it. `transferbench list anchors` prints them with their sources."""

from __future__ import annotations

import numpy as np
import pandas as pd

from transferbench.analysis import gains as analysis
from transferbench.analysis.dial import widest
from transferbench.analysis.tables import Tables
from transferbench.core.registry import Registry
from transferbench.core.study import Study
from transferbench.data.raw import DATASETS
from transferbench.report.words import interval, pp

ANCHORS = Registry("anchor finding")  # name -> (study, tables) -> its line in the report, or None (not testable)


def anchors(study: Study, t: Tables, skip: tuple[str, ...] = ()) -> list[str]:
    """The findings a correct harness reproduces or refutes, each said plainly with its numbers (those in `skip`
    were said elsewhere in the report)."""
    if t.selected.empty:
        return []
    found = [finding(study, t) for name, finding in ANCHORS.items() if name not in skip]
    return ["## Do the known findings reproduce?", ""] + [line for line in found if line] + [""]


@ANCHORS.register(source="VTAB-1k (Zhai et al. 2019)", dial=True)
def gains_shrink_with_data(study: Study, t: Tables) -> str:
    """Gains are largest with little data and shrink as data grows."""
    by_size = analysis.mean_gain(t.runs, ["n_per_class"], study.analysis.confidence)
    shrinks = bool((np.diff(by_size["gain"].to_numpy()) < 0).all()) if len(by_size) > 1 else False
    return ("- Gains largest with little data, shrinking as data grows (VTAB-1k): mean gain "
            + ", ".join(f"{interval(r)} at {r.n_per_class}" for r in by_size.itertuples()) + " per class -- "
            + ("**reproduces** (means in order; the intervals say how firmly)." if shrinks else
               "**does not reproduce** here."))


@ANCHORS.register(source="Raghu et al. 2019; VTAB structured")
def gains_shrink_with_distance(study: Study, t: Tables) -> str | None:
    """Gains shrink as the target moves away from the source (Kendall tau of gain with Frechet distance)."""
    corr = t.correlations
    fd = corr[(corr["measure"] == "fd") & (corr["outcome"] == "gain")] if len(corr) else corr
    if not len(fd):
        return None
    taus = ", ".join(f"{r.tau:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}] at {r.n_per_class}" for r in fd.itertuples())
    clear = fd[fd["ci_high"] < 0]
    return (f"- Gains shrink as the target moves away from the source (Raghu et al. 2019; VTAB structured): "
            f"Kendall tau of gain with measured Frechet distance across targets {taus} per class -- "
            + (f"**reproduces** at {len(clear)} of {len(fd)} sizes (interval below 0)." if len(clear) else
               "**not shown**: no interval lies below 0."))


@ANCHORS.register(source="Yosinski et al. 2014")
def frozen_features_fail_far(study: Study, t: Tables) -> str | None:
    """Deep frozen features transfer worst across a large gap (probe minus full fine-tuning, near vs far)."""
    gap = analysis.arm_gap(t.runs, "probe (all)", "frozen 0", study.analysis.confidence)
    gap = gap.set_index("target").reindex(t.order).dropna(subset=["gain"]) if len(gap) else gap
    if len(gap) <= 1 or t.ordered_by == "the study file":
        return None
    near, far = gap.iloc[0], gap.iloc[-1]
    return (f"- Deep frozen features transfer worst across a large gap (Yosinski et al. 2014): probe minus "
            f"full fine-tuning {interval(near)} on the nearest target as measured ({near.name}), "
            f"{interval(far)} on the farthest ({far.name}) -- "
            + ("**reproduces**." if far.gain < near.gain and far.ci_high < 0 else "**does not reproduce** here."))


@ANCHORS.register(source="Wang et al. 2019 (negative transfer)")
def negative_transfer(study: Study, t: Tables) -> str:
    """The grid points where transfer is reliably below training from scratch."""
    sel = t.selected
    neg = sel[sel["verdict"] == "negative"]
    return (f"- Negative transfer: {len(neg)} of {len(sel)} grid points"
            + (": " + "; ".join(f"{r.backbone} {r.target} {r.tuning} n={r.n_per_class} {pp(r.gain)} pp"
                                for r in neg.itertuples()) if len(neg) else "")
            + ".")


@ANCHORS.register(source="trivial baselines")
def below_pixels(study: Study, t: Tables) -> str:
    """The grid points where transfer does not beat the best classifier on raw pixels."""
    sel = t.selected
    below = sel[sel["below_pixels"]]
    return (f"- Transfer below the best pixel baseline at {len(below)} of {len(sel)} grid points"
            + (" (" + ", ".join(sorted(set(below["target"]))) + ")" if len(below) else "") + ".")


def said(lo: float, hi: float) -> str:
    """The verdict on a claim that a difference is positive, from its interval."""
    return "**reproduces**" if lo > 0 else "**reverses**" if hi < 0 else "**not shown** (the interval includes 0)"


def dial_arm_seeds(t: Tables) -> pd.DataFrame:
    """Per seed, each condition's paired gain at the dial's main arm (the widest line: full fine-tuning where the
    dial measured it), with the condition's base dataset, shift and severity; empty without a dial."""
    lines = widest(t.dial)
    if lines.empty:
        return pd.DataFrame()
    arm = lines.iloc[0]
    m = analysis.paired(t.runs)
    return m[(m["backbone"] == arm["backbone"]) & (m["tuning"] == arm["tuning"])
             & (m["n_per_class"] == arm["n_per_class"])]


@ANCHORS.register(source="VTAB-1k (Zhai et al. 2019)", dial=True)
def natural_beats_structured(study: Study, t: Tables) -> str | None:
    """Pretraining gains more on natural-image tasks than on structured ones (counting, position, orientation)."""
    m = dial_arm_seeds(t)
    if m.empty:
        return None
    m = m[m["shift"].isna()].assign(family=lambda d: [DATASETS.meta(x).get("family") if x in DATASETS else None
                                                      for x in d["dataset"]])
    per_seed = m[m["family"].isin(["natural", "structured"])].groupby(["family", "seed"])["gain"].mean().unstack(0)
    if not {"natural", "structured"} <= set(per_seed.columns):
        return None
    diff = (per_seed["natural"] - per_seed["structured"]).dropna()
    lo, hi, _ = analysis.t_interval(diff.to_numpy(), study.analysis.confidence)
    row = m.iloc[0]
    means = {f: per_seed[f].mean() for f in ("natural", "structured")}
    return (f"- Pretraining helps natural images more than structured tasks (VTAB-1k: +45.6 pp vs +8.5 pp): at "
            f"{row.backbone} {row.tuning}, {row.n_per_class} per class, clean natural conditions gain "
            f"{pp(means['natural'])} pp, structured ones (counting, sprites) {pp(means['structured'])} pp; "
            f"difference {pp(diff.mean())} pp [{pp(lo)}, {pp(hi)}] over seeds -- "
            + said(lo, hi) + ".")


@ANCHORS.register(source="Neyshabur, Sedghi & Zhang 2020", dial=True)
def shuffle_curve(study: Study, t: Tables) -> str | None:
    """Block shuffling: the gain falls as the blocks shrink (feature reuse goes) but part of it survives at the
    finest blocks (low-level statistics still transfer)."""
    m = dial_arm_seeds(t)
    if m.empty:
        return None
    shuffled = m[m["shift"] == "block_shuffle"]
    for dataset, group in shuffled.groupby("dataset"):
        clean = m[(m["dataset"] == dataset) & m["shift"].isna()]
        levels = pd.concat([clean.assign(severity=0), group])
        if levels["severity"].nunique() < 3:
            continue
        curve = analysis.mean_interval(levels, ["severity"], "gain", study.analysis.confidence)
        finest, first = curve.iloc[-1], curve.iloc[0]
        falls = finest["mean"] < first["mean"]
        text = ", ".join(f"{pp(r.mean)} [{pp(r.ci_low)}, {pp(r.ci_high)}]" for r in curve.itertuples())
        verdict = "**reproduces**" if falls and finest["ci_low"] > 0 else \
            "**half reproduces** (falls, but nothing survives reliably)" if falls else "**does not reproduce**"
        return (f"- Block shuffling (Neyshabur et al. 2020) on {dataset}: gain in pp from the clean images to "
                f"{2 ** int(curve['severity'].max())}x{2 ** int(curve['severity'].max())} blocks: {text} -- "
                f"{verdict}.")
    return None
