"""The report's answer to its own question: the summary a reader takes in one screen, and *When does transfer stop
paying?* -- the break-even distance with its interval, the comparable gains across the dial, and which cheap
measure predicts the gain (beside the trivial predictor)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from transferbench.analysis.dial import OUTCOMES, widest
from transferbench.analysis.gains import near_counts
from transferbench.analysis.tables import Tables
from transferbench.core.study import Study
from transferbench.measures import MEASURES
from transferbench.report.words import markdown_table, near_the_level_clause, per_class, pp, times


def arm_name(line) -> str:
    """'tf_efficientnet_lite0 frozen 0 at 8 examples per class'."""
    return f"{line.backbone} {line.tuning} at {per_class(line.n_per_class)}"


def crossing(line) -> str:
    """A break-even as the table says it."""
    if np.isinf(line.break_even):
        return "none (never falls to zero)" if line.break_even > 0 else "none (never above zero)"
    return f"{line.break_even:.3g}" + ("" if line.reached else " (outside the dial)")


def distance_name(measure: str) -> str:
    return MEASURES.meta(measure)["label"] if measure in MEASURES else measure


def break_even_sentence(line, confidence: float) -> str:
    """Where the gain of one arm reaches zero along the dial, or that it does not within the dial, and how far it
    pays reliably."""
    name, unit = distance_name(line.distance), OUTCOMES[line.outcome]
    span = f"{line.d_min:.3g} to {line.d_max:.3g}"
    reliably = (f"it pays reliably (the band's lower end above zero) up to {line.pays_until:.3g}" if
                not np.isnan(line.pays_until) and line.pays_until > line.d_min else
                "it does not pay reliably even at the near end" if not np.isnan(line.pays_until) else
                "it pays reliably across the whole dial")
    if line.reached:
        where = (f"[{line.be_low:.3g}, {line.be_high:.3g}]" if np.isfinite(line.be_low) and np.isfinite(line.be_high)
                 else "(interval not identified: without one base dataset the line stops falling)")
        return (f"The {unit} of {arm_name(line)} reaches zero at {name} {line.break_even:.3g} {where} "
                f"({confidence:.0%} interval over {line.n_datasets} base datasets, {line.n_conditions} conditions; "
                f"the dial spans {span}); {reliably}.")
    trend = ("falls" if line.slope_high < 0 else "rises" if line.slope_low > 0 else "shows no reliable trend") + \
        f" with {name} (slope {100 * line.slope:+.3g} pp per unit, [{100 * line.slope_low:+.3g}, " \
        f"{100 * line.slope_high:+.3g}])"
    return (f"The {unit} of {arm_name(line)} {trend} and does not reach zero within the dial "
            f"({span}, {line.n_conditions} conditions of {line.n_datasets} base datasets): no break-even distance "
            f"inside it; {reliably}.")


def arm_rows(t: Tables, line) -> pd.DataFrame:
    """The grid points of one dial arm across its conditions."""
    sel = t.selected
    return sel[(sel["backbone"] == line.backbone) & (sel["tuning"] == line.tuning)
               & (sel["n_per_class"] == line.n_per_class)]


def effective_data_sentence(t: Tables, line) -> str:
    """The effective data transferred at one arm across the dial: its range and how many conditions are bounds."""
    rows = arm_rows(t, line).dropna(subset=["eff_multiplier"])
    if rows.empty:
        return ""
    rows = rows.sort_values("eff_multiplier")
    low, high = rows.iloc[0], rows.iloc[-1]
    bounded = int((rows["eff_bound"] == ">=").sum())
    geo = float(np.exp(np.log(rows["eff_multiplier"].clip(lower=1e-6)).mean()))
    return (f"Measured as effective data (Hernandez et al. 2021: the examples per class scratch would need to match "
            f"it), {arm_name(line)} is worth {times(geo)} its own examples across the dial (geometric mean), from "
            f"{'>= ' if high.eff_bound == '>=' else ''}{times(high.eff_multiplier)} on {high.target} to "
            f"{times(low.eff_multiplier)} on {low.target}"
            + (f"; on {bounded} of {len(rows)} conditions scratch's curve never reached transfer, so those are lower "
               "bounds" if bounded else "") + ".")


def baseline_sentence(study: Study, t: Tables) -> str:
    """Transfer against the strongest baseline without pretraining, over every grid point."""
    sel = t.selected
    if "gvb_verdict" not in sel or sel.empty:
        return ""
    counts, a = sel["gvb_verdict"].value_counts(), study.analysis
    near = near_counts(sel["gain_vs_baseline"], sel["gvb_q"], sel["gvb_verdict"], a.fdr, a.min_effect)
    return (f"Against the strongest baseline without pretraining (scratch or a pixel classifier, chosen on "
            f"validation), transfer is reliably better at {counts.get('positive', 0)} and reliably worse at "
            f"{counts.get('negative', 0)} of {len(sel)} grid points (BH q <= {a.fdr:g}, at least "
            f"{100 * a.min_effect:g} pp){near_the_level_clause(*near, a.fdr)}.")


def predictor_sentence(study: Study, t: Tables) -> str:
    """Which measure predicts the gain across the conditions, named only when it is distinguishable from the
    runner-up and beats the trivial predictor; otherwise what it lacks."""
    duel, ranking = t.duel, t.ranking
    if duel is None or ranking.empty:
        return ""
    top = ranking.set_index("measure").loc[duel["first"]]
    c = f"{study.analysis.confidence:.0%}"
    lead = (f"{distance_name(duel['first'])} ranks the conditions' gains best (mean sign-adjusted Kendall tau "
            f"{top.mean_agreement:+.2f} over {int(top.targets)} conditions)")
    versus = (f"{'above' if duel['beats_trivial'] else 'not reliably above'} the trivial predictor that knows only "
              f"the examples and classes (difference {duel['vs_trivial']:+.2f}, {c} CI [{duel['trivial_low']:+.2f}, "
              f"{duel['trivial_high']:+.2f}])" if duel["beats_trivial"] is not None else "")
    runner = (f"{'distinguishable' if duel['distinguishable'] else 'not distinguishable'} from "
              f"{distance_name(duel['second'])} ({duel['difference']:+.2f} [{duel['ci_low']:+.2f}, "
              f"{duel['ci_high']:+.2f}])")
    if duel["distinguishable"] and duel["beats_trivial"]:
        return f"Best predictor of the gain: {lead}, {runner}, and {versus}."
    return f"No measure can be named the best predictor: {lead}, but it is {runner}" + \
        (f" and {versus}" if versus else "") + "."


def half_width_sentence(study: Study, t: Tables) -> str:
    """How precisely the best measure's tau is known: the design's target is a half-width of 0.35."""
    corr, duel = t.correlations, t.duel
    if duel is None or corr.empty:
        return ""
    own = corr[(corr["measure"] == duel["first"]) & (corr["outcome"] == "gain")]
    if own.empty:
        return ""
    row = own.loc[own["n_targets"].idxmax()]  # the size the dial measured across the most conditions
    half = (row.ci_high - row.ci_low) / 2
    return (f"At {per_class(int(row.n_per_class))} ({int(row.n_targets)} conditions of {int(row.n_datasets)} base "
            f"datasets, {row.resampled} resampled) its tau is {row.tau:+.2f} [{row.ci_low:+.2f}, {row.ci_high:+.2f}], "
            f"half-width {half:.2f}" + (": within the 0.35 the design aims at." if half <= 0.35 else
                                        ": wider than the 0.35 the design aims at, so the ranking is tentative."))


def summary_lines(study: Study, t: Tables) -> list[str]:
    """3-5 plain sentences with their intervals: the break-even, the effective data, the strongest baseline, the
    best predictor. Empty without a dial (fewer than three base datasets measured)."""
    lines = widest(t.dial)
    if lines.empty:
        return []
    main = lines.iloc[0]
    said = [break_even_sentence(main, study.analysis.confidence), effective_data_sentence(t, main),
            baseline_sentence(study, t), predictor_sentence(study, t)]
    return [s for s in said if s]


def dial_lines(study: Study, t: Tables, anchor_lines: list[str]) -> list[str]:
    """The section's body: every dial arm's break-even by the label-free distances, its comparable gains by
    condition, the measure ranking with the trivial predictor beside it, and the anchor findings it settles."""
    lines = widest(t.dial)
    if lines.empty:
        return []
    c = study.analysis.confidence
    out = [break_even_sentence(line, c) for line in lines.itertuples()]
    every = t.dial[(t.dial["outcome"] == "gain") & t.dial[["backbone", "tuning", "n_per_class"]].apply(tuple, axis=1)
                   .isin(list(lines[["backbone", "tuning", "n_per_class"]].apply(tuple, axis=1)))]
    table = every.assign(arm=[f"{r.backbone} {r.tuning} n={r.n_per_class}" for r in every.itertuples()],
                         measure=[distance_name(d) for d in every["distance"]],
                         break_even=[crossing(r) for r in every.itertuples()],
                         interval=[f"[{r.be_low:.3g}, {r.be_high:.3g}]" for r in every.itertuples()],
                         dial=[f"{r.d_min:.3g} to {r.d_max:.3g}" for r in every.itertuples()],
                         pays_reliably_until=[f"{r.pays_until:.3g}" if not np.isnan(r.pays_until) else "the end"
                                              for r in every.itertuples()],
                         slope_pp=[f"{100 * r.slope:+.3g} [{100 * r.slope_low:+.3g}, {100 * r.slope_high:+.3g}]"
                                   for r in every.itertuples()])
    out += ["", "Break-even by each label-free distance (gain over scratch; "
            f"{c:.0%} intervals from a delete-one-dataset jackknife):", "",
            markdown_table(table[["arm", "measure", "break_even", "interval", "dial", "pays_reliably_until",
                                  "slope_pp"]])]
    main = lines.iloc[0]
    rows = arm_rows(t, main).merge(t.domains[["backbone", "weights", "target", "dataset", "fd"]],
                                   on=["backbone", "weights", "target"], how="left").sort_values("fd")
    if len(rows):
        shown = pd.DataFrame(dict(
            target=rows["target"], dataset=rows["dataset"], fd=rows["fd"].round(1),
            gain_pp=[f"{pp(r.gain)} [{pp(r.ci_low)}, {pp(r.ci_high)}]" for r in rows.itertuples()],
            error_reduction=[f"{100 * r.rer:.0f}% [{100 * r.rer_low:.0f}, {100 * r.rer_high:.0f}]"
                             if not pd.isna(r.rer) else "n/a" for r in rows.itertuples()],
            vs_strongest_baseline=[f"{pp(r.gain_vs_baseline)} vs {r.baseline} ({r.gvb_verdict})"
                                   for r in rows.itertuples()],
            effective_data=[f"{r.eff_bound}{times(r.eff_multiplier)} [{times(r.eff_low)}, {times(r.eff_high)}]"
                            for r in rows.itertuples()]))
        out += ["", f"Gains comparable across targets, {arm_name(main)}, near to far by Frechet distance (mean "
                f"[{c:.0%} t-interval] over seeds; effective data as a multiplier of the examples used, '>=' where "
                "scratch's curve never reached transfer):", "", markdown_table(shown)]
    ranking = t.ranking
    if len(ranking):
        shown = ranking.assign(measure=[("trivial predictor (examples and classes only)" if m == "trivial" else
                                         distance_name(m)) for m in ranking["measure"]],
                               mean_agreement=ranking["mean_agreement"].round(2), mean_tau=ranking["mean_tau"].round(2))
        out += ["", "Which cheap measure predicts the gain (mean sign-adjusted Kendall tau with the gain over sizes; "
                "the trivial predictor is the bar):", "",
                markdown_table(shown[["measure", "mean_agreement", "mean_tau", "sizes", "targets"]]),
                "", predictor_sentence(study, t), half_width_sentence(study, t)]
    out += [""] + anchor_lines
    return [line for line in out if line is not None]
