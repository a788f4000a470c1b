"""Figures from the tidy tables (PNG + SVG). Colour-blind-safe palette, fixed depth order, zero lines."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .analysis import depth_label, ok_runs  # noqa: E402

PALETTE = "colorblind"


def _save(fig, directory: Path, name: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{name}.{ext}" for ext in ("png", "svg")]
    for p in paths:
        fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths


def _depth_order(df: pd.DataFrame) -> list[str]:
    order = df.sort_values("frozen_groups")["label"].drop_duplicates().tolist()
    return [lbl for lbl in order if lbl != "scratch"] + (["scratch"] if "scratch" in order else [])


def accuracy_vs_size(runs: pd.DataFrame, selected: pd.DataFrame, targets: list[str], directory: Path):
    """Test accuracy against examples per class, per target: each frozen depth and scratch (schedule chosen on val)."""
    runs = ok_runs(runs)
    keep = selected[["backbone", "target", "frozen_depth", "n_per_class", "schedule"]]
    tr = runs[runs["arm"] == "transfer"].merge(keep, on=list(keep.columns))
    sc = runs[runs["arm"] == "scratch"].merge(keep.drop(columns="frozen_depth").drop_duplicates(),
                                              on=["backbone", "target", "n_per_class", "schedule"])
    df = pd.concat([tr, sc.drop_duplicates("cell_id")], ignore_index=True)
    df["label"] = [depth_label(d, a) for d, a in zip(df["frozen_depth"], df["arm"])]
    df["test accuracy (%)"] = 100 * df["test_acc"]
    g = sns.relplot(df, x="n_per_class", y="test accuracy (%)", hue="label", hue_order=_depth_order(df),
                    col="target", col_order=[t for t in targets if t in set(df["target"])], row="backbone",
                    kind="line", marker="o", errorbar=("ci", 95), palette=PALETTE, height=2.6, aspect=1.0,
                    facet_kws=dict(sharey=True, sharex=True))
    g.set(xscale="log", ylim=(0, 100))
    g.set_axis_labels("labelled examples per class (log)", "test accuracy (%)")
    g.set_titles("{row_name}\n{col_name}", size=8)
    g.legend.set_title("arm / frozen depth")
    return _save(g.figure, directory, "accuracy_vs_size")


def gain_heatmap(selected: pd.DataFrame, targets: list[str], directory: Path):
    """Gain (pp) over frozen depth x examples per class, one panel per backbone and target."""
    df = selected.copy()
    df["gain (pp)"] = 100 * df["gain"]
    df["label"] = [depth_label(d) for d in df["frozen_depth"]]
    order = _depth_order(df)
    backbones = sorted(df["backbone"].unique())
    cols = [t for t in targets if t in set(df["target"])]
    lim = max(5.0, float(np.nanmax(np.abs(df["gain (pp)"]))) if len(df) else 5.0)
    fig, axes = plt.subplots(len(backbones), len(cols), figsize=(2.4 * len(cols) + 1, 2.2 * len(backbones)),
                             squeeze=False, sharex=True, sharey=True)
    for r, bb in enumerate(backbones):
        for c, tg in enumerate(cols):
            sub = df[(df["backbone"] == bb) & (df["target"] == tg)]
            table = sub.pivot_table(index="label", columns="n_per_class", values="gain (pp)").reindex(order)
            sns.heatmap(table, ax=axes[r, c], cmap="RdBu", center=0, vmin=-lim, vmax=lim, annot=True, fmt=".0f",
                        cbar=c == len(cols) - 1, cbar_kws={"label": "gain over scratch (pp)"}, annot_kws={"size": 7})
            axes[r, c].set_title(f"{bb}\n{tg}", fontsize=8)
            axes[r, c].set_xlabel("examples per class" if r == len(backbones) - 1 else "")
            axes[r, c].set_ylabel("frozen depth" if c == 0 else "")
    fig.tight_layout()
    return _save(fig, directory, "gain_heatmap")


def gain_by_condition(selected: pd.DataFrame, targets: list[str], directory: Path):
    """Gain with its bootstrap CI across target conditions (near -> far), per size and depth."""
    df = selected.copy()
    df["label"] = [depth_label(d) for d in df["frozen_depth"]]
    order = _depth_order(df)
    cols = [t for t in targets if t in set(df["target"])]
    sizes = sorted(df["n_per_class"].unique())
    backbones = sorted(df["backbone"].unique())
    colors = dict(zip(order, sns.color_palette(PALETTE, len(order))))
    fig, axes = plt.subplots(len(backbones), len(sizes), figsize=(3.2 * len(sizes) + 1, 2.8 * len(backbones)),
                             squeeze=False, sharey=True)
    x = np.arange(len(cols))
    for r, bb in enumerate(backbones):
        for c, n in enumerate(sizes):
            ax = ax_ = axes[r, c]
            ax.axhline(0, color="black", lw=0.8)
            for j, lbl in enumerate(order):
                sub = df[(df["backbone"] == bb) & (df["n_per_class"] == n) & (df["label"] == lbl)]
                sub = sub.set_index("target").reindex(cols)
                off = (j - (len(order) - 1) / 2) * 0.12
                yerr = np.vstack([sub["gain"] - sub["ci_low"], sub["ci_high"] - sub["gain"]]) * 100
                ax_.errorbar(x + off, 100 * sub["gain"], yerr=np.nan_to_num(yerr), fmt="o", ms=4, capsize=2,
                             color=colors[lbl], label=lbl if (r, c) == (0, 0) else None)
            ax.set_xticks(x, cols, rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{bb}, {n} per class", fontsize=8)
            ax.set_ylabel("gain over scratch (pp)" if c == 0 else "")
    axes[0, 0].legend(fontsize=7, title="frozen depth", title_fontsize=7)
    fig.supxlabel("target condition (near the source -> far)", fontsize=9)
    fig.tight_layout()
    return _save(fig, directory, "gain_by_condition")
