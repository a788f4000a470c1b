"""Entry points: `transferbench study NAME [key=value ...]`, `transferbench report NAME`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferbench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("study", help="run a study (cells already done are skipped) and write its report")
    s.add_argument("study", help="a name in studies/ or a path to a YAML file")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grid.seed=[0,1] train.epochs=3")
    s.add_argument("--profile", help="a named override set from the study's `profiles:`")
    s.add_argument("--results", type=Path, default=Path("results"), help="results root (default: results/)")
    s.add_argument("--jobs", type=int, help="parallel workers (default: the study's run.jobs)")
    s.add_argument("--backend", choices=["loky", "dask", "sequential"], help="default: the study's run.backend")
    s.add_argument("--scheduler", help="dask scheduler address (or TRANSFERBENCH_DASK_SCHEDULER)")
    s.add_argument("--retry-failed", action="store_true", help="rerun only the cells recorded as failed")
    s.add_argument("--no-progress", action="store_true")
    r = sub.add_parser("report", help="rebuild tables, figures and report from the records (no training)")
    r.add_argument("study", help="study name (its folder under --results)")
    r.add_argument("--results", type=Path, default=Path("results"))
    return p


def _check_writable(out: Path) -> None:
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise ConfigError("--results", f"{probe} is not writable", "choose a writable --results folder or fix its permissions")


def cmd_study(args) -> int:
    from .report import build, save_study
    from .runner import plan, run_cells, timing_table
    from .study import load_study, study_path

    study = load_study(study_path(args.study), args.overrides, args.profile)
    cells = plan(study)
    out = args.results / study.name
    _check_writable(out)
    print(f"{study.name}: {len(cells)} cells -> {out}/", flush=True)
    save_study(study, out)
    t0 = time.perf_counter()
    summary = run_cells(study, cells, out / "records", jobs=args.jobs, backend=args.backend,
                        scheduler=args.scheduler, retry_failed=args.retry_failed, progress=not args.no_progress)
    summary.wall_seconds = time.perf_counter() - t0
    timing = timing_table(summary)
    report = build(study, out, timing)
    print(timing)
    print(f"report: {report}")
    if summary.failed:
        print(f"{summary.failed} cell(s) failed; see runs.csv (status, error) and rerun with --retry-failed",
              file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from .report import build, load_saved_study

    out = args.results / args.study
    if not (out / "study.resolved.yaml").exists():
        raise ConfigError("study", f"no results for '{args.study}' in {args.results}/", "run `transferbench study` first")
    print(f"report: {build(load_saved_study(out), out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"study": cmd_study, "report": cmd_report}[args.command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
