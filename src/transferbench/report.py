"""Records -> tidy tables -> analysis -> figures -> report.md. Rebuildable without training."""

from __future__ import annotations

import base64
import json
import re
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from . import analysis, atomic, plots
from .errors import ConfigError
from .store import curves_table, read_domains, read_records, runs_table
from .source import cells_of
from .study import Study, safe_yaml


def pp(x: float) -> str:
    return "n/a" if pd.isna(x) else f"{100 * x:+.1f}"


def gain_text(row) -> str:
    flags = getattr(row, "flags", "")
    return (f"{pp(row.gain)} pp [{pp(row.ci_low)}, {pp(row.ci_high)}] ({row.verdict})"
            + (f" [flagged: {flags}]" if isinstance(flags, str) and flags else ""))


def write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic.replacing(path) as tmp:
        df.to_csv(tmp, index=False)


def write_tables(study: Study, out: Path) -> dict[str, pd.DataFrame]:
    wanted = {c.cell_id for c in cells_of(study)}  # records of other configurations in the folder stay out
    records = [r for cid, r in read_records(out / "records").items() if cid in wanted]
    runs = runs_table(records)
    write_csv(runs, out / "runs.csv")
    curves = curves_table(records)
    write_csv(curves, out / "curves.csv")
    a = study.analysis
    gains = analysis.negative_transfer(analysis.gains(runs, a.confidence, a.fdr, a.min_effect))
    write_csv(gains, out / "gains.csv")
    selected = gains  # each arm's configuration already chosen on validation
    oracle = analysis.gains(runs, a.confidence, a.fdr, a.min_effect, on="test_acc")
    domains = read_domains(out)
    if domains is None:
        if (out / "domains.csv").exists():
            raise ConfigError(str(out / "domains.csv"), "damaged (truncated or edited)",
                              "rerun `transferbench study` on this study to rebuild it")
        domains = pd.DataFrame()
    estimators = pd.read_csv(out / "estimators.csv") if (out / "estimators.csv").exists() else None
    corr = analysis.correlations(domains, selected, study.analysis.n_bootstrap // 2, study.analysis.confidence,
                                 estimators=estimators)
    write_csv(corr, out / "correlations.csv")
    return dict(runs=runs, curves=curves, gains=gains, selected=selected, oracle=oracle, domains=domains,
                correlations=corr, estimators=estimators, fairness=analysis.fairness(runs),
                schedules=analysis.schedule_effect(runs))


def headlines(study: Study, t: dict) -> list[str]:
    """Gain with CI at the smallest and largest size, for the nearest and the farthest target as measured."""
    selected = t["selected"]
    if selected.empty:
        return ["No transfer cell has a matched scratch cell yet: no gains to report."]
    conditions, _ = distance_order([c.condition for c in study.targets], t["domains"])
    near, far = conditions[0], conditions[-1]
    sizes = sorted(selected["n_per_class"].unique())
    lines = []
    for bb in sorted(selected["backbone"].unique()):
        for tg in dict.fromkeys([near, far]):
            for n in dict.fromkeys([sizes[0], sizes[-1]]):
                sub = selected[(selected["backbone"] == bb) & (selected["target"] == tg) & (selected["n_per_class"] == n)]
                parts = [f"{analysis.depth_label(r.frozen_depth)}: {gain_text(r)}"
                         for r in sub.sort_values("frozen_groups").itertuples()]
                if parts:
                    lines.append(f"**{bb}**, {tg}, {n} per class -- " + "; ".join(parts))
    negatives = selected[selected["verdict"] == "negative"]
    lines.append(f"Negative transfer (q <= {study.analysis.fdr:g} after Benjamini-Hochberg, gain <= "
                 f"-{100 * study.analysis.min_effect:g} pp): {len(negatives)} of {len(selected)} grid points "
                 "(configurations chosen on val).")
    return lines


