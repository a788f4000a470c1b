"""`transferbench compare BASE NEW`: did the harness regress, judged against its own noise.

Float results of training differ between machines of one kind (CPU kernels differ) and between
seeds, so the gate never compares numbers for equality. It reads the seed-level cells of both
runs (runs.csv) and asks, for every grid point and for aggregates of them, whether the new gain
(and each arm's accuracy: a broken scratch arm inflates the gain) is lower than the base's by more
than a practical margin, with a one-sided Welch t-test over seeds. The point tests form one family
under Benjamini-Hochberg, the aggregate tests another (q <= fdr); a test regresses when it is a
discovery. Aggregates (per target, per transfer arm, and overall) take each seed's mean over the
group's points as one value, so that points sharing a seed's subset and scratch cell are not
counted as independent evidence.

What must not move at all, on any host, is checked exactly: which grid points exist, that no cell
failed, and the structure of every point (training examples, frozen fraction, trainable parameters,
and the digest of the pretrained weights a transfer cell started from).
Speed fails when an arm's speed falls below a fraction of the base's (SPEED_FLOOR): each cell's images/s divided by a
bare PyTorch step measured by its own job's workers at once (sweep.reference), so that the host's own speed cancels,
where both runs recorded one; else the images/s themselves, which move with the host, at IMAGES_FLOOR.

Untestable is never "no regression": every check the gate is asked to make and cannot make (a value
that is missing or not finite, a side with fewer than 2 seeds, nothing in common to test) is listed
as UNTESTABLE and fails the gate like a regression. Input that makes the whole comparison
meaningless (an option out of range, an unreadable table, a missing column, no usable row) is
refused as a ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from transferbench.analysis.gains import SCRATCH_POINT, bh_q, paired, with_axes, with_tuning
from transferbench.core.errors import ConfigError
from transferbench.core.study import cell_axes

# Each arm's configuration chosen on val, at one point of the grid.
POINT = ["backbone", "weights", "target", "tuning", "n_per_class", *cell_axes()]
# Identical on every host for one code version: what a cell trains on, what it trains, what it starts from.
STRUCTURE = ["n_train", "frozen_fraction", "trainable_params", "weights_digest"]
AGGREGATES = {"target": ["target"], "transfer arm": ["tuning"], "all points": []}


@dataclass
class Comparison:
    # One row per point or aggregate: its group (key -> value), delta and its interval, p, q, flagged (q <= fdr),
    # regressed (flagged, and flagged again by a confirmation where one ran), untestable (why).
    tests: pd.DataFrame
    exact: list[str] = field(default_factory=list)  # what no rerun of seeds changes: points, failures, structure
    untestable: list[str] = field(default_factory=list)  # checks asked for that could not be made
    speeds: pd.DataFrame = field(default_factory=pd.DataFrame)  # per arm: median images/s, new / base (speed_table)
    slower: list[str] = field(default_factory=list)  # arms whose speed fell below the fraction of the base's
    flips: pd.DataFrame | None = None  # grid points whose verdict (gains.csv) changed; None: no gains.csv to read
    fdr: float = 0.05
    confirmation: pd.DataFrame | None = None  # the flagged tests rerun with fresh seeds (analysis.confirm)

    @property
    def problems(self) -> list[str]:
        """Every regression: the exact checks, the tests that regressed, the speed."""
        return self.exact + regression_lines(self.tests, self.fdr) + self.slower

    @property
    def ok(self) -> bool:
        return not self.problems and not self.untestable


def regression_lines(tests: pd.DataFrame, fdr: float) -> list[str]:
    """One line per (kind, measure) of the tests that regressed, with its first example."""
    return [f"{len(g)} {kind} test(s) of {measure} dropped beyond the margin (one-sided Welch over seeds, BH q <= "
            f"{fdr:g}), e.g. {g['what'].iloc[0]}: {100 * g['delta'].iloc[0]:+.1f} pp"
            for (kind, measure), g in tests[tests["regressed"]].groupby(["kind", "measure"], sort=False)]


# Every column the gate reads: a table without one is refused, never half-compared.
KEYS = ["arm", *(c for c in POINT if c != "tuning"), "frozen_depth", "schedule", "lr", "seed"]  # tuning: derived
REQUIRED = ["cell_id", "status", *KEYS, "val_acc", "test_acc", "images_per_second", *STRUCTURE]
# Text there becomes nan, and is reported as untestable (the reference step: records since it was measured).
NUMBERS = ["val_acc", "test_acc", "images_per_second", "reference_images_per_second"]
# The gate's options, each a check that must stay able to fail: (flag, lowest, highest). Outside, a check is off in
# effect: a margin of a quarter of the accuracy scale lets any real regression pass, so does an FDR of 1e-300.
OPTIONS = {"margin": ("--margin", 0.0, 0.25), "aggregate_margin": ("--margin (aggregates: half of it)", 0.0, 0.25),
           "fdr": ("--fdr", 0.001, 0.5), "speed_fraction": ("--speed-fraction", 0.1, 1.0)}
# Speed floors (docs/gate.md). The within-job ratio (cells over the reference step run by every worker at once) of an
# unchanged smoke run moved to 0.80 at worst over the host conditions measured (both workers on one core: 0.83;
# oneDNN and ATen on AVX2: 0.85; one worker of two threads: 0.80), so 0.7 passes them and fails the 0.5 a 2x slower
# harness gives. Images/s themselves move with the host (two AMD hosts of one CPU class: 0.70; hosts of this kind: up
# to 1.6x), so where they are judged the floor is 0.5 (or the given fraction, if lower).
SPEED_FLOOR, IMAGES_FLOOR = 0.7, 0.5
OPTION_DEFAULTS = dict(margin=0.02, fdr=0.05, speed_fraction=SPEED_FLOOR, aggregate_margin=0.01)


def check_options(**values: float) -> None:
    """Refuse an option that cannot be tested against (nan) or that switches its check off in effect (--fdr 0, a
    margin no real regression exceeds, --speed-fraction 0)."""
    for name, value in values.items():
        flag, low, high = OPTIONS[name]
        if not (np.isfinite(value) and low <= value <= high):
            raise ConfigError(flag, f"{value:g} is outside [{low:g}, {high:g}]: beyond it the check could not fail",
                              f"give a value in [{low:g}, {high:g}] (default {OPTION_DEFAULTS[name]:g})")


def read_runs(folder: Path, require_valid: bool = True) -> pd.DataFrame:
    """A folder's runs.csv as the gate reads it, refused where it cannot be compared; `require_valid=False` keeps a
    table whose every cell failed (a confirmation rerun's, which then fails the gate as a regression)."""
    path = folder / "runs.csv"
    if not path.is_file():
        raise ConfigError("compare", f"{path} does not exist" if not path.exists() else f"{path} is not a regular "
                          "file", "give result folders written by `transferbench study`")
    try:
        df = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as e:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise ConfigError("compare", f"{path} is not a readable table ({type(e).__name__})",
                          "rebuild it with `transferbench report STUDY`") from None
    return checked_runs(df, str(path), "compare folders of studies that ran cells (rebuild a damaged table with "
                        "`transferbench report STUDY`)", require_valid)


def checked_runs(df: pd.DataFrame, where: str, fix: str, require_valid: bool = True, field: str = "compare") -> \
        pd.DataFrame:
    """A seed-level run table (a folder's runs.csv, a history record's runs) with the gate's checks passed: every
    column it reads, each cell once, every cell on a grid point with an integer seed, numbers coerced (text becomes
    nan, reported as untestable), and some cell recorded ok with valid accuracies unless `require_valid` is off."""
    df = with_axes(df)
    missing = [c for c in REQUIRED if c not in df.columns]
    if df.empty or missing:
        raise ConfigError(field, f"{where} has no rows" if df.empty else f"{where} lacks columns {missing}", fix)
    twice = df["cell_id"][df["cell_id"].duplicated()]
    if len(twice):
        raise ConfigError(field, f"{where} holds {len(twice)} cell(s) twice (e.g. {twice.iloc[0]})", fix)
    no_key = [c for c in KEYS if df[c].isna().any()]
    if no_key:
        raise ConfigError(field, f"{where} has rows without a value for {no_key}: their cells belong to no grid "
                          "point", fix)
    seeds = pd.to_numeric(df["seed"], errors="coerce")
    if not (np.isfinite(seeds) & (seeds == seeds.round())).all():
        raise ConfigError(field, f"{where} has a seed that is not an integer (e.g. {df['seed'][seeds.isna()].iloc[0]})"
                          if seeds.isna().any() else f"{where} has a seed that is not an integer", fix)
    df = df.assign(seed=seeds.astype(int), **{c: pd.to_numeric(df[c], errors="coerce") for c in NUMBERS if c in df})
    if require_valid and not accuracies_valid(df).any():
        raise ConfigError(field, f"{where} has no cell recorded ok with valid accuracies: nothing to compare",
                          "compare folders of studies whose cells trained")
    return with_tuning(df)


def accuracies_valid(runs: pd.DataFrame) -> pd.Series:
    """Cells recorded ok whose val and test accuracies are numbers in [0, 1]."""
    values = runs[["val_acc", "test_acc"]]
    return (runs["status"] == "ok") & values.notna().all(axis=1) & values.ge(0).all(axis=1) & \
        values.le(1).all(axis=1)


def value_problems(runs: pd.DataFrame, side: str) -> list[str]:
    """Cells recorded ok whose accuracies are missing, not finite or outside [0, 1]: whatever they would show cannot
    be tested."""
    bad = runs[(runs["status"] == "ok") & ~accuracies_valid(runs)]
    if bad.empty:
        return []
    first = bad.iloc[0]
    return [f"{len(bad)} cell(s) recorded ok in the {side} results have a val_acc/test_acc that is missing or not a "
            f"number in [0, 1] (e.g. {first['cell_id']}: {first['arm']} {first['backbone']} {first['target']} seed "
            f"{first['seed']}): their points cannot be tested"]


def welch_drop(base: np.ndarray, new: np.ndarray, margin: float) -> float:
    """One-sided p of H0: mean(new) - mean(base) >= -margin (Welch). nan where a side has < 2 values or a value is
    not finite (the caller reports why: `untestable_reason`)."""
    if untestable_reason(base, new):
        return float("nan")
    delta, se, df = _welch(base, new)
    if se == 0:  # every seed alike on both sides: the drop is known exactly, beyond the margin or not
        return float(delta + margin >= 0)
    return float(stats.t.cdf((delta + margin) / se, df))


def welch_interval(base: np.ndarray, new: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Welch interval of mean(new) - mean(base); nan where the test is untestable."""
    if untestable_reason(base, new):
        return float("nan"), float("nan")
    delta, se, df = _welch(base, new)
    half = stats.t.ppf(0.5 + confidence / 2, df) * se if se > 0 else 0.0
    return float(delta - half), float(delta + half)


def _welch(base: np.ndarray, new: np.ndarray) -> tuple[float, float, float]:
    """mean(new) - mean(base), its Welch standard error and Welch-Satterthwaite degrees of freedom (nan df where
    the error is 0)."""
    a, b = base.var(ddof=1) / len(base), new.var(ddof=1) / len(new)
    df = (a + b) ** 2 / (a ** 2 / (len(base) - 1) + b ** 2 / (len(new) - 1)) if a + b > 0 else float("nan")
    return float(new.mean() - base.mean()), float(np.sqrt(a + b)), df


def untestable_reason(base: np.ndarray, new: np.ndarray) -> str:
    """Why a one-sided test of these per-seed values cannot be made ("" when it can)."""
    for side, values in (("base", base), ("new", new)):
        if not np.isfinite(values).all():
            return f"a non-finite value in the {side} results"
        if len(values) < 2:
            return f"{len(values)} seed(s) in the {side} results (a t-test over seeds needs at least 2)"
    return ""


def _per_seed(g: pd.DataFrame, value: str) -> np.ndarray:
    """Each seed's mean over the group's rows (each draw's, where a base pooled from the history says which rows
    drew the same subsets and initialisations: `draw`); a missing value makes its seed's mean nan, never a smaller
    mean."""
    return g.groupby("draw" if "draw" in g else "seed")[value].agg(
        lambda v: v.mean(skipna=False)).to_numpy(dtype=float)


def _test_rows(b: pd.DataFrame, n: pd.DataFrame, keys: list[str], kind: str, measure: str, value: str,
               margin: float) -> list[dict]:
    rows = []
    for key, gb in b.groupby(keys, sort=True) if keys else [((), b)]:
        key = key if isinstance(key, tuple) else (key,)
        gn = n.merge(pd.DataFrame([key], columns=keys), on=keys) if keys else n
        vb, vn = _per_seed(gb, value), _per_seed(gn, value)
        if not len(vn):
            continue  # a missing point is reported once, as structure
        low, high = welch_interval(vb, vn)
        rows.append(dict(kind=kind, measure=measure, what=" ".join(map(str, key)) or "all", group=dict(zip(keys, key)),
                         base=vb.mean(), new=vn.mean(), delta=vn.mean() - vb.mean(), ci_low=low, ci_high=high,
                         seeds_base=len(vb), seeds_new=len(vn), p=welch_drop(vb, vn, margin),
                         untestable=untestable_reason(vb, vn)))
    return rows


# What may not drop: the gain, and each arm on its own (a broken scratch arm inflates the gain).
VALUES = {"gain": "gain", "transfer accuracy": "test_acc", "scratch accuracy": "scratch_test_acc"}


def compare(base: Path, new: Path, margin: float = 0.02, fdr: float = 0.05, speed_fraction: float = SPEED_FLOOR,
            aggregate_margin: float = 0.01) -> Comparison:
    """Two results folders (their runs.csv, and gains.csv for verdict flips)."""
    check_options(margin=margin, fdr=fdr, speed_fraction=speed_fraction, aggregate_margin=aggregate_margin)
    return compare_runs(read_runs(base), read_runs(new), str(base), margin, fdr, speed_fraction, aggregate_margin,
                        verdict_flips(read_gains(base), read_gains(new)))


def compare_runs(b_runs: pd.DataFrame, n_runs: pd.DataFrame, base: str, margin: float = 0.02, fdr: float = 0.05,
                 speed_fraction: float = SPEED_FLOOR, aggregate_margin: float = 0.01,
                 flips: pd.DataFrame | None = None, same_host: bool = False) -> Comparison:
    """The gate on two seed-level run tables (read_runs' checks passed); `base` names the base in errors. A base
    pooled from several recorded commits carries distinct seed labels per commit (analysis.history); `same_host`: the
    base ran on this host class (speed is then judged in images/s too)."""
    problems = structure_problems(b_runs, n_runs)
    untestable = value_problems(b_runs, "base") + value_problems(n_runs, "new")
    # Cells without valid accuracies are reported as untestable just above; only the others are paired.
    b, n = paired(b_runs[accuracies_valid(b_runs)]), paired(n_runs[accuracies_valid(n_runs)])
    if b.empty:
        raise ConfigError("compare", f"the base {base} has no grid point with both a transfer and a scratch cell "
                          "recorded ok: there is nothing to compare against", "give the folder of a study that ran "
                          "its transfer and scratch arms")
    tests = seed_tests(b, n, margin, aggregate_margin, fdr)
    untestable += untestable_lines(tests)
    if not (tests["kind"] == "point").any():
        untestable.append("no grid point of the base has a tested counterpart in the new results: nothing was "
                          "tested")
    speeds = speed_table(b_runs, n_runs)
    speed, slow_untestable = speed_problems(b_runs, n_runs, speeds, speed_fraction, same_host)
    return Comparison(tests.sort_values(["regressed", "q", "delta"], ascending=[False, True, True],
                                        ignore_index=True), problems, untestable + slow_untestable,
                      speeds, speed, flips, fdr)


def seed_tests(b: pd.DataFrame, n: pd.DataFrame, margin: float, aggregate_margin: float, fdr: float) -> pd.DataFrame:
    """Every test over seeds of two paired tables: each point's gain and arm accuracies, and their aggregates; q
    within two families (points, aggregates), flagged and regressed where q <= fdr."""
    rows = []
    for name, col in VALUES.items():
        keys = SCRATCH_POINT if name == "scratch accuracy" else POINT
        rows += _test_rows(b, n, keys, "point", name, col, margin)
        for kind, group in AGGREGATES.items():
            if not (name == "scratch accuracy" and kind == "transfer arm"):  # scratch is no transfer arm
                rows += _test_rows(b, n, group, kind, name, col, aggregate_margin)
    tests = pd.DataFrame(rows, columns=["kind", "measure", "what", "group", "base", "new", "delta", "ci_low",
                                        "ci_high", "seeds_base", "seeds_new", "p", "untestable"])
    tests["q"] = bh_families(tests)
    tests["flagged"] = tests["regressed"] = tests["q"] <= fdr
    return tests


def bh_families(tests: pd.DataFrame) -> pd.Series:
    """BH q in two families: the points, and the few aggregates (which a sea of point tests would drown)."""
    families = [bh_q(g["p"]) for _, g in tests.groupby(tests["kind"] == "point")]
    return pd.concat(families).reindex(tests.index) if families else pd.Series(np.nan, index=tests.index)


def untestable_lines(tests: pd.DataFrame) -> list[str]:
    return [f"{len(g)} test(s) of {measure} ({kind}) could not be made: {why} (e.g. {g['what'].iloc[0]})"
            for (kind, measure, why), g in tests[tests["untestable"] != ""].groupby(["kind", "measure", "untestable"],
                                                                                    sort=False)]


def read_gains(folder: Path) -> pd.DataFrame | None:
    """A folder's gains.csv, or None where it is missing or unreadable (verdict flips are then not shown)."""
    try:
        return pd.read_csv(folder / "gains.csv")
    except (OSError, ValueError):
        return None


def verdict_flips(b: pd.DataFrame | None, n: pd.DataFrame | None) -> pd.DataFrame | None:
    """Grid points whose verdict (positive / negative / inconclusive, gains.csv) differs between two gains tables;
    None where either side has none with verdicts."""
    if b is None or n is None:
        return None
    keys = [c for c in ["backbone", "weights", "target", "tuning", "frozen_depth", "n_per_class", *cell_axes()]
            if c in b and c in n]
    if "verdict" not in b or "verdict" not in n or not keys:
        return None
    m = b[keys + ["verdict", "gain"]].astype({k: str for k in keys}).merge(
        n[keys + ["verdict", "gain"]].astype({k: str for k in keys}), on=keys, suffixes=("_base", "_new"))
    return m[m["verdict_base"] != m["verdict_new"]].reset_index(drop=True)


def structure_problems(b_runs: pd.DataFrame, n_runs: pd.DataFrame) -> list[str]:
    """What is the same on every host: the grid points, no failures, and each point's structure."""
    problems = []
    failed = n_runs[n_runs["status"] != "ok"]
    if len(failed):
        first = failed.iloc[0]
        problems.append(f"{len(failed)} cell(s) not recorded ok in the new results (status "
                        f"{', '.join(map(str, failed['status'].unique()))}; e.g. {first['cell_id']}: "
                        f"{first.get('error', '') if pd.notna(first.get('error')) else 'no error recorded'})")
    keys = POINT + ["arm", "schedule", "lr"]  # not the seed: a rerun with other seeds is a valid rerun
    b_points, n_points = b_runs.groupby(keys).first(), n_runs.groupby(keys).first()
    missing = b_points.index.difference(n_points.index)
    if len(missing):
        problems.append(f"{len(missing)} grid point(s) of the base are missing from the new results "
                        f"(e.g. {[v.item() if hasattr(v, 'item') else v for v in missing[0]]})")
    shared = b_points.index.intersection(n_points.index)
    for col in STRUCTURE:
        if col in b_points and col in n_points:
            bv, nv = b_points.loc[shared, col], n_points.loc[shared, col]
            numeric = pd.api.types.is_numeric_dtype(bv) and pd.api.types.is_numeric_dtype(nv)
            same = np.isclose(bv.astype(float), nv.astype(float), rtol=1e-6, atol=0) if numeric else bv == nv
            moved = ~same & bv.notna()
            if moved.any():
                i = moved.to_numpy().argmax()
                problems.append(f"{col} changed at {int(moved.sum())} grid point(s) (e.g. {list(shared[i])}: "
                                f"{bv.iloc[i]} -> {nv.iloc[i]})")
    return problems


def speed_problems(b_runs: pd.DataFrame, n_runs: pd.DataFrame, speeds: pd.DataFrame, fraction: float,
                   same_host: bool = False) -> tuple[list[str], list[str]]:
    """(regressions, untestable): each arm whose base records a speed (pixel baselines and L-BFGS probes do not),
    judged by its row of `speeds` (speed_table): the ratio within each job where both sides have one, else images/s;
    against a base of the same host class (`same_host`: the history's) by images/s as well, since a slowdown of the
    whole process (a thread or math setting) slows the reference step too and cancels from the ratio."""
    problems, untestable = [], []
    table = speeds.set_index("arm")
    for arm, g in b_runs.groupby("arm"):
        b_values, n_values = g["images_per_second"], n_runs.loc[n_runs["arm"] == arm, "images_per_second"]
        if b_values.isna().all():
            continue  # an arm that records no speed (pixel baselines, L-BFGS probes)
        invalid = [side for side, v in (("base", b_values), ("new", n_values))
                   if v.isna().all() or not (np.isfinite(v.dropna()) & (v.dropna() > 0)).all()]
        if invalid:
            untestable.append(f"the speed of {arm} could not be checked: the {' and '.join(invalid)} results record "
                              "no valid images_per_second for it (a positive number)")
            continue
        row = table.loc[arm]
        within = np.isfinite(row["within_job"])
        images = min(fraction, IMAGES_FLOOR)
        judged = ([("within_job", fraction, "as a ratio to the bare PyTorch step measured in each run's own job")]
                  if within else [("images", images, "in images/s (no comparable reference step on both sides)")])
        judged += [("images", images, "in images/s, against the same host class")] if within and same_host else []
        for column, floor, basis in judged:
            if row[column] < floor:
                problems.append(f"harness slower: {arm} median {row['new']:.0f} images/s vs {row['base']:.0f} in the "
                                f"base; x{row[column]:.2f} {basis} (below {floor:.0%})")
    return problems, untestable


def speed_table(b_runs: pd.DataFrame, n_runs: pd.DataFrame) -> pd.DataFrame:
    """Per arm that records a speed: each side's median images/s; `images`, new / base of them; `within_job`, new /
    base of the medians of each cell's images/s divided by its own job's reference step (the host's speed cancels),
    nan unless every cell of the arm on both sides has one."""
    rows = []
    for arm in sorted(set(b_runs["arm"]) | set(n_runs["arm"])):
        b, n = b_runs[b_runs["arm"] == arm], n_runs[n_runs["arm"] == arm]
        if b["images_per_second"].isna().all() and n["images_per_second"].isna().all():
            continue
        base, new = b["images_per_second"].median(), n["images_per_second"].median()
        rows.append(dict(arm=arm, base=base, new=new, images=new / base,
                         within_job=_relative(n) / _relative(b) if _comparable_references(b, n) else np.nan))
    return pd.DataFrame(rows, columns=["arm", "base", "new", "images", "within_job"])


# Two hosts of one kind differed by 1.6x in images/s: references further apart than this are not the same kind of
# host, or not a measurement, and the ratio to them is not used (images/s are judged instead).
REFERENCE_SPREAD = 4.0


def _comparable_references(b: pd.DataFrame, n: pd.DataFrame) -> bool:
    def referenced(runs: pd.DataFrame) -> bool:
        if runs.empty or "reference_images_per_second" not in runs:
            return False
        ref = runs["reference_images_per_second"]
        return bool((np.isfinite(ref) & (ref > 0)).all())

    if not (referenced(b) and referenced(n)):
        return False
    spread = n["reference_images_per_second"].median() / b["reference_images_per_second"].median()
    return 1 / REFERENCE_SPREAD <= spread <= REFERENCE_SPREAD


def _relative(runs: pd.DataFrame) -> float:
    return float((runs["images_per_second"] / runs["reference_images_per_second"]).median())


def render(c: Comparison, base: Path, new: Path) -> str:
    t = c.tests
    points = t[(t["kind"] == "point") & (t["measure"] == "gain")]
    lines = [f"compare {base} -> {new}: {len(points)} grid point(s) tested, {int(t['regressed'].sum())} of {len(t)} "
             f"test(s) regressed; largest drop of a gain {100 * points['delta'].min():+.1f} pp" if len(points) else
             f"compare {base} -> {new}: no grid point in common"]
    if len(t):
        shown = t.head(15).assign(**{k: (100 * t[k]).round(1) for k in ("base", "new", "delta")})
        shown = shown.assign(p=shown["p"].map("{:.3g}".format), q=shown["q"].map("{:.3g}".format)).drop(
            columns=["untestable", "ci_low", "ci_high", "group", "flagged"])
        lines += [shown.to_string(index=False), "(percentage points; p: one-sided Welch t-test over seeds of a drop "
                  "beyond the margin; q: Benjamini-Hochberg within points and within aggregates; nan: untestable)"]
    if c.confirmation is not None:
        r = c.confirmation.assign(**{k: (100 * c.confirmation[k]).round(1) for k in ("delta_first", "delta")})
        lines += [confirmation_summary(c.confirmation), r.drop(columns=["ci_low", "ci_high"]).to_string(index=False)]
    verdicts = [f"REGRESSION: {p}" for p in c.problems] + [f"UNTESTABLE: {u}" for u in c.untestable]
    return "\n".join(lines + (verdicts or ["no regression"]))


def confirmation_summary(confirmation: pd.DataFrame) -> str:
    counts = confirmation["outcome"].value_counts()
    return (f"confirmation (the flagged tests again, on their cells rerun with fresh seeds): "
            f"{counts.get('confirmed', 0)} confirmed, {counts.get('cleared', 0)} cleared (not flagged again), "
            f"{counts.get('untestable', 0)} untestable")


def _pp(v: float) -> str:
    return "nan" if not np.isfinite(v) else f"{100 * v:+.1f}"


def _test_table(t: pd.DataFrame) -> list[str]:
    lines = ["| kind | measure | what | base | new | change (pp) | 95% interval (pp) | q |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.kind} | {r.measure} | {r.what} | {100 * r.base:.1f} | {100 * r.new:.1f} | {_pp(r.delta)} | "
              f"[{_pp(r.ci_low)}, {_pp(r.ci_high)}] | {r.q:.3g} |" for r in t.itertuples()]
    return lines


def render_markdown(c: Comparison, base: Path, new: Path) -> str:
    """A pass/fail summary for a CI job summary or a pull-request comment: the failing checks with their change,
    interval and q, verdict flips, speed ratios, and every test folded away."""
    t = c.tests
    points = t[(t["kind"] == "point") & (t["measure"] == "gain")]
    out = [f"## transferbench gate: {'PASS' if c.ok else 'FAIL'}", "",
           f"`{base}` -> `{new}`: {len(points)} grid point(s), {int(t['regressed'].sum())} of {len(t)} test(s) "
           f"regressed" + (f"; largest drop of a gain {_pp(points['delta'].min())} pp." if len(points) else ".")]
    verdicts = [f"- **regression**: {p}" for p in c.problems] + [f"- **untestable**: {u}" for u in c.untestable]
    out += ["", *verdicts] if verdicts else []
    failing = t[t["regressed"]]
    if len(failing):
        out += ["", "### Failing checks (one-sided Welch over seeds, Benjamini-Hochberg)", "", *_test_table(failing)]
    if c.confirmation is not None:
        out += ["", "### Confirmation", "", confirmation_summary(c.confirmation) + ".", "",
                "| kind | measure | what | first: change (pp), q | rerun: change (pp), 95% interval, q | outcome |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r.kind} | {r.measure} | {r.what} | {_pp(r.delta_first)}, {r.q_first:.3g} | {_pp(r.delta)} "
                f"[{_pp(r.ci_low)}, {_pp(r.ci_high)}], {r.q:.3g} | {r.outcome} |" for r in c.confirmation.itertuples()]
    out += ["", "### Verdict flips (gains.csv)", ""]
    if c.flips is None or c.flips.empty:
        out.append("not available (no gains.csv with verdicts on both sides)" if c.flips is None else "none")
    else:
        out += ["| point | base | new |", "|---|---|---|"]
        keys = [k for k in c.flips.columns if not k.startswith(("verdict_", "gain_"))]
        out += [f"| {' '.join(str(r[k]) for k in keys)} | {r['verdict_base']} ({_pp(r['gain_base'])} pp) | "
                f"{r['verdict_new']} ({_pp(r['gain_new'])} pp) |" for _, r in c.flips.iterrows()]
    if not c.speeds.empty:
        out += ["", "### Speed (median images/s)", "", "| arm | base | new | new / base | new / base within each job |",
                "|---|---|---|---|---|"]
        out += [f"| {r.arm} | {r.base:.0f} | {r.new:.0f} | {r.images:.2f} | "
                f"{'-' if not np.isfinite(r.within_job) else f'{r.within_job:.2f}'} |" for r in c.speeds.itertuples()
                if np.isfinite(r.base)]
        out += ["", "Within each job: each cell's images/s divided by the bare PyTorch step its own job measured (the "
                "host's speed cancels); the gate judges by it where both sides have one, and by images/s as well "
                "against a base of the same host class (the history's)."]
    if len(t):
        out += ["", f"<details><summary>All {len(t)} tests</summary>", "", *_test_table(t), "", "</details>"]
    return "\n".join(out) + "\n"
