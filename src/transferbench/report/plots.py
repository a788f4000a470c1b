"""Figures from the tidy tables, one registered function each (`FIGURES`), drawn for print: every figure fits a
page width (`PAGE_WIDTH` inches), saved as PNG at `DPI` and as SVG. One `Style` per report gives every target and
every arm (frozen depth, scratch, pixel baseline) the same colour in every figure: targets on a sequential
palette from near to far as measured, arms on a colour-blind-safe one. Axis titles are shared per figure, facets
wrap, legends sit below the panels, and `overlapping_labels` is what the tests use to check that no two labels
collide."""

from __future__ import annotations

import functools
import itertools
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
# Figure text is never parsed as mathtext: labels (a target's folder name, a weights path) are data, and a `$` or `\`
# in one made matplotlib raise while saving, after every cell had trained. Global: tick labels are made at save time.
matplotlib.rcParams.update({"text.parse_math": False, "text.usetex": False})
matplotlib.rcParams["svg.hashsalt"] = "transferbench"  # SVG ids from content, not random: same tables, same bytes
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from transferbench.analysis.dial import widest  # noqa: E402
from transferbench.analysis.gains import (  # noqa: E402
    POINT,
    SCRATCH_POINT,
    arm_labels,
    choose,
    mean_interval,
    ok_runs,
    with_tuning,
)
from transferbench.analysis.predictors import SIGNS  # noqa: E402
from transferbench.analysis.tables import Tables  # noqa: E402
from transferbench.core import atomic  # noqa: E402
from transferbench.core.paths import results_subfolder  # noqa: E402
from transferbench.core.registry import Registry  # noqa: E402
from transferbench.measures import MEASURES as REGISTERED  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

PAGE_WIDTH = 7.5  # inches: a full-width figure on a letter or A4 page with ~2.5 cm margins
DPI = 300  # print resolution of the PNGs (the SVGs are vector)
MAX_COLUMNS = 5  # facets wrap after this many panels
RC: dict[RcKeyType, Any]  # matplotlib checks the names
RC = {"font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "xtick.labelsize": 6, "ytick.labelsize": 6,
      "legend.fontsize": 6.5, "legend.title_fontsize": 7, "figure.titlesize": 8, "axes.spines.top": False,
      "axes.spines.right": False, "svg.fonttype": "none"}


# ---------------------------------------------------------------- one palette per report -----------------------

@dataclass(frozen=True)
class Style:
    """Colours and orders shared by every figure of one report."""
    targets: dict  # condition -> colour, near -> far
    arms: dict  # arm label ('frozen 0', ..., 'probe (all)', 'scratch', 'pixels: ...') -> colour
    ordered_by: str  # how the targets were ordered, for captions

    @property
    def target_order(self) -> list[str]:
        return list(self.targets)

    @property
    def arm_order(self) -> list[str]:
        return list(self.arms)


def arm_order(runs: pd.DataFrame) -> list[str]:
    """Every arm label in a fixed order: transfer depths from fully trained to fully frozen, scratch, pixels."""
    runs = ok_runs(runs) if "status" in runs else runs
    transfer = with_tuning(runs[runs["arm"] == "transfer"])
    trained = transfer["trained_fraction"] if "trained_fraction" in transfer else 1 - transfer["frozen_fraction"]
    key = pd.DataFrame({"groups": transfer["frozen_groups"], "trained": -trained.round(6),  # most trained first,
                        "prefix": ~transfer["tuning"].str.startswith("frozen"), "name": transfer["tuning"]})  # plain
    labels = list(dict.fromkeys(transfer.loc[key.sort_values(list(key.columns)).index, "tuning"]))
    pixels = sorted(set(arm_labels(runs[runs["arm"] == "pixels"])))
    return labels + (["scratch"] if (runs["arm"] == "scratch").any() else []) + pixels


def make_style(runs: pd.DataFrame, targets: list[str], ordered_by: str) -> Style:
    """Targets (already near -> far) on viridis, dark = near; transfer depths on the colour-blind palette, scratch
    always vermillion, the pixel baselines in greys (drawn dashed)."""
    cb = sns.color_palette("colorblind", 10)
    labels = arm_order(runs)
    depths = [lbl for lbl in labels if lbl != "scratch" and not lbl.startswith("pixels")]
    depth_colours = [cb[i] for i in (0, 2, 4, 9, 5, 1, 6)]  # never near scratch's vermillion
    arms = dict(zip(depths, itertools.cycle(depth_colours)))
    if "scratch" in labels:
        arms["scratch"] = cb[3]
    pixels = [lbl for lbl in labels if lbl.startswith("pixels")]
    arms |= dict(zip(pixels, [str(g) for g in np.linspace(0.35, 0.7, max(2, len(pixels)))]))
    shades = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(2, len(targets))))
    return Style(dict(zip(targets, [tuple(c) for c in shades])), arms, ordered_by)