def findings(study: Study, t: dict) -> list[str]:
    """4-6 findings written from the numbers (configurations chosen on validation), for the report and the terminal;
    the first says how far the comparison can be trusted."""
    sel, corr = t["selected"], t["correlations"]
    if sel.empty:
        return ["no transfer cell has a matched scratch cell yet"]
    sizes = sorted(sel["n_per_class"].unique())
    by_size = sel.groupby("n_per_class")["gain"].mean()
    out = [fairness_sentence(t["runs"], sel)] if "converged" in t["runs"] else []
    out += [f"Mean gain of transfer over scratch: {pp(by_size[sizes[0]])} pp at {sizes[0]} examples per class, "
           f"{pp(by_size[sizes[-1]])} pp at {sizes[-1]} (over {sel['backbone'].nunique()} backbone(s), "
           f"{sel['target'].nunique()} target condition(s), {sel['frozen_depth'].nunique()} frozen depth(s))."]
    order = [c for c in distance_order([c.condition for c in study.targets], t["domains"])[0] if c in set(sel["target"])]
    by_target = sel.groupby("target")["gain"].mean().reindex(order)
    worst = by_target.idxmin()
    out.append(f"Nearest target as measured {order[0]}: {pp(by_target[order[0]])} pp; farthest {order[-1]}: "
               f"{pp(by_target[order[-1]])} pp; smallest gain on {worst} ({pp(by_target[worst])} pp).")
    neg = sel[sel["negative"]]
    where = ", ".join(f"{r.backbone} {r.target} frozen {r.frozen_depth} n={r.n_per_class} ({pp(r.gain)} pp)"
                      for r in neg.head(3).itertuples())
    out.append(f"Negative transfer (BH q <= {study.analysis.fdr:g}, |gain| >= {100 * study.analysis.min_effect:g} pp) "
               f"at {len(neg)} of {len(sel)} grid points"
               + (f": {where}" + (" ..." if len(neg) > 3 else "") if len(neg) else "") + ".")
    best = analysis.best_depth(sel)
    if len(best) and sel["frozen_depth"].nunique() > 1:
        counts = best.groupby("target")["frozen_depth"].agg(lambda d: d.value_counts().index[0]).reindex(order)
        out.append("Most often best frozen depth (on validation): " +
                   ", ".join(f"{tg}: {d}" for tg, d in counts.items()) + ".")
    ranking = analysis.measure_ranking(corr)
    if len(ranking):
        out.append(estimator_sentence(study, t, ranking))
    return out[:6]


def distance_order(conditions: list[str], domains: pd.DataFrame) -> tuple[list[str], str]:
    """Target conditions from near to far as measured (Frechet distance, mean over backbones), else as listed."""
    if domains.empty or "fd" not in domains:
        return conditions, "the study file"
    fd = domains.groupby("target")["fd"].mean()
    return sorted(conditions, key=lambda c: fd.get(c, np.inf)), "measured distance to the source (FD)"


def estimator_sentence(study: Study, t: dict, ranking: pd.DataFrame) -> str:
    """Which measure ranked the targets best, and whether it is distinguishable from the runner-up."""
    top = ranking.iloc[0]
    text = (f"Best predictor of the realized gain: {top.measure} (mean sign-adjusted Kendall tau {top.mean_agreement:+.2f} "
            f"across {int(top.targets)} targets, over {int(top.sizes)} size(s))")
    duel = analysis.top_two(t["domains"], t["selected"], ranking, study.analysis.n_bootstrap // 2,
                            study.analysis.confidence, estimators=t["estimators"])
    if duel is None:
        return text + "."
    word = "distinguishable" if duel["distinguishable"] else "not distinguishable"
    return (text + f"; {word} from {duel['second']} (difference {duel['difference']:+.2f}, "
            f"{study.analysis.confidence:.0%} CI [{duel['ci_low']:+.2f}, {duel['ci_high']:+.2f}] over targets).")


