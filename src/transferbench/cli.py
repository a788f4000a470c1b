"""Entry points: `transferbench study NAME [key=value ...]`, `transferbench plan NAME [key=value ...]`,
`transferbench report NAME`, `transferbench compare BASE NEW`, `transferbench list KIND`, `transferbench advise DATA`;
errors map to exit codes
(bad input: 2, a regression or failed cells: 1)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from pathlib import Path
from urllib.error import URLError

from transferbench.core.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferbench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("study", help="run a study (cells already done are skipped) and write its report")
    s.add_argument("study", help="a name in studies/ or a path to a YAML file")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grid.seed=[0,1] train.steps=300")
    s.add_argument("--profile", help="a named override set from the study's `profiles:`")
    s.add_argument("--results", type=Path, default=Path("results"), help="results root (default: results/)")
    s.add_argument("--jobs", type=int, help="parallel workers (default: the study's run.jobs)")
    s.add_argument("--backend", choices=["loky", "dask", "sequential"], help="default: the study's run.backend")
    s.add_argument("--scheduler", help="dask scheduler address (or TRANSFERBENCH_DASK_SCHEDULER)")
    s.add_argument("--retry-failed", action="store_true", help="rerun only the cells recorded as failed")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--skip-domains", action="store_true", help="skip the domain measures (distances, estimators): "
                   "quicker iteration; the report then orders targets as listed and ranks no estimator")
    pl = sub.add_parser("plan", help="what a study will cost, before it runs: cells, SGD runs, optimizer steps and "
                        "images per arm before early stopping, and how full the packs would be on a GPU")
    pl.add_argument("study", help="a name in studies/ or a path to a YAML file")
    pl.add_argument("overrides", nargs="*", help="dotted overrides, as for `study`")
    pl.add_argument("--profile", help="a named override set from the study's `profiles:`")
    pl.add_argument("--jobs", type=int, help="parallel workers the projected time assumes (default: the study's "
                    "run.jobs)")
    pl.add_argument("--reference", type=Path, metavar="DIR", help="project the wall time from this recorded run (a "
                    "results folder; default: one under ./results/baselines/ at the same image size and worker "
                    "count: the study's own, else the largest)")
    r = sub.add_parser("report", help="rebuild tables, figures and report from the records (no training)")
    r.add_argument("study", help="study name (its folder under --results)")
    r.add_argument("--results", type=Path, default=Path("results"))
    ls = sub.add_parser("list", help="what a study file can name: a registry's entries with their metadata")
    ls.add_argument("kind", choices=LISTS, help="which registry")
    c = sub.add_parser("compare", help="compare two result folders (or a folder with the history: --history); exit 1 "
                       "on a regression")
    c.add_argument("folders", type=Path, nargs="+", metavar="BASE NEW", help="e.g. results/baselines/smoke "
                   "results/smoke; with --history only NEW")
    c.add_argument("--history", type=Path, help="take the base from this history: the last "
                   "--last recorded commits on this host class, since the last accepted change")
    c.add_argument("--last", type=int, default=5, help="commits pooled into the base with --history (1 to 50)")
    c.add_argument("--base-commit", metavar="REF", help="with --history: pool only REF and its ancestors (a pull "
                   "request's merge-base with its target: $(git merge-base HEAD origin/main))")
    c.add_argument("--fallback", type=Path, help="with --history: the base folder to use where the history holds no "
                   "other commit on this host class (e.g. results/baselines/smoke)")
    c.add_argument("--margin", type=float, default=0.02, help="a point's gain may fall this much (accuracy, 0 to "
                   "0.25) before a drop counts; aggregates use half of it")
    c.add_argument("--fdr", type=float, default=0.05, help="Benjamini-Hochberg level across the gate's tests (0.001 "
                   "to 0.5)")
    c.add_argument("--speed-fraction", type=float, default=0.7, help="fail when an arm's within-job speed ratio "
                   "(images/s over the run's own reference step) falls below this share of the base's (0.1 to 1); "
                   "images/s themselves, where judged, at 0.5 or this if lower")
    c.add_argument("--format", choices=["text", "md"], default="text", help="md: a pass/fail summary for a CI job "
                   "summary or a pull-request comment (failing checks, verdict flips, speed, all tests folded)")
    c.add_argument("--confirm", action="store_true", help="before failing, rerun the cells of the flagged tests with "
                   "fresh seeds (into NEW/confirm/) and fail only on the tests flagged again")
    c.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar while confirming")
    a = sub.add_parser("advise", help="will pretraining pay on DATA, and with which tuning? Predicted from the "
                       "frozen backbones' measures (forward passes only) by a model fitted on a study's domain dial")
    a.add_argument("data", nargs="?", help="an ImageFolder path (CLASS/image.png, or train/ val/ test/) or a "
                   "registered dataset's name (`transferbench list datasets`)")
    a.add_argument("--shift", help="a registered shift applied to DATA (with --severity)")
    a.add_argument("--severity", type=int, default=0, help="the shift's severity, 1 to 5")
    a.add_argument("--backbone", action="append", help="a backbone the predictor was fitted on (repeat; default: all)")
    a.add_argument("--sizes", help="labelled examples per class to predict at, e.g. 2,4,16 (default: the fitted ones)")
    a.add_argument("--accuracy", type=float, help="a test accuracy to reach (0 to 1): the advice names the fewest "
                   "labels per class predicted to reach it")
    a.add_argument("--from", dest="source", type=Path, default=None, help="the results folder holding predictor.json "
                   "(default: results/baselines/domain_gap)")
    a.add_argument("--fit", type=Path, nargs="+", help="refit predictor.json from these results folders (written into "
                   "the first) and print its validation")
    a.add_argument("--results", type=Path, default=Path("results"), help="advice goes to RESULTS/advice/<target>/")
    a.add_argument("--no-progress", action="store_true")
    rec = sub.add_parser("record", help="append a study's results to the history: one file per host class and commit")
    rec.add_argument("study", help="study name (its folder under --results)")
    rec.add_argument("--results", type=Path, default=Path("results"))
    rec.add_argument("--history", type=Path, default=HISTORY)
    rec.add_argument("--commit", help="the commit the run was made at (default: HEAD of this checkout)")
    h = sub.add_parser("history", help="the history's marks: `history accept COMMIT --study S --reason R` starts "
                       "later bases from an intended change")
    h.add_argument("action", choices=["accept"])
    h.add_argument("commit")
    h.add_argument("--study", required=True)
    h.add_argument("--reason", required=True)
    h.add_argument("--history", type=Path, default=HISTORY)
    tr = sub.add_parser("trend", help="gains, accuracy and speed along recorded commits, with change points")
    tr.add_argument("study")
    tr.add_argument("--history", type=Path, default=HISTORY)
    tr.add_argument("--results", type=Path, default=Path("results"), help="the figure goes to RESULTS/trend/STUDY/")
    tr.add_argument("--window", type=int, default=5, help="commits on each side of a tested step (2 to 20)")
    tr.add_argument("--margin", type=float, default=0.02, help="a step must exceed this (accuracy) to count")
    return p


HISTORY = Path("results/history")


def cmd_record(args) -> int:
    from transferbench.analysis.history import record
    from transferbench.pipeline import study_folder

    print(f"recorded: {record(study_folder(args.results, args.study), args.history, args.commit)}")
    return 0


def cmd_history(args) -> int:
    from transferbench.analysis.history import accept

    print(f"accepted {args.commit} for {args.study}: {accept(args.history, args.study, args.commit, args.reason)}")
    return 0


def cmd_trend(args) -> int:
    from transferbench.analysis.history import change_points, read_history, series, speeds
    from transferbench.core.paths import check_results_folder
    from transferbench.report.trend import trend_figure

    if not 2 <= args.window <= 20:
        raise ConfigError("--window", f"{args.window} is outside 2 to 20", "e.g. --window 5")
    runs = read_history(args.history, args.study)
    if runs.empty:
        raise ConfigError("--history", f"no record of {args.study} in {args.history}",
                          "record runs first: transferbench record STUDY")
    values = series(runs)
    points = change_points(values, args.window, args.margin)
    out = args.results / "trend" / args.study
    check_results_folder(args.results / "trend")
    out.mkdir(parents=True, exist_ok=True)
    found = runs.groupby("order")[["commit", "host_class", "packages"]].first().reset_index(drop=True)
    paths = trend_figure(values, speeds(runs), points, found, out)
    points.assign(commit=points["order"].map(dict(enumerate(found["commit"])))).to_csv(out / "change_points.csv",
                                                                                       index=False)
    changes = points[points["change"]]
    print(f"trend: {paths[0]} ({len(found)} recorded runs)")
    print("\n".join(f"change point: {r.what} at {found['commit'].iloc[r.order][:8]} ({100 * r.step:+.1f} pp, q "
                    f"{r.q:.2g})" for r in changes.itertuples()) or "no change point")
    return 0


def cmd_study(args) -> int:
    from transferbench.core.study import load_study, study_path
    from transferbench.pipeline import Options, run_study

    # The file is validated before torch, pandas or matplotlib are imported: a bad file is refused in well under a
    # second (what needs the data or the model is checked by plan()).
    study = load_study(study_path(args.study), args.overrides, args.profile)
    done = run_study(study, args.results, Options(jobs=args.jobs, backend=args.backend, scheduler=args.scheduler,
                                                  retry_failed=args.retry_failed, progress=not args.no_progress,
                                                  skip_domains=args.skip_domains))
    print(done.timing or f"nothing to do: all {done.cells} cells already have records (timing of the run that "
                         f"trained them kept in {done.report.parent / 'timing.txt'})")
    print(f"report: {done.report} (and report.html)\nfindings:")
    print("".join(f"  {i}. {line}\n" for i, line in enumerate(done.findings, 1)), end="")
    if done.failed:
        print(f"{done.failed} cell(s) failed; see runs.csv (status, error) and rerun with --retry-failed",
              file=sys.stderr)
        return 1
    return 0


def cmd_plan(args) -> int:
    from transferbench.core.study import load_study, study_path
    from transferbench.sweep.costs import plan_table
    from transferbench.sweep.planning import plan
    from transferbench.sweep.projection import projection

    study = load_study(study_path(args.study), args.overrides, args.profile)
    if args.jobs is not None:
        study = study.model_copy(update=dict(run=study.run.model_copy(update=dict(jobs=args.jobs))))
    cells = plan(study)
    print(plan_table(study, cells))
    print(projection(study, cells, args.reference))
    return 0


def cmd_report(args) -> int:
    from transferbench.pipeline import rebuild_report

    print(f"report: {rebuild_report(args.results, args.study)}")
    return 0


LISTS = ("datasets", "shifts", "schedules", "recipes", "optimizers", "weights", "measures", "figures", "sections",
         "anchors", "claims")


def cmd_list(args) -> int:
    """timm's list_models, for each of the harness's registries: the names a study file can use, with metadata."""
    from transferbench.analysis.arms import CLAIMS
    from transferbench.data import DATASETS, SHIFTS
    from transferbench.measures import MEASURES
    from transferbench.models.backbones import WEIGHTS
    from transferbench.report.anchors import ANCHORS
    from transferbench.report.document import SECTIONS
    from transferbench.report.plots import FIGURES
    from transferbench.training.schedules import OPTIMIZERS, SCHEDULES

    recipes = [n for n in SCHEDULES if SCHEDULES.meta(n).get("arm")]
    registry, names = {"datasets": (DATASETS, None), "shifts": (SHIFTS, None), "optimizers": (OPTIMIZERS, None),
                       "schedules": (SCHEDULES, [n for n in SCHEDULES if n not in recipes]),
                       "recipes": (SCHEDULES, recipes), "weights": (WEIGHTS, None), "measures": (MEASURES, None),
                       "figures": (FIGURES, None), "sections": (SECTIONS, None), "anchors": (ANCHORS, None),
                       "claims": (CLAIMS, None)}[args.kind]
    print(registry.describe(names))
    return 0


def _base(args, new: Path):
    """(base runs, the base's name, verdict flips, whether the base ran on this host class): a folder, or the
    history's last commits on this host class (the fallback folder where the history holds none)."""
    from transferbench.analysis.compare import read_gains, read_runs, verdict_flips
    from transferbench.analysis.history import (
        NoBase,
        base_runs,
        git_commit,
        host_class,
        host_fingerprint,
        last_gains,
        study_name,
    )

    if not args.history:
        base = args.folders[0]
        return read_runs(base), str(base), verdict_flips(read_gains(base), read_gains(new)), False
    study, host = study_name(new / "study.resolved.yaml"), host_class(host_fingerprint())
    if args.history.exists() and not args.history.is_dir():
        raise ConfigError("--history", f"{args.history} is not a folder", "give the history folder (transferbench "
                          "record writes it; default results/history)")
    try:
        under_test = git_commit()[0]
    except ConfigError:
        raise ConfigError("--history", "this folder is not a git checkout (or git is missing): the commit under test, "
                          "which the base must leave out, is unknown", "run compare inside the repository") from None
    try:
        b_runs, commits = base_runs(args.history, study, host, exclude=under_test, k=args.last,
                                    up_to=args.base_commit)
    except NoBase:
        if not args.fallback:
            raise
        print(f"no other commit of {study} recorded on host class {host}"
              + (f" among {args.base_commit} and its ancestors" if args.base_commit is not None else "")
              + f": comparing with {args.fallback}", file=sys.stderr)
        return read_runs(args.fallback), str(args.fallback), verdict_flips(read_gains(args.fallback),
                                                                             read_gains(new)), False
    label = f"{args.history} ({study}, {host}: {len(commits)} commit(s) up to {commits[-1][:8]})"
    return b_runs, label, verdict_flips(last_gains(args.history, study, host, commits[-1]), read_gains(new)), True


def _confirmed(args, result, b_runs, n_runs, new: Path):
    """The comparison with its flagged tests made again on a rerun of their cells with fresh seeds."""
    from transferbench.analysis.confirm import covered_cells, fresh_seeds, retest
    from transferbench.core.study import load_saved_study
    from transferbench.pipeline import Options, rerun_cells

    if not result.tests["flagged"].any():
        return result
    if result.exact or result.slower or result.untestable:
        print("not confirming the flagged tests: the gate fails on what no rerun of seeds changes (below)",
              file=sys.stderr)
        return result
    if not (new / "study.resolved.yaml").is_file():
        raise ConfigError("--confirm", f"{new} has no study.resolved.yaml: a confirmation reruns the study that made "
                          "the results", "give the folder `transferbench study` wrote, or compare without --confirm")
    study = load_saved_study(new)
    cells, seeds = covered_cells(n_runs, result.tests), fresh_seeds(study.grid.seed, b_runs["seed"])
    print(f"confirming {int(result.tests['flagged'].sum())} flagged test(s): {len(cells)} cell(s) again at seeds "
          f"{seeds} -> {new / 'confirm'}/", file=sys.stderr, flush=True)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the summary (--format md goes to a PR as it is)
        rerun = rerun_cells(new, study, cells, seeds, Options(progress=args.progress, retry_failed=True))
    from transferbench.analysis.compare import read_runs

    return retest(result, b_runs, read_runs(rerun, require_valid=False), args.margin, args.margin / 2)


def cmd_compare(args) -> int:
    from transferbench.analysis.compare import check_options, compare_runs, read_runs, render, render_markdown

    if args.history and not 1 <= args.last <= 50:
        raise ConfigError("--last", f"{args.last} is outside 1 to 50", "e.g. --last 5")
    if args.base_commit is not None and not args.history:
        raise ConfigError("--base-commit", "it chooses among recorded commits", "give --history DIR with it")
    if len(args.folders) != (1 if args.history else 2):
        raise ConfigError("compare", f"{len(args.folders)} folder(s) given", "with --history give only NEW (e.g. "
                          "compare results/smoke --history DIR)" if args.history else "give BASE and NEW, or NEW "
                          "with --history DIR")
    check_options(margin=args.margin, fdr=args.fdr, speed_fraction=args.speed_fraction,
                  aggregate_margin=args.margin / 2)
    new = args.folders[-1]
    b_runs, base, flips, same_host = _base(args, new)
    n_runs = read_runs(new)
    result = compare_runs(b_runs, n_runs, base, args.margin, args.fdr, args.speed_fraction, args.margin / 2, flips,
                          same_host)
    if args.confirm:
        try:
            result = _confirmed(args, result, b_runs, n_runs, new)
        except ConfigError:  # the first pass is not lost: shown, then the refusal
            print((render_markdown if args.format == "md" else render)(result, base, new))
            print("(the first pass, unconfirmed: the confirmation was refused)")
            raise
    print((render_markdown if args.format == "md" else render)(result, base, new))
    return 0 if result.ok else 1


def _sizes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        sizes = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise ConfigError("--sizes", f"{text!r} is not a comma-separated list of whole numbers",
                          "e.g. --sizes 2,4,16") from None
    if not sizes or sizes[0] < 1:
        raise ConfigError("--sizes", f"{text!r}: sizes are labelled examples per class, at least 1",
                          "e.g. --sizes 2,4,16")
    return sizes


def cmd_advise(args) -> int:
    from transferbench.advise import DEFAULT_FROM, advise, fit_from, load_predictor, save_predictor

    if args.accuracy is not None and not 0 < args.accuracy < 1:
        raise ConfigError("--accuracy", f"{args.accuracy} is not a test accuracy", "give a number between 0 and 1")
    sizes = _sizes(args.sizes)
    if args.fit and args.source:
        raise ConfigError("--from", "give --fit or --from, not both", "--fit refits the predictor into the first "
                          "folder it names and advises with it")
    if args.fit:
        predictor = fit_from(args.fit)
        print(f"predictor: {save_predictor(predictor, args.fit[0])}")
        for outcome, v in predictor.validation.items():
            print(f"  {outcome}: " + "; ".join(f"{k} error {s['mae']:.3f}, coverage 80% {s['coverage80']:.0%} / 90% "
                                               f"{s['coverage90']:.0%}" for k in ("measures", "trivial")
                                               if (s := v.get(k))) + ("" if v["beats_trivial"] else
                                                                      " -- the measures do not beat the trivial one"))
        if args.data is None:
            return 0
    elif args.data is None:
        raise ConfigError("DATA", "no data to advise on",
                          "give an ImageFolder path or a dataset name, or --fit RESULTS")
    else:
        predictor = load_predictor(args.source or DEFAULT_FROM)
    found, out = advise(args.data, predictor, args.results, args.shift, args.severity, args.backbone, sizes,
                        args.accuracy, progress=not args.no_progress)
    print("\n".join(found.lines))
    if found.outside:
        print("warning: outside the fitted conditions -- " + "; ".join(found.outside))
    print(f"advice: {out / 'advice.md'} (and advice.json)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come after options too
    if extra and (args.command not in ("study", "plan") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    try:
        if getattr(args, "jobs", None) is not None and args.jobs < 1:  # 0 would silently mean the study's run.jobs
            raise ConfigError("--jobs", f"{args.jobs} workers", "give a positive number of parallel workers")
        return {"study": cmd_study, "plan": cmd_plan, "report": cmd_report, "compare": cmd_compare,
                "list": cmd_list, "advise": cmd_advise, "record": cmd_record, "history": cmd_history,
                "trend": cmd_trend}[args.command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except URLError as e:  # a download (a torchvision dataset, network weights) on a machine without a network
        print(f"error: download failed ({e.reason}) -- fix: connect this machine to the network, or point the "
              "target's options (root, path) at files already on disk (finished cells are kept)", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of the output went away (`transferbench plan smoke | head`): stop quietly
        _silence_stdout()
        return 1
    except OSError as e:  # a full disk, a file where a folder belongs: one line, and what was finished stays on disk
        print(f"error: {e.filename or 'I/O'}: {e.strerror or e} -- fix: {os_error_fix(e)}, then rerun (finished cells "
              "are kept; a rerun resumes)", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is no file (a capture): no pipe to flush into
        pass


def os_error_fix(e: OSError) -> str:
    """The fix for an I/O error, by its cause (errno), not one guess for all."""
    fixes: dict[int | None, str]  # e.errno may be None: get() then gives the default
    fixes = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (a quota is full)",
             errno.EACCES: "fix the folder's permissions or choose another --results folder",
             errno.EPERM: "fix the folder's permissions or choose another --results folder",
             errno.EROFS: "choose a --results folder on a writable file system",
             errno.ENOTDIR: f"a file stands where a folder is needed ({e.filename}): move that file away",
             errno.EISDIR: f"a folder stands where a file is written ({e.filename}): move that folder away",
             errno.EEXIST: f"something already stands at {e.filename}: move it away",
             errno.ELOOP: f"{e.filename} is a symbolic link: remove it"}
    return fixes.get(e.errno, "check that path (it exists, is the right kind, and is writable)")


if __name__ == "__main__":
    sys.exit(main())
