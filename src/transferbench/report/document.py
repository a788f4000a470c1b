"""Records -> tidy tables -> analysis -> figures -> report.md. Rebuildable without training."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd

from transferbench.analysis import arms, predictors
from transferbench.analysis import gains as analysis
from transferbench.analysis.tables import Tables, write_tables
from transferbench.core import atomic
from transferbench.core.registry import Registry
from transferbench.core.study import Study, scratch_lrs, transfer_lrs
from transferbench.report import dial, plots
from transferbench.report.anchors import ANCHORS, anchors
from transferbench.report.words import interval, markdown_table, near_the_level_clause, per_class, pp


def gain_text(row, fdr: float, min_effect: float) -> str:
    """A grid point's gain, interval and verdict, with its q where the verdict rests on it (near the level)."""
    flags = getattr(row, "flags", "")
    near = analysis.near_the_level(row.gain, row.q, fdr, min_effect)
    return (f"{interval(row)} ({row.verdict}" + (f"; q {row.q:.2g}, near the level" if near else "") + ")"
            + (f" [flagged: {flags}]" if isinstance(flags, str) and flags else ""))


def headlines(study: Study, t: Tables) -> list[str]:
    """Gain with CI at the smallest and largest size, for the nearest and the farthest target as measured."""
    selected, a = t.selected, study.analysis
    if selected.empty:
        return ["No transfer cell has a matched scratch cell yet: no gains to report."]
    near, far = t.order[0], t.order[-1]
    sizes = sorted(selected["n_per_class"].unique())
    lines = []
    for bb in sorted(selected["backbone"].unique()):
        for tg in dict.fromkeys([near, far]):
            for n in dict.fromkeys([sizes[0], sizes[-1]]):
                sub = selected[(selected["backbone"] == bb) & (selected["target"] == tg)
                               & (selected["n_per_class"] == n)]
                parts = [f"{r.tuning}: {gain_text(r, a.fdr, a.min_effect)}"
                         for r in sub.sort_values("frozen_groups").itertuples()]
                if parts:
                    lines.append(f"**{bb}**, {tg}, {n} per class -- " + "; ".join(parts))
    negatives, losing = selected[selected["verdict"] == "negative"], selected[selected["gain"] < 0]
    lines.append(f"Negative transfer (q <= {a.fdr:g} after Benjamini-Hochberg, gain <= -{100 * a.min_effect:g} pp): "
                 f"{len(negatives)} of {len(selected)} grid points (configurations chosen on val)"
                 + near_the_level_clause(*analysis.near_counts(losing["gain"], losing["q"], losing["verdict"], a.fdr,
                                                        a.min_effect), a.fdr) + ".")
    return lines


def findings(study: Study, t: Tables) -> list[str]:
    """4-6 findings written from the numbers (configurations chosen on validation), each with its interval over
    seeds, for the report and the terminal; the first says how far the comparison can be trusted."""
    sel, runs, a = t.selected, t.runs, study.analysis
    if sel.empty:
        return ["no transfer cell has a matched scratch cell yet"]
    out = [fairness_sentence(runs, sel)] if "converged" in runs else []
    by_size = analysis.mean_gain(runs, ["n_per_class"], a.confidence)
    out.append(f"Mean gain of transfer over scratch, {a.confidence:.0%} t-interval over seeds: "
               + ", ".join(f"{interval(r)} at {per_class(r.n_per_class)}" for r in by_size.itertuples())
               + f" (over {sel['backbone'].nunique()} backbone(s), {sel['target'].nunique()} target condition(s), "
               f"{sel['tuning'].nunique()} transfer arm(s)).")
    order, ordered_by = t.order, t.ordered_by
    by_target = analysis.mean_gain(runs, ["target"], a.confidence).set_index("target").reindex(
        [c for c in order if c in set(sel["target"])]).dropna(subset=["gain"])
    if len(by_target) > 1:
        near, far, low = by_target.iloc[0], by_target.iloc[-1], by_target.loc[by_target["gain"].idxmin()]
        words = ("Nearest target as measured", "farthest") if ordered_by != "the study file" else \
            ("First target in the study file (no distance measured)", "last")
        out.append(f"{words[0]}: {near.name}, gain {interval(near)}; {words[1]}: {far.name}, {interval(far)}. "
                   f"Smallest mean gain on {low.name}, {interval(low)}, where transfer reaches "
                   f"{100 * low.transfer:.1f}% and scratch {100 * low.scratch:.1f}% (a small gain can mean scratch "
                   "does well, not that transfer does badly).")
    neg = sel[sel["negative"]]
    where = ", ".join(f"{r.backbone} {r.target} {r.tuning} n={r.n_per_class} "
                      f"({interval(r)})" for r in neg.head(3).itertuples())
    out.append(f"Negative transfer (BH q <= {a.fdr:g}, |gain| >= {100 * a.min_effect:g} pp) at {len(neg)} of "
               f"{len(sel)} grid points" + (f": {where}" + (" ..." if len(neg) > 3 else "") if len(neg) else "") + ".")
    best = analysis.best_depth(sel)
    if len(best) and sel["tuning"].nunique() > 1:
        counts = best.groupby("target")["tuning"].agg(lambda d: d.value_counts().index[0]).reindex(
            by_target.index).dropna()
        out.append("Most often best transfer arm (on validation; the gains table has each point's interval): " +
                   ", ".join(f"{tg}: {d}" for tg, d in counts.items()) + ".")
    out.append(estimator_sentence(study, t))
    return [line for line in out if line][:6]