def markdown_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _fmt_gains(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(
        gain_pp=lambda d: d["gain"].map(pp), ci_pp=lambda d: [f"[{pp(a)}, {pp(b)}]" for a, b in zip(d.ci_low, d.ci_high)],
        seed_sd_pp=lambda d: (100 * d["gain_sd"]).round(1), test_se_pp=lambda d: (100 * d["test_se"]).round(1),
        q=lambda d: d["q"].map(lambda v: "n/a" if pd.isna(v) else f"{v:.3g}"),
        transfer=lambda d: (100 * d["transfer_mean"]).round(1))


def fairness_sentence(runs: pd.DataFrame, sel: pd.DataFrame) -> str:
    ok = analysis.ok_runs(runs)
    share = ok.groupby("arm")["converged"].mean()
    return (f"Converged: {', '.join(f'{arm} {100 * v:.0f}%' for arm, v in share.items())} of cells; "
            f"{int((sel['flags'] != '').sum())} of {len(sel)} grid points flagged, {int(sel['below_pixels'].sum())} with "
            "transfer below the best pixel baseline.")


def anchors(study: Study, t: dict) -> list[str]:
    """The findings a correct harness reproduces or refutes (DESIGN.md), each said plainly with its numbers."""
    sel, corr = t["selected"], t["correlations"]
    if sel.empty:
        return []
    lines = ["## Do the known findings reproduce?", ""]
    by_size = sel.groupby("n_per_class")["gain"].mean()
    shrinks = bool((np.diff(by_size.to_numpy()) < 0).all()) if len(by_size) > 1 else False
    lines.append("- Gains largest with little data, shrinking as data grows (VTAB-1k): mean gain "
                 + ", ".join(f"{pp(g)} pp at {n}" for n, g in by_size.items()) + " per class -- "
                 + ("**reproduces**." if shrinks else "**does not reproduce** here."))
    fd = corr[(corr["measure"] == "fd") & (corr["outcome"] == "gain")] if len(corr) else corr
    if len(fd):
        taus = ", ".join(f"{r.tau:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}] at {r.n_per_class}" for r in fd.itertuples())
        clear = fd[fd["ci_high"] < 0]
        lines.append(f"- Gains shrink as the target moves away from the source (Raghu et al. 2019; VTAB structured): "
                     f"Kendall tau of gain with measured Frechet distance across targets {taus} per class -- "
                     + (f"**reproduces** at {len(clear)} of {len(fd)} sizes (interval below 0)." if len(clear) else
                        "**not shown**: no interval lies below 0."))
    order, _ = distance_order([c.condition for c in study.targets], t["domains"])
    depths = sel.groupby(["target", "frozen_depth"])["gain"].mean().unstack()
    if {"0", "all"} <= set(depths.columns) and len(order) > 1:
        gap = (depths["all"] - depths["0"]).reindex(order).dropna()
        if len(gap) > 1:
            lines.append(f"- Deep frozen features transfer worst across a large gap (Yosinski et al. 2014): probe "
                         f"minus full fine-tuning {pp(gap.iloc[0])} pp on the nearest target ({gap.index[0]}), "
                         f"{pp(gap.iloc[-1])} pp on the farthest ({gap.index[-1]}) -- "
                         + ("**reproduces**." if gap.iloc[-1] < gap.iloc[0] else "**does not reproduce** here."))
    neg = sel[sel["verdict"] == "negative"]
    lines.append(f"- Negative transfer: {len(neg)} of {len(sel)} grid points"
                 + (": " + "; ".join(f"{r.backbone} {r.target} {analysis.depth_label(r.frozen_depth)} "
                                     f"n={r.n_per_class} {pp(r.gain)} pp" for r in neg.itertuples()) if len(neg) else "")
                 + ".")
    below = sel[sel["below_pixels"]]
    lines.append(f"- Transfer below the best pixel baseline at {len(below)} of {len(sel)} grid points"
                 + (" (" + ", ".join(sorted(set(below["target"]))) + ")" if len(below) else "") + ".")
    return lines + [""]


def fairness_section(study: Study, t: dict) -> list[str]:
    """'Is the comparison fair?': what every later number rests on, before any of them."""
    fair, sel = t["fairness"], t["selected"]
    lines = ["## Is the comparison fair?", ""]
    if fair.empty:
        return lines + ["These records carry no convergence check (written by an older transferbench): the gains "
                        "below may measure how far each arm got in its budget, not what it can reach.", ""]
    tr = study.train
    budget = f"{tr.steps} optimizer steps" if tr.steps else f"{tr.epochs} epochs"
    lines += [f"Budget: {budget} per cell (scratch x{study.scratch.budget_factor:g}), validation every "
              f"{tr.eval_every or (max(1, tr.steps // 20) if tr.steps else 'epoch (log-spaced)')} "
              f"{'steps' if tr.steps else ''}, early stopping after {tr.patience} validations without improvement, "
              "the best-validation weights tested; the linear probe is solved to convergence (L-BFGS, L2 chosen on "
              "validation). A network cell converged when validation stopped improving before its budget ran out or it "
              "fits its training subset (train accuracy >= 99%), and it does not predict one class for more than 90% "
              "of the test set; a convex fit (probe, pixel logistic regression) when its solver converged.", "",
              markdown_table(fair.assign(**{c: (100 * fair[c]).round(1) for c in ("converged", "collapsed",
                                                                                  "early_stopped")})
                             .rename(columns={"converged": "converged %", "collapsed": "collapsed %",
                                              "early_stopped": "early stopped %"})), ""]
    if len(sel):
        flagged = sel[sel["flags"] != ""]
        below = sel[sel["below_pixels"]]
        lines += [f"{len(flagged)} of {len(sel)} grid points are flagged (an arm not converged in every seed, or an "
                  f"arm below the best pixel baseline of the same subsets); {len(below)} have transfer below the pixels, "
                  f"{int(sel['scratch_below_pixels'].sum())} scratch. Flags are shown in the headline and the gains "
                  "table.", ""]
    return lines


def failure_section(study: Study, t: dict) -> list[str]:
    """'When transfer fails': negative points, where gains stop, best depth, estimator ranking."""
    selected, domains, corr = t["selected"], t["domains"], t["correlations"]
    lines = ["## When transfer fails", ""]
    neg = selected[selected["negative"]]
    lines.append(f"Negative transfer gap (Wang et al. 2019: transfer error minus scratch error), each arm's "
                 f"configuration chosen on validation: **{len(neg)} of {len(selected)}** grid points are called "
                 "negative. " + analysis.verdict_rule(study.analysis.fdr, study.analysis.min_effect, study.analysis.confidence))
    if len(neg):
        lines += ["", markdown_table(_fmt_gains(neg)[["backbone", "target", "frozen_depth", "n_per_class",
                                                       "transfer", "gain_pp", "ci_pp"]])]
    conditions = [c.condition for c in study.targets]
    by_target = selected.groupby("target").agg(mean_gain=("gain", "mean"), positive=("verdict", lambda v: (v == "positive").mean()))
    by_target = by_target.reindex([c for c in conditions if c in by_target.index])
    lines += ["", "Mean gain per target condition (near -> far), and the share of its grid points with a positive verdict:", ""]
    lines += [f"- {tg}: {pp(r.mean_gain)} pp, {100 * r.positive:.0f}% positive" for tg, r in by_target.iterrows()]
    if not domains.empty:
        d = domains.groupby("target")[["fd", "mmd", "pad", "bn_kl_mean"]].mean().reindex(by_target.index)
        lines += ["", "Measured distance to the source reference (mean over backbones):", "",
                  markdown_table(d.round(3).reset_index())]
    best = analysis.best_depth(selected)
    if len(best):
        lines += ["", "Best frozen depth per target (chosen on validation) at each size:", ""]
        pivot = best.pivot_table(index=["backbone", "target"], columns="n_per_class", values="frozen_depth",
                                 aggfunc="first").reset_index()
        pivot["target"] = pd.Categorical(pivot["target"], [c for c in conditions if c in set(pivot["target"])])
        lines.append(markdown_table(pivot.sort_values(["backbone", "target"]).astype(str)))
    ranking = analysis.measure_ranking(corr)
    if len(ranking):
        lines += ["", estimator_sentence(study, t, ranking) + " Per size, with a bootstrap over targets and the range "
                  "of leave-one-target-out taus:", "",
                  markdown_table(corr[corr["outcome"] == "gain"].drop(columns=["outcome", "expected_sign"]).round(3)),
                  "", "Mean over sizes:", "", markdown_table(ranking.round(3))]
    oracle = t["oracle"]
    if len(oracle):
        lines += ["", f"Model selection: with each arm's schedule and LR chosen on validation the mean gain is "
                  f"{pp(selected['gain'].mean())} pp; choosing on test (oracle, optimistic) would report "
                  f"{pp(oracle['gain'].mean())} pp."]
    if len(t["schedules"]):
        lines += ["", "The schedule as a factor: mean test accuracy (%) per arm and schedule, each at its own LR chosen "
                  "on validation:", "", markdown_table((100 * t["schedules"]).round(1).reset_index())]
    return lines


def build(study: Study, out: Path, timing: str | None = None) -> Path:
    """Write the tidy tables, the figures and report.md under `out`; returns the report path."""
    t = write_tables(study, out)
    runs, selected, domains = t["runs"], t["selected"], t["domains"]
    if timing:
        atomic.write_text(out / "timing.txt", timing + "\n")
    elif (out / "timing.txt").exists():
        timing = (out / "timing.txt").read_text(encoding="utf-8").strip()
    conditions = [c.condition for c in study.targets]
    figures = out / "figures"
    figs = []
    order, ordered_by = distance_order(conditions, domains)
    if not selected.empty:
        figs = [plots.accuracy_vs_size(runs, selected, conditions, figures)[0],
                plots.gain_heatmap(selected, conditions, figures)[0],
                plots.gain_by_condition(selected, order, figures, ordered_by)[0],
                plots.accuracy_vs_compute(runs, t["curves"], conditions, figures)[0]]
        if selected["weights"].nunique() > 1:
            figs.append(plots.transfer_matrix(selected, conditions, figures)[0])
        if not domains.empty:
            figs += [plots.gain_vs_distance(selected, domains, figures)[0],
                     plots.bn_divergence_profile(domains, conditions, figures)[0],
                     plots.estimators_vs_accuracy(selected, domains, t["correlations"], figures)[0]]
    status = runs["status"].value_counts().to_dict() if len(runs) else {}
    text = [f"# transferbench study: {study.name}", "", study.description.strip(), ""]
    text += fairness_section(study, t)
    text += ["## Headline", "", "Test accuracy gain of transfer over the matched from-scratch baseline; each arm's "
             "schedule and LR are chosen on its own validation accuracy. "
             + analysis.verdict_rule(study.analysis.fdr, study.analysis.min_effect, study.analysis.confidence), ""]
    text += [f"- {line}" for line in headlines(study, t)]
    text += ["", "## Findings", ""] + [f"{i}. {line}" for i, line in enumerate(findings(study, t), 1)]
    text += [""] + anchors(study, t)
    if not selected.empty:
        text += [""] + failure_section(study, t)
    text += ["", "## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figs]
    if not selected.empty:
        shown = _fmt_gains(selected.sort_values(["backbone", "target", "frozen_groups", "n_per_class"]))
        shown = shown.assign(scratch=(100 * shown["scratch_mean"]).round(1))
        shown = shown.assign(pixels=(100 * shown["pixels_best"]).round(1))
        text += ["", "## Gains (each arm's schedule and LR chosen on validation)", "", markdown_table(shown[
            ["backbone", "target", "frozen_depth", "n_per_class", "transfer_schedule", "transfer_lr", "scratch_lr",
             "transfer", "scratch", "pixels", "gain_pp", "ci_pp", "seed_sd_pp", "test_se_pp", "q", "n_seeds",
             "verdict", "flags"]])]
    text += ["", "## Run", "", f"- cells: {len(runs)} ({', '.join(f'{k}: {v}' for k, v in status.items())})",
             f"- targets, near to far: {', '.join(conditions)}",
             f"- backbones: {', '.join(f'{b.model} ({b.weights})' for b in study.backbones)}"]
    if timing:
        text += ["", "```", timing, "```"]
    path = out / "report.md"
    atomic.write_text(path, "\n".join(text) + "\n")
    write_html(path, study.name)
    atomic.write_text(out / "findings.txt", "\n".join(findings(study, t)) + "\n")
    return path


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:.85em;margin:1em 0}td,th{border:1px solid #ccc;padding:.2em .5em}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.5em 0}code,pre{background:#f6f6f6}"""


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


def save_study(study: Study, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "study.resolved.yaml", yaml.safe_dump(json.loads(study.model_dump_json()), sort_keys=False))


def load_saved_study(out: Path) -> Study:
    path = out / "study.resolved.yaml"
    return Study.model_validate(safe_yaml(path.read_text(), str(path)))
