"""Transfer arms against each other: which layers to train, and does the answer follow where the shift lives?

Each arm (a `tuning`: full fine-tuning 'frozen 0', a frozen prefix, 'groups 0' for the first group only, a recipe
such as 'LP-FT') is taken at its own configuration chosen on validation (analysis.choose), and compared with
full fine-tuning seed by seed: the same k-shot subset, the same data order. Differences get Student-t intervals
over seeds and Benjamini-Hochberg q-values across every (arm, condition, size) compared; the best arm of a
condition is chosen on validation and reported with its test accuracy. Where the shift lives is read from the
source-free BatchNorm divergence profile (domains.csv): per depth group, the target's KL to the running statistics
over the source reference's own, so the depth a corruption disturbs most stands out from the depth profile every
dataset has. The claims of the anchors (Lee et al. 2023, Kumar et al. 2022, ULMFiT/BEiT) are pooled contrasts:
each seed's difference averaged over the conditions a claim covers, then a t-interval over seeds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from transferbench.analysis.gains import POINT, bh_q, choose, kendall_tau_b, mean_interval, ok_runs, t_interval, verdict
from transferbench.core.registry import Registry

FULL = "frozen 0"  # full fine-tuning: the reference every other arm is compared with
CELL = ["backbone", "weights", "target", "n_per_class"]  # a condition at one size; arms vary within it


def chosen(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per transfer cell of its arm's configuration chosen on validation."""
    runs = ok_runs(runs)
    return choose(runs[runs["arm"] == "transfer"], POINT)


def several_arms(runs: pd.DataFrame) -> bool:
    """Whether the study compares arms beyond frozen prefixes (train_groups or recipes)."""
    if runs.empty or "tuning" not in runs:
        return False
    tuning = ok_runs(runs).query("arm == 'transfer'")["tuning"]
    return bool(tuning.str.startswith("groups ").any() or (~tuning.str.match(r"^(frozen \d+|probe \(all\))$")).any())


