"""The trend figure: gains per target, each arm's accuracy and its speed along recorded commits, with the change
points `analysis.history.change_points` found and the commits where the host class or the dependencies changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from transferbench.analysis.gains import mean_interval
from transferbench.report.plots import PAGE_WIDTH, plt, save


def trend_figure(values: pd.DataFrame, speed: pd.DataFrame, points: pd.DataFrame, commits: pd.DataFrame,
                 directory: Path) -> list[Path]:
    """Three panels sharing the commit axis; `commits` has one row per order with commit, host_class, packages."""
    fig, axes = plt.subplots(3, 1, figsize=(PAGE_WIDTH, 7.5), sharex=True)
    panels = [(axes[0], values[values["what"].str.startswith("gain ")], "gain over scratch (pp)"),
              (axes[1], values[values["what"].str.endswith(" accuracy")], "test accuracy (%)")]
    for ax, part, label in panels:
        for what, g in part.groupby("what", sort=True):
            m = mean_interval(g.rename(columns={"value": "v"}), ["order"], "v", 0.95)
            line, = ax.plot(m["order"], 100 * m["mean"], marker="o", ms=3, lw=1, label=what)
            ax.fill_between(m["order"], 100 * m["ci_low"], 100 * m["ci_high"], color=line.get_color(), alpha=0.15)
            hits = points[(points["what"] == what) & points["change"]]
            ax.scatter(hits["order"], 100 * m.set_index("order").loc[hits["order"], "mean"], s=80,
                       facecolors="none", edgecolors="red", zorder=5)
        ax.set_ylabel(label)
        ax.legend(fontsize=7, ncol=3, loc="best")
    for arm, g in speed.groupby("arm"):
        axes[2].plot(g["order"], g["images_per_second"], marker="o", ms=3, lw=1, label=arm)
    axes[2].set_ylabel("median images/s")
    axes[2].legend(fontsize=7)
    changed = [o for o in range(1, len(commits)) if (commits.iloc[o][["host_class", "packages"]]
                                                     != commits.iloc[o - 1][["host_class", "packages"]]).any()]
    for ax in axes:
        for o in changed:
            ax.axvline(o - 0.5, color="grey", ls="--", lw=0.8)
    axes[2].set_xticks(np.arange(len(commits)), [c[:7] for c in commits["commit"]], rotation=90, fontsize=7)
    axes[2].set_xlabel("recorded commit (dashed: host class or dependency versions changed; red ring: change point)")
    fig.tight_layout()
    return save(fig, directory, "trend")  # closes the figure