def estimator_sentence(study: Study, t: Tables) -> str:
    """Which measure ranked the targets best, and whether it is distinguishable from the runner-up; nothing is
    ranked from fewer than predictors.MIN_TARGETS_TO_RANK targets or without domain measures."""
    n_targets, ranking, corr = t.selected["target"].nunique(), t.ranking, t.correlations
    ranking = ranking[ranking["measure"] != "trivial"] if len(ranking) else ranking  # the bar, not a candidate
    if t.domains.empty:
        return ""
    if n_targets < predictors.MIN_TARGETS_TO_RANK:
        return (f"No estimator is ranked: {n_targets} target condition(s), fewer than the "
                f"{predictors.MIN_TARGETS_TO_RANK} a rank correlation across targets needs.")
    if ranking.empty:
        return ""
    top = ranking.iloc[0]
    own = corr[(corr["measure"] == top.measure) & (corr["outcome"] == "gain")]
    if not ((own["ci_low"] > 0) | (own["ci_high"] < 0)).any():
        return (f"No measure predicts the realized gain reliably across these {n_targets} targets: the best mean "
                f"agreement is {top.measure}'s (sign-adjusted Kendall tau {top.mean_agreement:+.2f}), and none of its "
                f"per-size {study.analysis.confidence:.0%} intervals excludes 0.")
    text = (f"Best predictor of the realized gain: {top.measure} (mean sign-adjusted Kendall tau "
            f"{top.mean_agreement:+.2f} across {int(top.targets)} targets, over {int(top.sizes)} size(s))")
    duel = t.duel
    if duel is None:
        return text + "."
    word = "distinguishable" if duel["distinguishable"] else "not distinguishable"
    trivial = "" if duel.get("beats_trivial") is None else \
        f"; it {'beats' if duel['beats_trivial'] else 'does not reliably beat'} the trivial predictor " \
        f"(difference {duel['vs_trivial']:+.2f} [{duel['trivial_low']:+.2f}, {duel['trivial_high']:+.2f}])"
    return (text + f"; {word} from {duel['second']} (difference {duel['difference']:+.2f}, "
            f"{study.analysis.confidence:.0%} CI [{duel['ci_low']:+.2f}, {duel['ci_high']:+.2f}])" + trivial + ".")


