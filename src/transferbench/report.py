"""Records -> tidy tables -> analysis -> figures -> report.md. Rebuildable without training."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from . import analysis, plots
from .store import curves_table, read_records, runs_table
from .study import Study, expand


def pp(x: float) -> str:
    return "n/a" if pd.isna(x) else f"{100 * x:+.1f}"


def gain_text(row) -> str:
    return f"{pp(row.gain)} pp [{pp(row.ci_low)}, {pp(row.ci_high)}] ({row.verdict})"


def write_tables(study: Study, out: Path) -> dict[str, pd.DataFrame]:
    wanted = {c.cell_id for c in expand(study)}  # records of other configurations in the folder stay out
    records = [r for cid, r in read_records(out / "records").items() if cid in wanted]
    runs = runs_table(records)
    runs.to_csv(out / "runs.csv", index=False)
    curves_table(records).to_csv(out / "curves.csv", index=False)
    gains = analysis.gains(runs, study.analysis.n_bootstrap, study.analysis.confidence)
    gains.to_csv(out / "gains.csv", index=False)
    return dict(runs=runs, gains=gains, selected=analysis.select_on_val(gains))


def headlines(study: Study, selected: pd.DataFrame) -> list[str]:
    """Gain with CI at the smallest and largest size, for the nearest and the farthest target."""
    if selected.empty:
        return ["No transfer cell has a matched scratch cell yet: no gains to report."]
    conditions = [t.condition for t in study.targets]
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
    lines.append(f"Negative transfer (whole {int(study.analysis.confidence * 100)}% CI below zero): "
                 f"{len(negatives)} of {len(selected)} grid points (schedule chosen on val).")
    return lines


def markdown_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def build(study: Study, out: Path, timing: str | None = None) -> Path:
    """Write runs/curves/gains CSVs, the figures and report.md under `out`; returns the report path."""
    tables = write_tables(study, out)
    runs, selected = tables["runs"], tables["selected"]
    conditions = [t.condition for t in study.targets]
    figures = out / "figures"
    figs = []
    if not selected.empty:
        figs = [plots.accuracy_vs_size(runs, selected, conditions, figures)[0],
                plots.gain_heatmap(selected, conditions, figures)[0],
                plots.gain_by_condition(selected, conditions, figures)[0]]
    status = runs["status"].value_counts().to_dict() if len(runs) else {}
    shown = selected.sort_values(["backbone", "target", "frozen_groups", "n_per_class"]).assign(
        gain_pp=lambda d: d["gain"].map(pp), ci_pp=lambda d: [f"[{pp(a)}, {pp(b)}]" for a, b in zip(d.ci_low, d.ci_high)],
        transfer=lambda d: (100 * d["transfer_mean"]).round(1), scratch=lambda d: (100 * d["scratch_mean"]).round(1),
    )[["backbone", "target", "frozen_depth", "n_per_class", "schedule", "transfer", "scratch", "gain_pp", "ci_pp",
       "n_seeds", "verdict"]] if not selected.empty else selected
    text = [f"# transferbench study: {study.name}", "", study.description.strip(), "",
            "## Headline", "", "Test accuracy gain of transfer over the matched from-scratch baseline, mean over "
            f"seeds with a {int(study.analysis.confidence * 100)}% paired bootstrap CI; the LR schedule of each point "
            "is chosen on the validation split.", ""]
    text += [f"- {line}" for line in headlines(study, selected)]
    text += ["", "## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figs]
    text += ["", "## Gains (schedule chosen on validation)", "", markdown_table(shown) if len(shown) else "(none)"]
    text += ["", "## Run", "", f"- cells: {len(runs)} ({', '.join(f'{k}: {v}' for k, v in status.items())})",
             f"- targets, near to far: {', '.join(conditions)}",
             f"- backbones: {', '.join(f'{b.model} ({b.weights})' for b in study.backbones)}"]
    if timing:
        text += ["", "```", timing, "```"]
    path = out / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path


def save_study(study: Study, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.resolved.yaml").write_text(yaml.safe_dump(json.loads(study.model_dump_json()), sort_keys=False))


def load_saved_study(out: Path) -> Study:
    return Study.model_validate(yaml.safe_load((out / "study.resolved.yaml").read_text()))
