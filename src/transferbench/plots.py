"""Figures from the tidy tables (PNG + SVG). Colour-blind-safe palette, fixed depth order, zero lines."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from . import atomic  # noqa: E402
from .analysis import depth_label, ok_runs  # noqa: E402

PALETTE = "colorblind"


def _save(fig, directory: Path, name: str) -> list[Path]:
    """PNG and SVG, each written under a temporary name and renamed into place: a failed write (full disk)
    leaves no truncated figure behind, and the error propagates."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{name}.{ext}" for ext in ("png", "svg")]
    try:
        for p in paths:
            with atomic.replacing(p) as tmp:
                fig.savefig(tmp, format=p.suffix[1:], dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return paths


def _by_source(df: pd.DataFrame) -> pd.DataFrame:
    """Where one architecture has several weight sources (source_choice), panels are per source."""
    if "weights" in df and df[df["arm"].ne("scratch") if "arm" in df else slice(None)].groupby("backbone")["weights"].nunique().max() > 1:
        df = df.copy()
        transfer = df["arm"].ne("scratch") if "arm" in df else pd.Series(True, index=df.index)
        df.loc[transfer, "backbone"] = df.loc[transfer, "backbone"] + " | " + df.loc[transfer, "weights"].map(source_label)
    return df


def _depth_order(df: pd.DataFrame) -> list[str]:
    order = df.sort_values("frozen_groups")["label"].drop_duplicates().tolist()
    last = ["scratch"] + sorted(lbl for lbl in order if lbl.startswith("pixels"))
    return [lbl for lbl in order if lbl not in last] + [lbl for lbl in last if lbl in order]


def accuracy_vs_size(runs: pd.DataFrame, selected: pd.DataFrame, targets: list[str], directory: Path):
    """Test accuracy against examples per class, per target: each frozen depth and scratch (each arm's configuration
    chosen on val), beside the pixel baselines of the same k-shot subsets."""
    from .analysis import POINT, SCRATCH_POINT, choose

    runs = ok_runs(runs)
    tr = choose(runs[runs["arm"] == "transfer"], POINT)
    sc = choose(runs[runs["arm"] == "scratch"], SCRATCH_POINT)
    px = runs[runs["arm"] == "pixels"]
    px = pd.concat([px.assign(method=px["backbone"], backbone=b) for b in sorted(set(tr["backbone"]))], ignore_index=True)
    df = pd.concat([_by_source(tr), sc.drop_duplicates("cell_id"), px], ignore_index=True)
    df["label"] = [f"pixels: {m}" if a == "pixels" else depth_label(d, a)
                   for d, a, m in zip(df["frozen_depth"], df["arm"], df.get("method", df["arm"]))]
    df["test accuracy (%)"] = 100 * df["test_acc"]
    g = sns.relplot(df, x="n_per_class", y="test accuracy (%)", hue="label", hue_order=_depth_order(df),
                    col="target", col_order=[t for t in targets if t in set(df["target"])], row="backbone",
                    kind="line", marker="o", errorbar=("ci", 95), n_boot=200, seed=0, palette=PALETTE, height=2.6, aspect=1.0,
                    facet_kws=dict(sharey=True, sharex=True))
    g.set(xscale="log", ylim=(0, 100))
    sizes = sorted(df["n_per_class"].unique())
    for ax in g.axes.flat:  # the sizes themselves as ticks, not powers of ten
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    g.set_axis_labels("labelled examples per class (log)", "test accuracy (%)")
    g.set_titles("{row_name}\n{col_name}", size=8)
    g.legend.set_title("arm / frozen depth")
    return _save(g.figure, directory, "accuracy_vs_size")


def gain_heatmap(selected: pd.DataFrame, targets: list[str], directory: Path):
    """Gain (pp) over frozen depth x examples per class, one panel per backbone and target."""
    df = _by_source(selected)
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


def gain_by_condition(selected: pd.DataFrame, targets: list[str], directory: Path, ordered_by: str = "the study file"):
    """Forest plot: each gain with its t-interval over seeds, target conditions in the given order (by measured
    distance where there is one), per size and depth. Filled markers are verdicts (BH discoveries of at least the
    minimum effect); open markers are inconclusive."""
    df = _by_source(selected)
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
                ax_.errorbar(x + off, 100 * sub["gain"], yerr=np.nan_to_num(yerr), fmt="none", capsize=2,
                             color=colors[lbl])
                called = (sub["verdict"] != "inconclusive").to_numpy()
                ax_.scatter((x + off)[called], 100 * sub["gain"][called], s=16, color=colors[lbl],
                            label=lbl if (r, c) == (0, 0) else None)
                ax_.scatter((x + off)[~called], 100 * sub["gain"][~called], s=16, facecolors="white",
                            edgecolors=colors[lbl])
                flagged = (sub["flags"].fillna("") != "").to_numpy() if "flags" in sub else np.zeros(len(x), bool)
                ax_.scatter((x + off)[flagged], 100 * sub["gain"][flagged], s=40, marker="x", color="0.3", lw=0.8,
                            label="flagged" if (r, c, j) == (0, 0, 0) and flagged.any() else None)
            ax.set_xticks(x, cols, rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{bb}, {n} per class", fontsize=8)
            ax.set_ylabel("gain over scratch (pp)" if c == 0 else "")
    axes[0, 0].legend(fontsize=7, title="frozen depth", title_fontsize=7)
    fig.supxlabel(f"target condition, ordered by {ordered_by} (filled: a verdict; open: inconclusive; x: flagged, "
                  "see the gains table)", fontsize=9)
    fig.tight_layout()
    return _save(fig, directory, "gain_by_condition")


def gain_vs_distance(selected: pd.DataFrame, domains: pd.DataFrame, directory: Path, distance: str = "fd"):
    """Gain against the measured distance of each target from the source, per depth and size."""
    df = selected.merge(domains[["backbone", "weights", "target", distance]], on=["backbone", "weights", "target"])
    df["label"] = [depth_label(d) for d in df["frozen_depth"]]
    df["gain (pp)"] = 100 * df["gain"]
    g = sns.relplot(df, x=distance, y="gain (pp)", hue="label", hue_order=_depth_order(df), style="backbone",
                    col="n_per_class", kind="scatter", palette=PALETTE, height=2.8, aspect=1.1, s=45)
    for ax in g.axes.flat:
        ax.axhline(0, color="black", lw=0.8)
    names = {"fd": "Frechet distance to the source reference", "mmd": "MMD^2 to the source reference",
             "pad": "proxy A-distance to the source reference"}
    g.set_axis_labels(names.get(distance, distance) + " (frozen features)", "gain over scratch (pp)")
    g.set_titles("{col_name} examples per class")
    g.legend.set_title("frozen depth")
    return _save(g.figure, directory, f"gain_vs_{distance}")


def bn_divergence_profile(domains: pd.DataFrame, targets: list[str], directory: Path):
    """Source-free: KL of target activation stats from the BatchNorm running stats, by depth group."""
    cols = sorted((c for c in domains.columns if c.startswith("bn_kl_group")), key=lambda c: int(c[11:]))
    long = domains.melt(id_vars=["backbone", "target"], value_vars=cols, var_name="group", value_name="KL")
    long["depth group"] = long["group"].str[11:].astype(int)
    ref = domains.drop_duplicates("backbone").melt(
        id_vars=["backbone"], value_vars=[c.replace("group", "ref_group") for c in cols], var_name="group", value_name="KL")
    ref["depth group"], ref["target"] = ref["group"].str[15:].astype(int), "source reference"
    long = pd.concat([long, ref], ignore_index=True)
    order = [t for t in targets if t in set(long["target"])] + ["source reference"]
    g = sns.relplot(long, x="depth group", y="KL", hue="target", hue_order=order, col="backbone", kind="line",
                    marker="o", palette=PALETTE, height=3, aspect=1.2)
    g.set(yscale="log")
    g.set_axis_labels("depth group (input side = 0)", "mean KL to BN running stats (nats, log)")
    return _save(g.figure, directory, "bn_divergence_profile")


def estimators_vs_accuracy(selected: pd.DataFrame, domains: pd.DataFrame, corr: pd.DataFrame, directory: Path):
    """Each estimator against the realized probe accuracy at the largest size, Kendall tau in the title."""
    from .analysis import MEASURES

    n = selected["n_per_class"].max()
    probe = selected[(selected["frozen_depth"].astype(str) == "all") & (selected["n_per_class"] == n)]
    if probe.empty:
        probe = selected[selected["n_per_class"] == n]
    depth = str(probe["frozen_depth"].iloc[0])
    df = probe.merge(domains, on=["backbone", "weights", "target"])
    measures = [m for m in MEASURES if m in df and df[m].notna().any()]
    fig, axes = plt.subplots(1, len(measures), figsize=(2.6 * len(measures), 2.8), squeeze=False)
    for ax, m in zip(axes[0], measures):
        sns.scatterplot(df, x=m, y=100 * df["transfer_mean"], hue="target", style="backbone", ax=ax,
                        palette=PALETTE, legend=ax is axes[0, -1], s=40)
        row = corr[(corr["measure"] == m) & (corr["outcome"] == "transfer_acc") & (corr["n_per_class"] == n)] \
            if len(corr) else corr  # fewer than 3 targets: no tau
        tau = row["tau"].iloc[0] if len(row) else float("nan")
        ax.set_title(f"{m}: tau = {tau:.2f} (targets)", fontsize=8)
        ax.set_ylabel("transfer test accuracy (%)" if ax is axes[0, 0] else "")
    axes[0, -1].legend(fontsize=6, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle(f"transferability estimates vs realized accuracy (frozen {depth}, {n} per class)", fontsize=9)
    fig.tight_layout()
    return _save(fig, directory, "estimators_vs_accuracy")


def accuracy_vs_compute(runs: pd.DataFrame, curves: pd.DataFrame, targets: list[str], directory: Path):
    """Validation accuracy against images seen in training (He et al. 2019: does scratch catch up?)."""
    runs = ok_runs(runs)
    n = runs["n_per_class"].max()
    sel = runs[(runs["n_per_class"] == n)][["cell_id", "arm", "frozen_depth", "frozen_groups", "target", "backbone"]]
    df = curves[(curves["split"] == "val") & (curves["metric"] == "acc")].merge(sel, on="cell_id")
    df["label"] = [depth_label(d, a) for d, a in zip(df["frozen_depth"], df["arm"])]
    df["val accuracy (%)"] = 100 * df["value"]
    g = sns.relplot(df, x="images_seen", y="val accuracy (%)", hue="label", hue_order=_depth_order(df),
                    col="target", col_order=[t for t in targets if t in set(df["target"])], row="backbone",
                    kind="line", errorbar=("ci", 95), n_boot=200, seed=0, palette=PALETTE, height=2.4, aspect=1.0)
    g.set_axis_labels("training images seen", "val accuracy (%)")
    g.set_titles("{row_name}\n{col_name}", size=8)
    g.figure.suptitle(f"{n} examples per class", y=1.01, fontsize=9)
    return _save(g.figure, directory, "accuracy_vs_compute")


def source_label(weights: str) -> str:
    """'pretrain:glyphs:<hash>' -> 'glyphs-pretrained'; 'imagenet' stays."""
    return f"{weights.split(':')[1]}-pretrained" if str(weights).startswith("pretrain:") else str(weights)


def transfer_matrix(selected: pd.DataFrame, targets: list[str], directory: Path):
    """Gain (pp) with its CI for every source x target pair; negative cells (whole CI < 0) marked."""
    df = selected.copy()
    df["source"] = df["weights"].map(source_label)
    panels = sorted(df.groupby(["backbone", "frozen_depth", "n_per_class"]).groups)
    cols = [t for t in targets if t in set(df["target"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 * len(cols) * len(panels) + 2, 0.7 * df["source"].nunique() + 1.6),
                             squeeze=False)
    lim = max(5.0, float(np.nanmax(np.abs(100 * df["gain"]))))
    for ax, (bb, depth, n) in zip(axes[0], panels):
        sub = df[(df["backbone"] == bb) & (df["frozen_depth"] == depth) & (df["n_per_class"] == n)]
        gain = sub.pivot_table(index="source", columns="target", values="gain").reindex(columns=cols) * 100
        text = sub.assign(t=[f"{100 * g:+.0f}\n[{100 * lo:+.0f},{100 * hi:+.0f}]" + ("\nNEG" if v == "negative" else "")
                             for g, lo, hi, v in zip(sub["gain"], sub["ci_low"], sub["ci_high"], sub["verdict"])]
                          ).pivot(index="source", columns="target", values="t").reindex(index=gain.index, columns=cols)
        sns.heatmap(gain, ax=ax, cmap="RdBu", center=0, vmin=-lim, vmax=lim, annot=text, fmt="",
                    annot_kws={"size": 7}, cbar=ax is axes[0, -1], cbar_kws={"label": "gain over scratch (pp)"})
        ax.set_title(f"{bb}, frozen {depth}, {n} per class", fontsize=8)
        ax.set_xlabel("target")
        ax.set_ylabel("source" if ax is axes[0, 0] else "")
    fig.tight_layout()
    return _save(fig, directory, "transfer_matrix")