def arm_accuracy(runs: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per condition, size and arm: mean test accuracy with its t-interval over seeds, mean validation accuracy,
    the share of cells converged and the share of backbone parameters trained."""
    c = chosen(runs)
    if c.empty:
        return pd.DataFrame()
    by = CELL + ["tuning"]
    out = mean_interval(c, by, "test_acc", confidence).rename(columns={"mean": "test", "n": "n_seeds"})
    extra = c.groupby(by).agg(val=("val_acc", "mean"), converged=("converged", "mean"),
                              trained_fraction=("trained_fraction", "mean") if "trained_fraction" in c else
                              ("frozen_fraction", lambda f: 1 - f.mean())).reset_index()
    return out.merge(extra, on=by)


def differences(runs: pd.DataFrame, confidence: float = 0.95, fdr: float = 0.05, min_effect: float = 0.01,
                reference: str = FULL) -> pd.DataFrame:
    """Every arm minus the reference arm, paired by seed: mean test-accuracy difference with its t-interval and
    p, BH q across all rows, and a verdict (better / worse only for a discovery of at least min_effect)."""
    seeds = per_seed_differences(runs, reference)
    if seeds.empty:
        return pd.DataFrame()
    out = mean_interval(seeds, CELL + ["tuning"], "diff", confidence).rename(columns={"mean": "diff",
                                                                                       "n": "n_seeds"})
    out["q"] = bh_q(out["p"])
    out["verdict"] = [{"positive": "better", "negative": "worse"}.get(v, v)
                      for v in (verdict(d, q, fdr, min_effect) for d, q in zip(out["diff"], out["q"]))]
    return out


def per_seed_differences(runs: pd.DataFrame, reference: str = FULL) -> pd.DataFrame:
    """Rows (condition, size, tuning, seed, diff): each arm's test accuracy minus the reference's, same seed."""
    c = chosen(runs)
    if c.empty or reference not in set(c["tuning"]):
        return pd.DataFrame()
    wide = c.pivot_table(index=CELL + ["seed"], columns="tuning", values="test_acc")
    long = wide.drop(columns=reference).sub(wide[reference], axis=0).stack().rename("diff").reset_index()
    return long.dropna(subset=["diff"])


def best_arms(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Per condition and size: the arm with the best mean validation accuracy (ties: the first in sorted order),
    with its test accuracy and interval, and the runner-up on validation."""
    if accuracy.empty:
        return accuracy
    rows = []
    for key, g in accuracy.sort_values("tuning").groupby(CELL, sort=True):
        ranked = g.sort_values("val", ascending=False, kind="stable")
        top = ranked.iloc[0]
        rows.append(dict(zip(CELL, key)) | dict(best=top["tuning"], test=top["test"], ci_low=top["ci_low"],
                                                 ci_high=top["ci_high"], val=top["val"],
                                                 runner_up=ranked["tuning"].iloc[1] if len(ranked) > 1 else None))
    return pd.DataFrame(rows)


def shift_depth(domains: pd.DataFrame) -> pd.DataFrame:
    """Per (backbone, target): the BatchNorm divergence of each depth group relative to the source reference's own
    (ratio), the group where it peaks, and the share of the excess divergence in the first half of the groups."""
    cols = sorted((c for c in domains.columns if c.startswith("bn_kl_group")), key=lambda c: int(c[11:])) \
        if not domains.empty else []
    if not cols:
        return pd.DataFrame()
    ratio = domains[cols].to_numpy(float) / domains[[c.replace("group", "ref_group") for c in cols]].to_numpy(float)
    excess = np.clip(ratio - 1, 0, None)
    half = len(cols) // 2
    with np.errstate(invalid="ignore", divide="ignore"):
        early = excess[:, :half].sum(1) / excess.sum(1)
    out = domains[["backbone", "weights", "target"]].copy()
    out["peak_group"] = ratio.argmax(1)
    out["peak_ratio"] = ratio.max(1)
    out["early_share"] = early
    for i in range(len(cols)):
        out[f"ratio_group{i}"] = ratio[:, i]
    return out


def pooled(seeds: pd.DataFrame, tuning: str, targets: list[str], confidence: float = 0.95) -> dict | None:
    """A claim's contrast over several conditions: each seed's difference averaged over them, then a t-interval
    over seeds (the unit a rerun with new seeds would vary)."""
    sub = seeds[(seeds["tuning"] == tuning) & seeds["target"].isin(targets)]
    if sub.empty:
        return None
    per_seed = sub.groupby("seed")["diff"].mean()
    lo, hi, p = t_interval(per_seed.to_numpy(), confidence)
    return dict(diff=float(per_seed.mean()), ci_low=lo, ci_high=hi, p=p, n_seeds=len(per_seed),
                n_conditions=sub["target"].nunique())


def contrast(runs: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Per-seed differences of arm a minus arm b (same rows as per_seed_differences, with b as the reference)."""
    seeds = per_seed_differences(runs, b)
    return seeds[seeds["tuning"] == a] if len(seeds) else seeds


def depth_predicts(runs: pd.DataFrame, domains: pd.DataFrame, first: str, last: str,
                   targets: list[str]) -> dict | None:
    """Does the depth where the shift lives predict which end of the network to tune? Over `targets`: the
    Kendall tau between the early share of the BatchNorm excess divergence and the first-minus-last test
    difference (expected positive), its exact permutation p over conditions, and how often the peak's half names
    the better of the two arms (on validation)."""
    depth = shift_depth(domains)
    acc = chosen(runs)
    if depth.empty or acc.empty:
        return None
    means = acc[acc["target"].isin(targets)].groupby(["target", "tuning"])[["test_acc", "val_acc"]].mean()
    rows = []
    for tg in targets:
        if (tg, first) not in means.index or (tg, last) not in means.index:
            continue
        d = depth[depth["target"] == tg]
        if d.empty:
            continue
        n_groups = sum(c.startswith("ratio_group") for c in d.columns)
        rows.append(dict(target=tg, early_share=float(d["early_share"].mean()), peak=int(d["peak_group"].iloc[0]),
                         n_groups=n_groups, diff=means.loc[(tg, first), "test_acc"] - means.loc[(tg, last), "test_acc"],
                         first_wins_val=bool(means.loc[(tg, first), "val_acc"] > means.loc[(tg, last), "val_acc"])))
    df = pd.DataFrame(rows)
    if len(df) < 3:
        return None
    tau = kendall_tau_b(df["early_share"].to_numpy(), df["diff"].to_numpy())
    predicted_first = df["peak"] < df["n_groups"] / 2
    agree = int((predicted_first == df["first_wins_val"]).sum())
    return dict(tau=float(tau), p=permutation_p(df["early_share"].to_numpy(), df["diff"].to_numpy()),
                agree=agree, n=len(df), conditions=df)


def permutation_p(x: np.ndarray, y: np.ndarray, n: int = 20000, seed: int = 0) -> float:
    """One-sided p of Kendall's tau-b >= observed under random pairings of x and y."""
    observed = kendall_tau_b(x, y)
    g = np.random.default_rng(seed)
    draws = kendall_tau_b(np.broadcast_to(x, (n, len(x))), g.permuted(np.broadcast_to(y, (n, len(y))), axis=1))
    return float((1 + (draws >= observed - 1e-12).sum()) / (n + 1))


def arm_names(runs: pd.DataFrame) -> dict[str, str | None]:
    """The arms the anchor claims speak of, as this study names them (None where the study has no such arm)."""
    c = chosen(runs)
    tunings = set(c["tuning"]) if len(c) else set()
    n_groups = int(c["n_groups"].max()) if len(c) and "n_groups" in c else 0
    llrd = sorted(t for t in tunings if t.startswith("LLRD"))
    return dict(full=FULL if FULL in tunings else None, first="groups 0" if "groups 0" in tunings else None,
                last=f"groups {n_groups - 1}" if f"groups {n_groups - 1}" in tunings else None,
                lp_ft="LP-FT" if "LP-FT" in tunings else None, llrd=llrd[0] if llrd else None,
                probe="probe (all)" if "probe (all)" in tunings else None)


def condition_kinds(runs: pd.DataFrame) -> dict[str, list[str]]:
    """Target conditions by the kind of shift they carry: input-level corruptions (a `shift` on a dataset), the
    clean dataset those corruptions are applied to (new labels, natural-photo inputs: the output-level end), and
    the rest (far targets, whose inputs and labels both differ)."""
    r = ok_runs(runs)
    r = r[r["arm"] == "transfer"]
    corrupted = r[r["shift"].notna()]
    base = set(corrupted["dataset"])
    clean = r[r["shift"].isna()]
    return dict(input=sorted(set(corrupted["target"])),
                clean=sorted(set(clean[clean["dataset"].isin(base)]["target"])),
                far=sorted(set(clean[~clean["dataset"].isin(base)]["target"])))


KINDS = {"input": "input-level (corrupted)", "clean": "clean base", "far": "far", "all": ""}
CLAIMS = Registry("claim")  # name -> verdict(ci_low, ci_high, min_effect); the docstring states the claim


def claim(name: str, text: str, source: str, a: str, b: str, conditions: str, kind: str) -> None:
    """Register an anchor claim: arm `a` minus arm `b` (as `arm_names` names them), pooled over one kind of
    condition (KINDS), 'beats' (the difference above 0) or 'keeps' (not below -min_effect)."""
    def holds(low: float, high: float, min_effect: float) -> str:
        bar = 0.0 if kind == "beats" else -min_effect
        return "reproduces" if low > bar else "reverses" if high < bar else \
            "not shown (the interval includes " + ("0)" if kind == "beats" else f"-{100 * min_effect:g} pp)")

    holds.__doc__ = text
    CLAIMS.register(name, source=source, a=a, b=b, conditions=conditions, kind=kind)(holds)


claim("first_beats_full_input", "Tuning only the first block beats full fine-tuning under input-level shifts",
      "Lee et al. 2023", "first", "full", "input", "beats")
claim("first_not_last_input", "Under input-level shifts the first block is the one to tune, not the last",
      "Lee et al. 2023", "first", "last", "input", "beats")
claim("last_beats_full_clean", "Without input corruption (new labels on natural photos), tuning the last block "
      "beats full fine-tuning", "Lee et al. 2023", "last", "full", "clean", "beats")
claim("last_not_first_clean", "Without input corruption, the last block is the one to tune, not the first",
      "Lee et al. 2023", "last", "first", "clean", "beats")
claim("lp_ft_keeps_accuracy", "LP-FT keeps full fine-tuning's accuracy on the fine-tuning distribution",
      "Kumar et al. 2022", "lp_ft", "full", "all", "keeps")
claim("lp_ft_beats_full_far", "LP-FT beats full fine-tuning far from the source", "Kumar et al. 2022", "lp_ft",
      "full", "far", "beats")
claim("llrd_beats_one_lr", "Layer-wise LR decay beats full fine-tuning at one LR", "ULMFiT; BEiT", "llrd", "full",
      "all", "beats")


def claims(runs: pd.DataFrame, confidence: float = 0.95, min_effect: float = 0.01) -> pd.DataFrame:
    """Each anchor claim the study's arms can test, as a pooled contrast with its interval and a verdict."""
    names, kinds = arm_names(runs), condition_kinds(runs)
    kinds["all"] = sorted(set(kinds["input"]) | set(kinds["clean"]) | set(kinds["far"]))
    rows = []
    for key, holds in CLAIMS.items():
        meta = CLAIMS.meta(key)
        a, b, where = names[meta["a"]], names[meta["b"]], meta["conditions"]
        if not (a and b and kinds[where]):
            continue
        seeds = contrast(runs, a, b)
        result = pooled(seeds, a, kinds[where], confidence) if len(seeds) else None
        if result is None:
            continue
        rows.append(dict(claim=holds.__doc__, source=meta["source"], contrast=f"{a} - {b}", kind=KINDS[where],
                         conditions=", ".join(kinds[where]), **result,
                         verdict=holds(result["ci_low"], result["ci_high"], min_effect)))
    return pd.DataFrame(rows)