def _fmt_gains(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(
        gain_pp=lambda d: d["gain"].map(pp),
        ci_pp=lambda d: [f"[{pp(a)}, {pp(b)}]" for a, b in zip(d.ci_low, d.ci_high)],
        seed_sd_pp=lambda d: (100 * d["gain_sd"]).round(1), test_se_pp=lambda d: (100 * d["test_se"]).round(1),
        q=lambda d: d["q"].map(lambda v: "n/a" if pd.isna(v) else f"{v:.3g}"),
        transfer=lambda d: (100 * d["transfer_mean"]).round(1))


def fairness_sentence(runs: pd.DataFrame, sel: pd.DataFrame) -> str:
    ok = analysis.ok_runs(runs)
    share = ok.groupby("arm")["converged"].mean()
    return (f"Converged: {', '.join(f'{arm} {100 * v:.0f}%' for arm, v in share.items())} of cells; "
            f"{int((sel['flags'] != '').sum())} of {len(sel)} grid points flagged, {int(sel['below_pixels'].sum())} "
            "with transfer below the best pixel baseline.")


def arms_section(study: Study, t: Tables) -> list[str]:
    """'Which layers to train': each arm's accuracy, its difference from full fine-tuning, the best arm per
    condition (chosen on validation) beside where the shift lives by depth, and the anchor claims."""
    acc, diffs, best, claims = t.arm_accuracy, t.arm_differences, t.best_arms, t.claims
    if acc.empty:
        return []
    a = study.analysis
    order = [c for c in t.order if c in set(acc["target"])]
    arm_order = [x for x in plots.arm_order(t.runs) if x in set(acc["tuning"])]
    lines = ["## Which layers to train", "",
             "Every arm at its own LR chosen on validation, on the same k-shot subsets; differences from full "
             f"fine-tuning (frozen 0) are paired by seed, with {a.confidence:.0%} t-intervals over seeds and "
             f"Benjamini-Hochberg across all {len(diffs)} comparisons (* better, - worse: q <= {a.fdr:g} and at least "
             f"{100 * a.min_effect:g} pp). The best arm is the one with the best validation accuracy.", ""]
    depth = arms.shift_depth(t.domains)
    for (bb, n), sub in acc.groupby(["backbone", "n_per_class"]):
        cell = lambda r: f"{100 * r.test:.1f} [{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]"  # noqa: E731
        table = sub.assign(v=[cell(r) for r in sub.itertuples()]).pivot(index="target", columns="tuning", values="v")
        d = diffs[(diffs["backbone"] == bb) & (diffs["n_per_class"] == n)] if len(diffs) else diffs
        mark = {"better": " *", "worse": " -"}
        delta = d.assign(v=[f"{pp(r.diff)} [{pp(r.ci_low)}, {pp(r.ci_high)}]{mark.get(r.verdict, '')}"
                            for r in d.itertuples()]).pivot(index="target", columns="tuning", values="v") \
            if len(d) else pd.DataFrame(index=table.index)
        b = best[(best["backbone"] == bb) & (best["n_per_class"] == n)].set_index("target")
        where = depth[depth["backbone"] == bb].set_index("target") if len(depth) else pd.DataFrame()
        extra = pd.DataFrame({"best (val)": b["best"]}, index=table.index)
        if len(where):
            extra["BN peak group (ratio)"] = [
                f"{int(where.loc[tg, 'peak_group'])} ({where.loc[tg, 'peak_ratio']:.2f})" if tg in where.index else
                "n/a" for tg in table.index]
            extra["early share"] = [f"{where.loc[tg, 'early_share']:.2f}" if tg in where.index else "n/a"
                                    for tg in table.index]
        cols = [c for c in arm_order if c in table.columns]
        lines += [f"Test accuracy (%) per arm, {bb}, {per_class(n)} (mean [{a.confidence:.0%} CI] over seeds):", "",
                  markdown_table(table[cols].join(extra).reindex(order).reset_index()), "",
                  "Difference from full fine-tuning (pp):", "",
                  markdown_table(delta[[c for c in cols if c in delta.columns]].reindex(order).reset_index()), ""]
    wins = best["best"].value_counts()
    lines += ["Best arm on validation, counted over conditions and sizes: "
              + ", ".join(f"{arm} {k}" for arm, k in wins.items()) + ".", ""]
    pred = t.depth_prediction
    if pred:
        conds = pred["conditions"]
        early = int((conds["peak"] < conds["n_groups"] / 2).sum())
        lines += [f"Does the depth where the shift lives predict which end to tune? Over the {pred['n']} input-level "
                  "conditions, the BatchNorm divergence (relative to the source reference's, group by group) peaks in "
                  f"the first half of the network for {early}; "
                  f"the half holding the peak names the better of the first-group and last-group arms (on validation) "
                  f"in {pred['agree']} of {pred['n']}. Kendall tau between the early share of the excess divergence "
                  f"and first-minus-last test accuracy: {pred['tau']:+.2f} (one-sided permutation p = "
                  f"{pred['p']:.3f}; "
                  f"expected positive if the peak predicts the block).", ""]
    if len(claims):
        lines += ["Anchor claims (pooled: each seed's difference averaged over the conditions named, then a "
                  f"{a.confidence:.0%} t-interval over seeds):", ""]
        lines += [f"- {r.claim} ({r.source}): {r.contrast} = {pp(r.diff)} pp [{pp(r.ci_low)}, {pp(r.ci_high)}] over "
                  + (r.conditions if r.n_conditions == 1 else f"the {r.n_conditions} {r.kind} conditions" if r.kind
                     else f"all {r.n_conditions} conditions")
                  + f" -- **{r.verdict}**." for r in claims.itertuples()]
        lines += ["", "The conditions of each claim are listed in claims.csv. LP-FT's own claim is about accuracy "
                  "under a shift between fine-tuning and test data; here every arm is trained and tested on the same "
                  "condition, so what is tested is its in-distribution half and its advantage far from the source.", ""]
        lines.append("")
    return lines


def fairness_section(study: Study, t: Tables) -> list[str]:
    """'Is the comparison fair?': what every later number rests on, before any of them."""
    fair, sel = t.fairness, t.selected
    lines = ["## Is the comparison fair?", ""]
    if fair.empty:
        return lines + ["These records carry no convergence check (written by an older transferbench): the gains "
                        "below may measure how far each arm got in its budget, not what it can reach.", ""]
    lines += ["Every arm trains under the budget and stopping rule in *The study as run* below, with its own LR and "
              "schedule chosen on validation. A network cell converged when validation stopped improving before its "
              "budget ran out or it fits its training subset (train accuracy >= 99%), and it does not predict one "
              "class for more than 90% of the test set; a convex fit (probe, pixel logistic regression) when its "
              "solver converged.", "",
              markdown_table(fair.assign(**{c: (100 * fair[c]).round(1) for c in ("converged", "collapsed",
                                                                                  "early_stopped")})
                             .rename(columns={"converged": "converged %", "collapsed": "collapsed %",
                                              "early_stopped": "early stopped %"})), ""]
    if len(sel):
        flagged = sel[sel["flags"] != ""]
        below = sel[sel["below_pixels"]]
        lines += [f"{len(flagged)} of {len(sel)} grid points are flagged (an arm not converged in every seed, or an "
                  f"arm below the best pixel baseline of the same subsets); {len(below)} have transfer below the "
                  f"pixels, {int(sel['scratch_below_pixels'].sum())} scratch. Flags are shown in the headline and the "
                  "gains table.", ""]
    return lines


def failure_section(study: Study, t: Tables) -> list[str]:
    """'When transfer fails': negative points, where gains stop, best depth, estimator ranking."""
    selected, domains, corr = t.selected, t.domains, t.correlations
    lines = ["## When transfer fails", ""]
    neg = selected[selected["negative"]]
    lines.append(f"Negative transfer gap (Wang et al. 2019: transfer error minus scratch error), each arm's "
                 f"configuration chosen on validation: **{len(neg)} of {len(selected)}** grid points are called "
                 "negative. " + analysis.verdict_rule(study.analysis.fdr, study.analysis.min_effect,
                                                      study.analysis.confidence))
    if len(neg):
        lines += ["", markdown_table(_fmt_gains(neg)[["backbone", "target", "tuning", "n_per_class",
                                                       "transfer", "gain_pp", "ci_pp"]])]
    order, ordered_by = t.order, t.ordered_by
    by_target = analysis.mean_gain(t.runs, ["target"], study.analysis.confidence).set_index("target")
    positive = selected.groupby("target")["verdict"].agg(lambda v: (v == "positive").mean())
    by_target = by_target.reindex([c for c in order if c in by_target.index])
    lines += ["", f"Mean gain per target condition (near -> far by {ordered_by}), its {study.analysis.confidence:.0%} "
              "t-interval over seeds, and the share of its grid points with a positive verdict:", ""]
    lines += [f"- {tg}: {interval(r)}, {100 * positive.get(tg, np.nan):.0f}% positive (transfer "
              f"{100 * r.transfer:.1f}%, scratch {100 * r.scratch:.1f}%)" for tg, r in by_target.iterrows()]
    if not domains.empty:
        d = domains.groupby("target")[[m for m in predictors.DISTANCES if m in domains]].mean().reindex(by_target.index)
        lines += ["", "Measured distance to the source reference (mean over backbones):", "",
                  markdown_table(d.round(3).reset_index())]
    best = analysis.best_depth(selected)
    if len(best):
        lines += ["", "Best transfer arm per target (chosen on validation) at each size:", ""]
        pivot = best.pivot_table(index=["backbone", "target"], columns="n_per_class", values="tuning",
                                 aggfunc="first").reset_index()
        pivot["target"] = pd.Categorical(pivot["target"], [c for c in order if c in set(pivot["target"])])
        lines.append(markdown_table(pivot.sort_values(["backbone", "target"]).astype(str)))
    ranking = t.ranking
    sentence = estimator_sentence(study, t)
    if sentence:
        lines += ["", sentence]
    if len(ranking) and selected["target"].nunique() >= predictors.MIN_TARGETS_TO_RANK:
        lines += ["", "Per size, with a bootstrap over targets and the range of leave-one-target-out taus:", "",
                  markdown_table(corr[corr["outcome"] == "gain"].drop(columns=["outcome", "expected_sign"]).round(3)),
                  "", "Mean over sizes:", "", markdown_table(ranking.round(3))]
    oracle, runs = t.oracle, analysis.ok_runs(t.runs)
    configs = runs[runs["arm"] != "pixels"].groupby(["arm"])[["schedule", "lr"]].nunique().prod(axis=1)
    if len(oracle) and (configs > 1).any():  # with one configuration per arm there is nothing to select
        lines += ["", f"Model selection: with each arm's schedule and LR chosen on validation the mean gain is "
                  f"{pp(selected['gain'].mean())} pp; choosing on test (oracle, optimistic) would report "
                  f"{pp(oracle['gain'].mean())} pp."]
    if len(t.schedules):
        lines += ["", "The schedule as a factor: mean test accuracy (%) per arm and schedule, each at its own LR "
                  "chosen on validation:", "", markdown_table((100 * t.schedules).round(1).reset_index())]
    return lines


def fractional(study: Study) -> list[str]:
    """The design's deviations from the full cross product, said: the targets that train fewer arms, and the sizes
    at which only scratch and the pixel baselines train."""
    g, out = study.grid, []
    if g.per_target:
        own: dict[str, list[str]] = {}
        for tg in study.targets:
            parts = [f"frozen depth {', '.join(map(str, tg.frozen_depth))}" if tg.frozen_depth is not None else "",
                     f"sizes {', '.join(map(str, tg.n_per_class))}" if tg.n_per_class else "",
                     f"schedule {', '.join(tg.schedule)}" if tg.schedule is not None else "",
                     f"backbones {', '.join(tg.backbones)}" if tg.backbones is not None else ""]
            if any(parts):
                own.setdefault("; ".join(p for p in parts if p), []).append(tg.condition)
        out += [f"- fractional design: {len(conds)} condition(s) train only {arms} ({', '.join(conds)})"
                for arms, conds in own.items()]
    if study.scratch.curve:
        out.append(f"- scratch's learning curve: scratch and the pixel baselines also train at "
                   f"{', '.join(map(str, study.scratch.curve))} examples per class on every target (effective data "
                   "transferred)")
    return out


def study_as_run(study: Study, t: Tables, timing: str | None, ordered_by: str, order: list[str]) -> list[str]:
    """What ran, generated from the resolved configuration and the records (not from the study file's prose)."""
    tr, sc, g, a = study.train, study.scratch, study.grid, study.analysis
    runs = t.runs

    def seen(col: str) -> str:
        if col not in runs or not runs[col].notna().any():
            return "n/a"
        return ", ".join(sorted({str(v) for v in runs[col].dropna()}))

    def lrs(candidates_of) -> str:  # the LR candidates over every schedule (a schedule may set its own)
        return ", ".join(f"{x:g}" for x in sorted({x for s in g.schedule for x in candidates_of(s)}))

    arms = runs["arm"].value_counts().to_dict() if len(runs) else {}
    budget = (f"{tr.steps} optimizer steps per transfer cell, {round(tr.steps * sc.budget_factor)} per scratch cell "
              f"(x{sc.budget_factor:g}); validation every {tr.validation_every} steps" if tr.steps else
              f"{tr.epochs} epochs per cell (scratch x{sc.budget_factor:g}); validation at epochs {tr.eval_at}-spaced")
    budget += ((" with precise BatchNorm statistics" if tr.precise_bn else "") +
               f"; early stopping after {tr.patience} validations without improvement, never before step "
               f"{tr.min_steps}; " + ("the best-validation weights are tested" if tr.keeps_best else
                                           "the last weights are tested"))
    halving = ("successive halving (every candidate trains the first fifth of the budget from the same start on the "
               "same batches; the best on validation goes on)")
    search = {"halving": f"{halving} inside each cell",
              "first_seed": f"{halving} in the first seed's cell of each grid point; the other seeds train at its "
                            "choice (recorded per cell as lr_source)",
              "grid": "every candidate a full cell, chosen on mean validation over seeds"}[tr.lr_search]
    lines = ["## The study as run", "",
             "Generated from the resolved configuration (`study.resolved.yaml`: the study file with overrides and "
             "profile applied) and from the records.", "",
             f"- backbones: {', '.join(f'{b.model} ({b.weights})' for b in study.backbones)}",
             f"- target conditions, near to far by {ordered_by}: {', '.join(order)}",
             f"- grid: frozen depth {', '.join(map(str, g.frozen_depth))}"
             + "".join(f"; train only groups {groups}" for groups in g.train_groups)
             + (f"; recipes {', '.join(g.recipes)}" if g.recipes else "") + f"; {', '.join(map(str, g.n_per_class))} "
             f"labelled examples per class; schedules {', '.join(s.name for s in g.schedule)}; seeds "
             f"{', '.join(map(str, g.seed))}; {len(runs)} cells ({', '.join(f'{k} {v}' for k, v in arms.items())})",
             *fractional(study),
             f"- images {tr.image_size} px, batch {tr.batch_size}, {tr.optimizer} (weight decay {tr.weight_decay:g}), "
             f"augmentation {'on' if tr.augment else 'off'}",
             f"- budget: {budget}",
             f"- learning rate chosen on validation per arm: transfer {lrs(lambda s: transfer_lrs(study, s))}, "
             f"scratch {lrs(lambda s: scratch_lrs(study, s))}; {search}; the schedule chosen on validation per arm",
             "- linear probe (frozen all): " + ("logistic regression on the cached features fitted by L-BFGS, its L2 "
                                                "strength chosen on validation" if tr.probe == "lbfgs" else
                                                "the SGD loop on the cached features"),
             f"- trivial baselines on the same k-shot subsets and test split: {', '.join(study.baselines.methods)}",
             f"- statistics: {a.confidence:.0%} Student-t intervals over seeds; Benjamini-Hochberg at q <= {a.fdr:g} "
             f"across the grid points; a verdict needs |gain| >= {100 * a.min_effect:g} pp",
             f"- device: {seen('device_used')}; {study.run.jobs} worker(s) x {seen('threads')} thread(s); CPU "
             f"{seen('cpu')} (float results differ between CPU vendors: docs/measurements.md)",
             f"- versions: transferbench {seen('transferbench_version')}, torch {seen('torch_version')}, timm "
             f"{seen('timm_version')}, Python {seen('python_version')}; git commit {seen('git_commit')}"]
    wall = re.search(r"wall time: ([0-9.]+) s for (\d+) cells", timing or "")
    lines.append(f"- wall time of the run that trained the last cells: {float(wall[1]) / 60:.1f} min for {wall[2]} "
                 "cells" if wall else "- wall time: not recorded")
    return lines + [""]


def figure_block(name: str, path: Path) -> list[str]:
    """The figure with its caption: the first sentence of its drawing function's docstring."""
    return [f"![{name}](figures/{path.name})", "", f"*Figure: {escape_md(plots.FIGURES.summary(name) or name)}*", ""]


def escape_md(text: str) -> str:
    return re.sub(r"([*_\[\]])", r"\\\1", text)


@dataclass
class Page:
    """What the report's sections read: the study, its tables, the drawn figures and the run's facts."""

    study: Study
    t: Tables
    figures: dict[str, Path]
    timing: str | None
    domains: bool  # false: the domain measures were skipped (--skip-domains)
    found: list[str] = field(default_factory=list)
    written: set[str] = field(default_factory=set)  # the sections written so far


# name -> function(page) -> the section's lines (none: the section is left out), in the report's order; metadata
# `heading`: the heading it opens. A figure names the section it closes (plots.FIGURES metadata `section`).
SECTIONS = Registry("report section")


@SECTIONS.register("summary", heading="## Summary")
def summary_section(p: Page) -> list[str]:
    """The answer in one screen: where the gain stops paying, what it is worth in data, against the strongest
    baseline without pretraining, and which measure predicts it (left out without a dial of 3+ base datasets)."""
    said = dial.summary_lines(p.study, p.t)
    return ["## Summary", ""] + [f"- {s}" for s in said] + [""] if said else []


@SECTIONS.register("question", heading="## The question")
def question_section(p: Page) -> list[str]:
    """The study file's own description, quoted."""
    quoted = "\n".join(f"> {line}" if line.strip() else ">" for line in p.study.description.strip().splitlines())
    return ["## The question", "",
            quoted or "> (no description)", "", "*The study file's own words; what ran is stated below.*", ""]


@SECTIONS.register("study", heading="## The study as run")
def study_section(p: Page) -> list[str]:
    """What ran: the grid, budgets, LR search and analysis settings, from the resolved configuration and records."""
    return study_as_run(p.study, p.t, p.timing, p.t.ordered_by, p.t.order)


@SECTIONS.register("fairness", heading="## Is the comparison fair?")
def fairness_page(p: Page) -> list[str]:
    """Convergence, collapse and the weakest arm per arm and size: what every later number rests on."""
    return fairness_section(p.study, p.t)


@SECTIONS.register("headline", heading="## Headline")
def headline_section(p: Page) -> list[str]:
    """The gain of transfer over scratch at each grid point, with the verdict rule."""
    a = p.study.analysis
    return ["## Headline", "", "Test accuracy gain of transfer over the matched from-scratch baseline; each arm's "
            "schedule and LR are chosen on its own validation accuracy. "
            + analysis.verdict_rule(a.fdr, a.min_effect, a.confidence), ""] \
        + [f"- {line}" for line in headlines(p.study, p.t)] + [""]


@SECTIONS.register("dial", heading="## When does transfer stop paying?")
def dial_section(p: Page) -> list[str]:
    """The break-even distance of every dial arm, the gains made comparable across targets, the measure ranking with
    the trivial predictor, and the anchor findings the dial settles (the figure is the Summary's)."""
    settled = [n for n in ANCHORS if ANCHORS.meta(n).get("dial")]
    said = [line for n in settled if (line := ANCHORS[n](p.study, p.t))]
    body = dial.dial_lines(p.study, p.t, said)
    return ["## When does transfer stop paying?", ""] + body + [""] if body else []


@SECTIONS.register("findings", heading="## Findings")
def findings_section(p: Page) -> list[str]:
    """The numbered findings (also written to findings.txt)."""
    p.found = findings(p.study, p.t)
    return ["## Findings", ""] + [f"{i}. {line}" for i, line in enumerate(p.found, 1)] + [""]


@SECTIONS.register("anchors", heading="## Do the known findings reproduce?")
def anchors_page(p: Page) -> list[str]:
    """The literature's findings (`transferbench list anchors`), each reproduced or not, with its numbers; those the
    dial section settled are not repeated."""
    said = tuple(n for n in ANCHORS if ANCHORS.meta(n).get("dial")) if "dial" in p.written else ()
    return anchors(p.study, p.t, skip=said)


@SECTIONS.register("arms", heading="## Which layers to train")
def arms_page(p: Page) -> list[str]:
    """Each transfer arm against full fine-tuning, the best arm per condition, and the claims about arms."""
    return arms_section(p.study, p.t)


@SECTIONS.register("failure", heading="## When transfer fails")
def failure_page(p: Page) -> list[str]:
    """Negative points, where gains stop, the best depth and how well each estimator ranks the targets."""
    return failure_section(p.study, p.t) + [""] if not p.t.selected.empty else []


@SECTIONS.register("figures", heading="## Figures")
def figures_section(p: Page) -> list[str]:
    """Figures whose section is left out (where it would have closed), then those that belong to none."""
    homeless = [name for name in plots.FIGURES if plots.FIGURES.meta(name)["section"] and name in p.figures
                and plots.FIGURES.meta(name)["section"] not in p.written]
    rest = [name for name in p.figures if not plots.FIGURES.meta(name)["section"]]
    return sum((figure_block(name, p.figures[name]) for name in homeless), []) + \
        (["## Figures", ""] + sum((figure_block(name, p.figures[name]) for name in rest), []) if rest else [])


@SECTIONS.register("gains", heading="## Gains (each arm's schedule and LR chosen on validation)")
def gains_section(p: Page) -> list[str]:
    """Every grid point's gain, in one table."""
    if p.t.selected.empty:
        return []
    shown = _fmt_gains(p.t.selected.sort_values(["backbone", "target", "frozen_groups", "n_per_class"]))
    shown = shown.assign(scratch=(100 * shown["scratch_mean"]).round(1))
    shown = shown.assign(pixels=(100 * shown["pixels_best"]).round(1))
    return ["## Gains (each arm's schedule and LR chosen on validation)", "", markdown_table(shown[
        ["backbone", "target", "tuning", "n_per_class", "transfer_schedule", "transfer_lr", "scratch_lr",
         "transfer", "scratch", "pixels", "gain_pp", "ci_pp", "seed_sd_pp", "test_se_pp", "q", "n_seeds",
         "verdict", "flags"]]), ""]


@SECTIONS.register("run", heading="## Run")
def run_section(p: Page) -> list[str]:
    """How many cells ran and failed, and the run's timing."""
    runs = p.t.runs
    status = runs["status"].value_counts().to_dict() if len(runs) else {}
    text = ["## Run", "", f"- cells: {len(runs)} ({', '.join(f'{k}: {v}' for k, v in status.items())})"]
    if not p.domains:
        text.append("- domain measures skipped (--skip-domains): targets in the study file's order, no estimator "
                    "ranked")
    return text + (["", "```", p.timing, "```"] if p.timing else [])


def build(study: Study, out: Path, timing: str | None = None, domains: bool = True) -> Path:
    """Write the tidy tables, the figures and report.md under `out`; returns the report path."""
    t = write_tables(study, out, domains)
    if timing:
        atomic.write_text(out / "timing.txt", timing + "\n")
    elif (out / "timing.txt").exists():
        timing = (out / "timing.txt").read_text(encoding="utf-8").strip()
    drawn = plots.draw_all(t, plots.make_style(t.runs, t.order, t.ordered_by), out / "figures") if len(t.runs) else []
    page = Page(study, t, {f.stem: f for f in drawn}, timing, domains)
    text: list[str] = [f"# transferbench study: {study.name}", ""]
    for name, write in SECTIONS.items():
        lines = write(page)
        page.written |= {name} if lines else set()
        closing = [f for f in plots.FIGURES if plots.FIGURES.meta(f)["section"] == name and f in page.figures]
        text += lines + (sum((figure_block(f, page.figures[f]) for f in closing), []) if lines else [])
    path = out / "report.md"
    atomic.write_text(path, "\n".join(text) + "\n")
    write_html(path, study.name)
    atomic.write_text(out / "findings.txt", "\n".join(page.found) + "\n")
    return path


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:.85em;margin:1em 0;display:block;max-width:100%;overflow-x:auto}
td,th{border:1px solid #ccc;padding:.2em .5em}th{background:#f3f3f3}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.5em 0}
blockquote{border-left:3px solid #ccc;margin:1em 0;padding:0 1em;color:#444}
code,pre{background:#f6f6f6}pre{overflow-x:auto}"""


# Links user text may keep in report.html; anything else (javascript:, data:, vbscript:, file:, relative, an
# obfuscated scheme) loses its link and stays as plain text. A prefix allowlist, not a blocklist of schemes.
SAFE_HREF = re.compile(r"(?:https?://|mailto:|#)", re.IGNORECASE)
FIGURE_SRC = re.compile(r"figures/[A-Za-z0-9_.-]+\.png")


def write_html(md_path: Path, title: str) -> Path:
    """report.html: the same content as report.md, one self-contained file (figures inlined).

    Every string in report.md may come from the user (study name and description, target and backbone names,
    error text from records); none of it may become live markup. The escaping is done here, once, on the way to
    HTML, rather than by escaping Markdown at each place a string enters report.md: that keeps report.md readable,
    lets a description's own Markdown (emphasis, lists) render, and covers strings added later without anyone
    having to remember. Three rules: raw HTML in the Markdown is rendered as literal text (Python-Markdown passes
    it through by default); a link survives only with an http(s)/mailto/# target; an image survives only as one of
    this report's own PNG figures, inlined, and every other image becomes its alt text."""
    import markdown
    from markdown.treeprocessors import Treeprocessor

    class Sanitize(Treeprocessor):
        def run(self, root):
            for el in root.iter():
                if el.tag == "a" and not SAFE_HREF.match(el.get("href", "")):
                    el.tag = "span"
                    el.attrib.clear()
                elif el.tag == "img":
                    src = el.get("src", "")
                    figure = md_path.parent / src
                    if FIGURE_SRC.fullmatch(src) and figure.is_file():
                        el.set("src", "data:image/png;base64," + base64.b64encode(figure.read_bytes()).decode())
                    else:
                        el.tag, el.text = "span", el.get("alt", "")
                        el.attrib.clear()

    md = markdown.Markdown(extensions=["tables", "fenced_code"])
    md.preprocessors.deregister("html_block")  # <div>...</div> blocks
    md.inlinePatterns.deregister("html")  # <tag ...> inside a paragraph
    md.treeprocessors.register(Sanitize(md), "sanitize", -10)  # after 'unescape' (0): sees the final attributes
    body = md.convert(md_path.read_text(encoding="utf-8"))
    html = (f"<!doctype html><html><head><meta charset='utf-8'><title>transferbench: {escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")
    return atomic.write_text(md_path.with_suffix(".html"), html)