def short(condition: str, width: int = 18) -> str:
    """A condition name broken at its '+' (the shift) and wrapped, for panel titles and tick labels."""
    return "\n".join(textwrap.wrap(condition.replace("+", " +"), width, break_on_hyphens=False)) or condition


# ---------------------------------------------------------------- layout helpers --------------------------------

def panels(n: int, panel_w: float = 1.45, panel_h: float = 1.35, columns: int = MAX_COLUMNS, sharex=True, sharey=True):
    """A wrapped grid of n panels at most a page wide, in the upper of two stacked subfigures (the lower one holds
    the legend, so a legend never covers a panel or the shared axis title); the unused cells are removed."""
    cols = max(1, min(n, columns, int(PAGE_WIDTH // panel_w)))
    rows = -(-n // cols)
    height = panel_h * rows + 0.9
    root = plt.figure(figsize=(min(PAGE_WIDTH, panel_w * cols + 0.6), height), layout="constrained")
    grid = root.add_gridspec(2, 1, height_ratios=[height, 1e-3])
    top, bottom = root.add_subfigure(grid[0]), root.add_subfigure(grid[1])
    axes = top.subplots(rows, cols, squeeze=False, sharex=sharex, sharey=sharey)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.remove()
    for ax in flat[:n]:  # a removed neighbour must not hide the tick labels of the panel above it
        ax.xaxis.set_tick_params(labelbottom=True)
    # attributes of our own on the figure (finish() reads them), which matplotlib's SubFigure does not declare
    top.legend_area, top.legend_grid = bottom, grid  # type: ignore[attr-defined]
    return top, flat[:n]


def finish(fig, axes, xlabel: str, ylabel: str, handles: list | None = None, *, title: str | None = None,
           legend_columns: int = 4):
    """One shared x and y title on the panels' subfigure, the legend in its own strip below; returns the figure."""
    for ax in axes:
        ax.set_xlabel("")
        ax.set_ylabel("")
    fig.supxlabel(xlabel, fontsize=7)
    fig.supylabel(ylabel, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    root = fig.get_figure(root=True)
    if handles and hasattr(fig, "legend_area"):
        rows = -(-len(handles) // legend_columns)
        extra = 0.16 * rows + 0.08
        top_h = root.get_figheight()
        root.set_figheight(top_h + extra)
        fig.legend_grid.set_height_ratios([top_h, extra])
        fig.legend_area.legend(handles=handles, loc="center", ncol=min(legend_columns, len(handles)), frameon=False)
    return root


def line(colour, label: str, **kw) -> Line2D:
    return Line2D([], [], color=colour, label=label, marker=kw.pop("marker", "o"), markersize=3.5, lw=1.2, **kw)


def size_axis(ax, sizes) -> None:
    """Log x axis with ticks at the sizes themselves (no '2x10^0' minor labels)."""
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    lo, hi = min(sizes), max(sizes)
    ax.set_xlim(lo / 1.35, hi * 1.35)


def overlapping_labels(fig, tolerance: float = 0.5) -> list[tuple[str, str]]:
    """Pairs of drawn tick labels, axis labels, titles and legend texts whose boxes overlap (in pixels, each box
    shrunk by `tolerance`): what a reader would see as text printed over text."""
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    texts = []
    for f in [fig, *subfigures(fig)]:
        texts += [t for t in (f._supxlabel, f._supylabel, f._suptitle) if t is not None]
        for legend in f.legends:
            texts += list(legend.get_texts()) + [legend.get_title()]
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks():
                inside = lo - 1e-9 * (abs(lo) + 1) <= tick.get_loc() <= hi + 1e-9 * (abs(hi) + 1)
                texts += [lbl for lbl in (tick.label1, tick.label2) if inside and lbl.get_visible()]
        if ax.get_legend():
            texts += list(ax.get_legend().get_texts()) + [ax.get_legend().get_title()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts
             if t.get_visible() and t.get_text().strip() and t.get_figure() is not None]
    boxes = [(s, b.expanded(1, 1).padded(-tolerance)) for s, b in boxes if b.width > 0 and b.height > 0]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]


def subfigures(fig) -> list:
    out = []
    for sub in getattr(fig, "subfigs", []):
        out += [sub, *subfigures(sub)]
    return out


def width_inches(fig) -> float:
    """The saved width (tight bounding box, as `save` writes it)."""
    return fig.get_tightbbox(fig.canvas.get_renderer()).width


def save(fig, directory: Path, name: str) -> list[Path]:
    """PNG and SVG, each written under a temporary name and renamed into place: a failed write (full disk)
    leaves no truncated figure behind, and the error propagates."""
    results_subfolder(directory)
    paths = [directory / f"{name}.{ext}" for ext in ("png", "svg")]
    try:
        for p in paths:
            with atomic.replacing(p) as tmp:
                fig.savefig(tmp, format=p.suffix[1:], dpi=DPI, bbox_inches="tight", metadata=_metadata(p.suffix))
                if p.suffix == ".svg":
                    tmp.write_text(stable_clip_ids(tmp.read_text(encoding="utf-8")), encoding="utf-8")
    finally:
        plt.close(fig)
    return paths


def stable_clip_ids(svg: str) -> str:
    """Clip-path ids numbered in order of appearance: matplotlib derives a non-rectangular clip path's id from the
    object's address (id()), which svg.hashsalt does not fix, so the same figure drawn twice differed there."""
    ids: dict[str, str] = {}
    return CLIP_ID.sub(lambda m: m.group(1) + ids.setdefault(m.group(2), f"clip{len(ids)}") + m.group(3), svg)


CLIP_ID = re.compile(r'((?:id="|url\(#))(p[0-9a-f]{10})([")])')


def _metadata(suffix: str) -> dict:
    # No creation date or software version in the files: rebuilding the same tables gives the same bytes.
    return {".png": {"Software": None}, ".svg": {"Date": None, "Creator": None}}[suffix]


# ---------------------------------------------------------------- the figures -----------------------------------

# name -> function(tables, style) -> Figure, or None when the tables cannot carry it (no domains, one source);
# metadata `section`: the report section the figure closes (document.SECTIONS; None: under "Figures").
FIGURES = Registry("figure")


def figure(name: str, section: str | None = None):
    def register(fn):
        @functools.wraps(fn)
        def draw(t: Tables, style: Style):
            with plt.rc_context(RC):
                return fn(t, style)
        FIGURES.register(name, section=section)(draw)
        return draw
    return register


def _facets(df: pd.DataFrame, style: Style) -> list[tuple[str, str]]:
    """(backbone, target) panels, targets near -> far within each backbone."""
    return [(bb, tg) for bb in sorted(df["backbone"].unique()) for tg in style.target_order if tg in set(df["target"])]


def _panel_title(ax, bb: str, tg: str, n_backbones: int) -> None:
    ax.set_title(short(tg) if n_backbones == 1 else f"{bb.replace('tf_efficientnet_', '')}\n{short(tg)}", fontsize=6.5)


def selected_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Per seed: transfer and scratch cells of the configuration each arm chose on validation, and the pixel
    baselines (repeated per backbone, so they sit in every panel), labelled by arm."""
    runs = ok_runs(runs)
    tr = choose(runs[runs["arm"] == "transfer"], POINT)
    sc = choose(runs[runs["arm"] == "scratch"], SCRATCH_POINT)
    px = runs[runs["arm"] == "pixels"]
    px = px.assign(label=arm_labels(px))  # named by method before the backbone column is reused
    px = pd.concat([px.assign(backbone=b) for b in sorted(set(tr["backbone"]))], ignore_index=True) \
        if len(px) and len(tr) else px
    networks = pd.concat([tr, sc], ignore_index=True)
    return pd.concat([networks.assign(label=arm_labels(networks)), px], ignore_index=True)


@figure("accuracy_vs_size", section="findings")
def accuracy_vs_size(t: Tables, style: Style):
    """Test accuracy against labelled examples per class, per backbone and target: every transfer depth and scratch
    (each at the configuration chosen on validation) beside the pixel baselines of the same k-shot subsets; mean
    over seeds with its t-interval."""
    df = selected_runs(t.runs)
    if df.empty:
        return None
    stats = mean_interval(df, ["backbone", "target", "label", "n_per_class"], "test_acc")
    stats["low"], stats["high"] = stats["ci_low"].fillna(stats["mean"]), stats["ci_high"].fillna(stats["mean"])
    facets = _facets(df, style)
    sizes = sorted(df["n_per_class"].unique())
    fig, axes = panels(len(facets))
    n_bb = df["backbone"].nunique()
    for ax, (bb, tg) in zip(axes, facets):
        for lbl in style.arm_order:
            s = stats[(stats["backbone"] == bb) & (stats["target"] == tg) & (stats["label"] == lbl)]
            if s.empty:
                continue
            dashed = lbl.startswith("pixels")
            ax.plot(s["n_per_class"], 100 * s["mean"], marker="o", ms=2.5, lw=1, color=style.arms[lbl],
                    ls="--" if dashed else "-")
            ax.fill_between(s["n_per_class"], 100 * s["low"], 100 * s["high"], color=style.arms[lbl], alpha=0.15, lw=0)
        size_axis(ax, sizes)
        ax.set_ylim(0, 100)
        _panel_title(ax, bb, tg, n_bb)
    handles = [line(c, lbl, ls="--" if lbl.startswith("pixels") else "-") for lbl, c in style.arms.items()
               if lbl in set(df["label"])]
    return finish(fig, axes, "labelled examples per class (log scale)", "test accuracy (%)", handles,
                  legend_columns=4)


@figure("gain_forest", section="headline")
def gain_forest(t: Tables, style: Style):
    """Forest plot: each grid point's gain over scratch with its t-interval over seeds; target conditions from
    near (top) to far as measured; one panel per backbone and size. Filled: a verdict (BH discovery of at least the
    minimum effect); open: inconclusive; a grey ring: flagged (an arm not converged or below the pixels)."""
    sel = t.selected
    if sel.empty:
        return None
    return forest(sel, style, "gain of transfer over scratch (pp), 95% t-interval over seeds")


@figure("arm_differences", section="arms")
def arm_differences(t: Tables, style: Style):
    """Which layers to train: each arm's test accuracy minus full fine-tuning's, paired by seed, with its t-interval
    over seeds; target conditions from near (top) to far. Filled: better or worse after Benjamini-Hochberg (and at
    least the minimum effect); open: inconclusive."""
    d = t.arm_differences
    if d.empty:
        return None
    return forest(d.rename(columns={"diff": "gain"}).assign(flags=""), style,
                  "test accuracy minus full fine-tuning's (pp), 95% t-interval over seeds")


def forest(rows: pd.DataFrame, style: Style, xlabel: str):
    """Rows with backbone, n_per_class, target, tuning, gain, ci_low, ci_high, verdict and flags, one panel per
    backbone and size, one line per arm and target."""
    depths = [lbl for lbl in style.arm_order if lbl in set(rows["tuning"])]
    sizes, backbones = sorted(rows["n_per_class"].unique()), sorted(rows["backbone"].unique())
    targets = [tg for tg in style.target_order if tg in set(rows["target"])]
    facets = list(itertools.product(backbones, sizes))
    fig, axes = panels(len(facets), panel_w=2.2 if len(facets) > 1 else 4.0,
                       panel_h=0.28 * len(targets) * max(1, len(depths)) ** 0.5 + 0.4, columns=len(sizes),
                       sharex=True, sharey=True)
    y = np.arange(len(targets))[::-1].astype(float)
    for ax, (bb, n) in zip(axes, facets):
        ax.axvline(0, color="black", lw=0.7)
        for j, lbl in enumerate(depths):
            sub = rows[(rows["backbone"] == bb) & (rows["n_per_class"] == n) & (rows["tuning"] == lbl)]
            sub = sub.set_index("target").reindex(targets)
            yy = y - (j - (len(depths) - 1) / 2) * min(0.22, 0.8 / len(depths))  # the first arm on top
            g, lo, hi = 100 * sub["gain"], 100 * sub["ci_low"], 100 * sub["ci_high"]
            ax.hlines(yy, lo, hi, color=style.arms[lbl], lw=1)
            called = ~sub["verdict"].fillna("inconclusive").isin(["inconclusive"]).to_numpy()
            ax.scatter(g[called], yy[called], s=12, color=style.arms[lbl], zorder=3)
            ax.scatter(g[~called], yy[~called], s=12, facecolors="white", edgecolors=style.arms[lbl], zorder=3)
            flagged = (sub["flags"].fillna("") != "").to_numpy()
            ax.scatter(g[flagged], yy[flagged], s=40, facecolors="none", edgecolors="0.55", lw=0.6, zorder=2)
        ax.set_yticks(y, [short(tg, 22) for tg in targets])
        ax.set_title(f"{bb.replace('tf_efficientnet_', '')}, {n} per class" if len(backbones) > 1 else f"{n} per class")
    handles = [line(style.arms[lbl], lbl, ls="-") for lbl in depths] + [
        Line2D([], [], ls="", marker="o", mfc="white", mec="0.2", ms=3.5, label="open: inconclusive")]
    if (rows["flags"].fillna("") != "").any():
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="0.55", ms=7, label="ring: flagged"))
    return finish(fig, axes, xlabel, f"target condition, near (top) to far, by {style.ordered_by}", handles,
                  legend_columns=5)


@figure("gain_heatmap")
def gain_heatmap(t: Tables, style: Style):
    """Mean gain (pp) per target (rows, near -> far) and frozen depth x size (columns), one panel per backbone."""
    sel = t.selected
    if sel.empty:
        return None
    depths = [lbl for lbl in style.arm_order if lbl != "scratch" and not lbl.startswith("pixels")]
    targets = [tg for tg in style.target_order if tg in set(sel["target"])]
    backbones = sorted(sel["backbone"].unique())
    df = sel.assign(label=sel["tuning"], g=100 * sel["gain"])
    lim = max(5.0, float(np.nanmax(np.abs(df["g"]))))
    cols = [(lbl, n) for lbl in depths for n in sorted(df["n_per_class"].unique())]
    axes: np.ndarray | list  # the grid, then its panels
    fig, axes = plt.subplots(len(backbones), 1, squeeze=False,
                             figsize=(min(PAGE_WIDTH, 0.5 * len(cols) + 2.2),
                                      (0.24 * len(targets) + 0.7) * len(backbones) + 0.3),
                             layout="constrained")
    axes = list(axes.flat)
    for ax, bb in zip(axes, backbones):
        table = df[df["backbone"] == bb].pivot_table(index="target", columns=["label", "n_per_class"], values="g")
        table = table.reindex(index=targets, columns=pd.MultiIndex.from_tuples(cols))
        sns.heatmap(table, ax=ax, cmap="RdBu", center=0, vmin=-lim, vmax=lim, annot=True, fmt=".0f", cbar=True,
                    cbar_kws={"label": "gain (pp)", "shrink": 0.8}, annot_kws={"size": 5.5})
        ax.set_xticks(np.arange(len(cols)) + 0.5, [f"{lbl.replace('frozen ', 'f')}\n{n}" for lbl, n in cols],
                      rotation=0)
        ax.set_yticks(np.arange(len(targets)) + 0.5, [short(tg, 24) for tg in targets], rotation=0)
        ax.set_title(bb if len(backbones) > 1 else "")
    return finish(fig, axes, "frozen depth (f0 = all layers trained) and labelled examples per class",
                  "target condition, near (top) to far")


@figure("gain_vs_fd")
def gain_vs_distance(t: Tables, style: Style, distance: str = "fd"):
    """Gain against each target's measured distance from the source (per backbone, its own features), one panel
    per backbone and size; colour = target, marker = frozen depth."""
    sel, domains = t.selected, t.domains
    if sel.empty or domains.empty or distance not in domains:
        return None
    df = sel.merge(domains[["backbone", "weights", "target", distance]], on=["backbone", "weights", "target"])
    if df.empty:
        return None
    depths = [lbl for lbl in style.arm_order if lbl != "scratch" and not lbl.startswith("pixels")]
    markers = dict(zip(depths, itertools.cycle("osD^vP")))
    df["label"] = df["tuning"]
    facets = list(itertools.product(sorted(df["backbone"].unique()), sorted(df["n_per_class"].unique())))
    # each backbone measures distance in its own feature space: a shared x axis within a row only
    fig, axes = panels(len(facets), panel_w=2.2, panel_h=1.6, columns=df["n_per_class"].nunique(), sharex="row")
    for ax, (bb, n) in zip(axes, facets):
        sub = df[(df["backbone"] == bb) & (df["n_per_class"] == n)]
        ax.axhline(0, color="black", lw=0.7)
        for r in sub.itertuples():
            yerr = [[100 * (r.gain - r.ci_low)], [100 * (r.ci_high - r.gain)]]
            ax.errorbar(getattr(r, distance), 100 * r.gain, yerr=yerr,
                        fmt=markers[r.label], ms=3, color=style.targets[r.target], lw=0.6, capsize=0)
        ax.set_title(f"{bb.replace('tf_efficientnet_', '')}, {n} per class")
    handles = [Line2D([], [], ls="", marker="s", ms=5, color=c, label=tg) for tg, c in style.targets.items()
               if tg in set(df["target"])] + [Line2D([], [], ls="", marker=markers[d], ms=4, color="0.3", label=d)
                                                for d in depths]
    return finish(fig, axes, f"{REGISTERED.meta(distance)['label']} to the source reference (frozen pooled features)",
                  "gain over scratch (pp)", handles, legend_columns=4)


@figure("dial", section="summary")
def dial_figure(t: Tables, style: Style, distance: str = "fd"):
    """The domain dial: each condition's gain over scratch (mean over seeds, its t-interval) against its measured
    distance from the source, colour = base dataset; the fitted line with its band (delete-one-dataset jackknife)
    and the break-even distance where the line reaches zero (dotted, with its interval shaded) when the dial
    reaches it."""
    lines = widest(t.dial, distance)
    if lines.empty:
        return None
    pts = t.selected.merge(t.domains[["backbone", "weights", "target", "dataset", distance]],
                           on=["backbone", "weights", "target"])
    keys = ["backbone", "weights", "tuning", "n_per_class"]
    datasets = sorted(pts["dataset"].unique())
    colours = dict(zip(datasets, sns.color_palette("colorblind", len(datasets))))
    fig, axes = panels(len(lines), panel_w=2.4, panel_h=1.8, columns=2, sharex=False)  # each backbone its own FD
    low, high = 100 * pts["ci_low"].min(), 100 * pts["ci_high"].max()
    pad = 0.1 * (high - low) if high > low else 1.0
    for ax, line in zip(axes, lines.itertuples()):
        ax.set_ylim(min(low, 0) - pad, max(high, 0) + pad)  # the points decide the scale, not a wide band's ends
        key = dict(zip(keys, (line.backbone, line.weights, line.tuning, line.n_per_class)))
        sub = pts.loc[(pts[keys] == pd.Series(key)).all(axis=1)]
        band = t.dial_band.loc[(t.dial_band[keys] == pd.Series(key)).all(axis=1)
                               & (t.dial_band["distance"] == distance) & (t.dial_band["outcome"] == "gain")]
        ax.axhline(0, color="black", lw=0.7)
        ax.fill_between(band["d"], 100 * band["low"], 100 * band["high"], color="0.85", lw=0)
        ax.plot(band["d"], 100 * band["fit"], color="0.3", lw=1)
        for r in sub.itertuples():
            ax.errorbar(getattr(r, distance), 100 * r.gain, yerr=[[100 * (r.gain - r.ci_low)],
                                                                   [100 * (r.ci_high - r.gain)]],
                        fmt="o", ms=3, color=colours[r.dataset], lw=0.6, capsize=0)
        if line.reached:
            ax.axvline(line.break_even, color="0.2", ls=":", lw=1)
            if np.isfinite(line.be_low) and np.isfinite(line.be_high):
                ax.axvspan(max(line.be_low, line.d_min), min(line.be_high, line.d_max), color="0.6", alpha=0.25,
                           lw=0)
        ax.set_title(f"{line.backbone.replace('tf_efficientnet_', '')}, {line.tuning}, {line.n_per_class} per "
                     "class")
    handles = [Line2D([], [], ls="", marker="o", ms=4, color=c, label=d) for d, c in colours.items()]
    return finish(fig, axes, f"{REGISTERED.meta(distance)['label']} to the source reference (frozen pooled features)",
                  "gain over scratch (pp)", handles, legend_columns=6)


@figure("bn_divergence_profile")
def bn_divergence_profile(t: Tables, style: Style):
    """Source-free: KL of each target's activation statistics from the BatchNorm running statistics, by depth group,
    beside the source reference's own."""
    domains = t.domains
    if domains.empty:
        return None
    cols = sorted((c for c in domains.columns if c.startswith("bn_kl_group")), key=lambda c: int(c[11:]))
    backbones = sorted(domains["backbone"].unique())
    fig, axes = panels(len(backbones), panel_w=3.0, panel_h=1.8, columns=2)
    groups = [int(c[11:]) for c in cols]
    for ax, bb in zip(axes, backbones):
        sub = domains[domains["backbone"] == bb]
        for tg in style.target_order:
            row = sub[sub["target"] == tg]
            if len(row):
                ax.plot(groups, row[cols].iloc[0].to_numpy(float), marker="o", ms=2.5, lw=1, color=style.targets[tg])
        ax.plot(groups, sub[[c.replace("group", "ref_group") for c in cols]].iloc[0].to_numpy(float), color="black",
                ls="--", lw=1, marker="o", ms=2)
        ax.set_yscale("log")
        ax.set_xticks(groups)
        ax.set_title(bb)
    handles = [line(c, tg) for tg, c in style.targets.items() if tg in set(domains["target"])] + [
        line("black", "source reference", ls="--")]
    return finish(fig, axes, "depth group (0 = input side)", "mean KL to BN running stats (nats)", handles,
                  legend_columns=3)


@figure("estimators_vs_accuracy")
def estimators_vs_accuracy(t: Tables, style: Style):
    """Each label-free distance and transferability estimate (rows of domains.csv) against the realized probe
    accuracy at the largest size; Kendall tau over targets in the title, with the number of targets."""
    sel, domains, corr = t.selected, t.domains, t.correlations
    if sel.empty or domains.empty:
        return None
    n = sel["n_per_class"].max()
    probe = sel[(sel["frozen_depth"].astype(str) == "all") & (sel["n_per_class"] == n)]
    probe = probe if len(probe) else sel[sel["n_per_class"] == n]
    df = probe[probe["tuning"] == probe["tuning"].iloc[0]].merge(domains, on=["backbone", "weights", "target"])
    measures = [m for m in SIGNS if m in df and df[m].notna().any()]
    if df.empty or not measures:
        return None
    fig, axes = panels(len(measures), panel_w=1.45, panel_h=1.3, sharex=False)
    backbones = sorted(df["backbone"].unique())
    markers = dict(zip(backbones, "ox^s"))
    n_targets = df["target"].nunique()
    for ax, m in zip(axes, measures):
        for r in df.itertuples():
            ax.scatter(getattr(r, m), 100 * r.transfer_mean, color=style.targets[r.target], marker=markers[r.backbone],
                       s=12)
        row = corr[(corr["measure"] == m) & (corr["outcome"] == "transfer_acc") & (corr["n_per_class"] == n)] \
            if len(corr) and "outcome" in corr else pd.DataFrame()
        tau = f"tau {row['tau'].iloc[0]:+.2f}" if len(row) and pd.notna(row["tau"].iloc[0]) else "tau n/a"
        ax.set_title(f"{REGISTERED.meta(m)['label']}: {tau}", fontsize=6.5)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(3))
    handles = [Line2D([], [], ls="", marker="s", ms=5, color=c, label=tg) for tg, c in style.targets.items()
               if tg in set(df["target"])] + [Line2D([], [], ls="", marker=markers[b], ms=4, color="0.3", label=b)
                                                for b in backbones]
    return finish(fig, axes, f"measure (value per backbone and target; Kendall tau over {n_targets} targets)",
                  f"probe test accuracy (%), {n} per class", handles, legend_columns=4)


@figure("accuracy_vs_compute")
def accuracy_vs_compute(t: Tables, style: Style):
    """Validation accuracy against images seen in training at the largest size (He et al. 2019: does scratch catch
    up with more compute?), mean over the cells of each arm."""
    runs, curves = ok_runs(t.runs), t.curves
    if runs.empty or curves.empty:
        return None
    n = runs["n_per_class"].max()
    cells = runs[(runs["n_per_class"] == n) & (runs["arm"] != "pixels")]
    df = curves[(curves["split"] == "val") & (curves["metric"] == "acc")].merge(
        cells.assign(label=arm_labels(cells))[["cell_id", "label", "target", "backbone"]], on="cell_id")
    if df.empty:
        return None
    facets = _facets(df, style)
    fig, axes = panels(len(facets))
    for ax, (bb, tg) in zip(axes, facets):
        sub = df[(df["backbone"] == bb) & (df["target"] == tg)]
        for lbl in style.arm_order:
            s = sub[sub["label"] == lbl].groupby("images_seen")["value"].mean()
            if len(s):
                ax.plot(s.index / 1000, 100 * s.to_numpy(), lw=1, color=style.arms[lbl])
        ax.set_ylim(0, 100)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(3))
        _panel_title(ax, bb, tg, df["backbone"].nunique())
    handles = [line(c, lbl, marker=None) for lbl, c in style.arms.items() if lbl in set(df["label"])]
    return finish(fig, axes, "training images seen (thousands)", "val accuracy (%)", handles,
                  title=f"{n} labelled examples per class")


@figure("fairness", section="fairness")
def fairness(t: Tables, style: Style):
    """Share of cells that converged, per arm and size (the bar the study holds itself to: 90%), beside the share
    that collapsed to one class."""
    runs = ok_runs(t.runs)
    if runs.empty or "converged" not in runs:
        return None
    runs = runs.assign(label=arm_labels(runs))
    share = runs.groupby(["label", "n_per_class"]).agg(converged=("converged", "mean"),
                                                      collapsed=("collapsed", "mean")).reset_index()
    sizes = sorted(share["n_per_class"].unique())
    labels = [lbl for lbl in style.arm_order if lbl in set(share["label"])]
    fig, axes = panels(2, panel_w=3.2, panel_h=1.7, columns=2, sharex=False, sharey=False)
    width = 0.8 / max(1, len(labels))
    for ax, what in zip(axes, ("converged", "collapsed")):
        for j, lbl in enumerate(labels):
            s = share[share["label"] == lbl].set_index("n_per_class").reindex(sizes)
            ax.bar(np.arange(len(sizes)) + (j - (len(labels) - 1) / 2) * width, 100 * s[what].fillna(0), width,
                   color=style.arms[lbl])
        ax.set_xticks(np.arange(len(sizes)), [str(n) for n in sizes])
        ax.set_ylim(0, 105)
        if what == "converged":
            ax.axhline(90, color="black", ls=":", lw=0.8)
        ax.set_title({"converged": "cells converged (%); dotted: 90%",
                      "collapsed": "cells predicting one class for >90% of test (%)"}[what])
    handles = [Line2D([], [], ls="", marker="s", ms=5, color=style.arms[lbl], label=lbl) for lbl in labels]
    return finish(fig, axes, "labelled examples per class", "share of cells (%)", handles, legend_columns=4)


def source_label(weights: str) -> str:
    """How a weight source names its weights in figures ('pretrain:glyphs:<hash>' -> 'glyphs-pretrained'; 'imagenet'
    stays): the `label` in its registry entry."""
    from transferbench.models.backbones import WEIGHTS, weight_source

    return WEIGHTS.meta(weight_source(str(weights))).get("label", str)(str(weights))


@figure("transfer_matrix")
def transfer_matrix(t: Tables, style: Style):
    """Gain (pp) with its CI for every source x target pair, where a study has several weight sources; negative
    points marked."""
    sel = t.selected
    if sel.empty or sel["weights"].nunique() < 2:
        return None
    df = sel.assign(source=sel["weights"].map(source_label))
    keys = sorted(df.groupby(["backbone", "tuning", "n_per_class"]).groups)
    cols = [tg for tg in style.target_order if tg in set(df["target"])]
    fig, axes = panels(len(keys), panel_w=max(1.6, 0.75 * len(cols) + 0.8), panel_h=0.45 * df["source"].nunique() + 0.9,
                       columns=3, sharex=False, sharey=True)
    lim = max(5.0, float(np.nanmax(np.abs(100 * df["gain"]))))
    for ax, (bb, tuning, n) in zip(axes, keys):
        sub = df[(df["backbone"] == bb) & (df["tuning"] == tuning) & (df["n_per_class"] == n)]
        gain = sub.pivot_table(index="source", columns="target", values="gain").reindex(columns=cols) * 100
        text = sub.assign(t=[f"{100 * g:+.0f}\n[{100 * lo:+.0f},{100 * hi:+.0f}]" + ("\nNEG" if v == "negative" else "")
                             for g, lo, hi, v in zip(sub["gain"], sub["ci_low"], sub["ci_high"], sub["verdict"])]
                          ).pivot(index="source", columns="target", values="t").reindex(index=gain.index, columns=cols)
        sns.heatmap(gain, ax=ax, cmap="RdBu", center=0, vmin=-lim, vmax=lim, annot=text, fmt="",
                    annot_kws={"size": 5}, cbar=False)
        ax.set_xticks(np.arange(len(cols)) + 0.5, [short(c, 10) for c in cols], rotation=0)
        ax.set_title(f"{bb.replace('tf_efficientnet_', '')}, {tuning}, {n} per class")
    return finish(fig, axes, "target", "source")


def draw_all(t: Tables, style: Style, directory: Path) -> list[Path]:
    """Every registered figure the tables can carry, saved; the PNG paths, in registry order. The figures folder
    is the report's own: a PNG or SVG this build did not draw (a figure the tables cannot carry, or one of
    another name) is removed, so the folder never shows a stale picture."""
    out = []
    for name, draw in FIGURES.items():
        fig = draw(t, style)
        if fig is not None:
            out.append(save(fig, directory, name)[0])
    drawn = {p.stem for p in out}
    for stale in [*directory.glob("*.png"), *directory.glob("*.svg")] if directory.exists() else []:
        if stale.stem not in drawn:
            stale.unlink()
    return out
