"""A study from its file to its report, the one path `transferbench study` and `report` take:

    study file -> plan (cells, refused before anything is written) -> train the cells (records) -> domain measures
    (domains.csv, estimators.csv) -> tables, figures, report

cli.py parses the command line, prints what comes back and maps errors to exit codes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from transferbench.core.errors import ConfigError
from transferbench.core.paths import check_results_folder, check_writable
from transferbench.core.study import IDENTIFIER, Study


@dataclass(frozen=True)
class Options:
    """How to run a study's cells (None: the study's own `run:` settings)."""
    jobs: int | None = None
    backend: str | None = None
    scheduler: str | None = None
    retry_failed: bool = False
    progress: bool = True
    skip_domains: bool = False


@dataclass(frozen=True)
class Outcome:
    cells: int
    timing: str | None  # the timing block of the cells trained now; None when every cell had a record
    report: Path
    findings: list[str]
    failed: int  # cells whose record says failed (this run's and those kept from earlier runs)


def study_folder(results: Path, name: str) -> Path:
    """results/<name>, refused unless it resolves inside results/ (a name is never a path)."""
    outside = ConfigError("study name", f"{name!r} would write outside {results}/",
                          "use a plain name: letters, digits, '_' and '-'")
    if not IDENTIFIER.fullmatch(name):
        raise outside
    check_results_folder(results / name)  # before resolving: a linked study folder is named as a link
    out = (results / name).resolve()
    if out.parent != results.resolve():
        raise outside
    return out


def run_study(study: Study, results: Path, opts: Options) -> Outcome:
    """Train the cells that have no record yet and rebuild the report. Everything that can be refused (the data,
    the models, the results folder, a corrupted record, a dask address) is refused before anything is written."""
    out = study_folder(results, study.name)  # refused before torch, pandas or matplotlib are imported
    from transferbench.core.study import save_study
    from transferbench.report.document import build
    from transferbench.sweep.planning import plan
    from transferbench.sweep.runner import dask_address, results_lock, run_cells
    from transferbench.sweep.store import read_records, remove_orphans
    from transferbench.training.source import ensure_checkpoints

    if (opts.backend or study.run.backend) == "dask":
        dask_address(opts.scheduler or study.run.scheduler)
    cells = plan(study)
    check_writable(out, "--results", "choose a writable --results folder or fix its permissions")
    read_records(out / "records")
    with results_lock(out):
        removed = remove_orphans(out)
        print(f"{study.name}: {len(cells)} cells -> {out}/" + (f" ({removed} orphan temporary file(s) removed)"
                                                              if removed else ""), flush=True)
        save_study(study, out)
        t0 = time.perf_counter()
        ensure_checkpoints(study)  # `pretrain:<dataset>` sources, trained once and cached
        pretrain_seconds = time.perf_counter() - t0
        summary = run_cells(study, cells, out / "records", jobs=opts.jobs, backend=opts.backend,
                            scheduler=opts.scheduler, retry_failed=opts.retry_failed, progress=opts.progress)
        summary.pretrain_seconds = pretrain_seconds if pretrain_seconds > 0.5 else 0.0  # (nothing to pretrain)
        timing = measure_domains(study, out, summary, opts.skip_domains)
        report = build(study, out, timing, domains=not opts.skip_domains)
    records = read_records(out / "records")
    failed = sum(records[c.cell_id]["status"] == "failed" for c in cells if c.cell_id in records)
    return Outcome(cells=len(cells), timing=timing, report=report,
                   findings=(out / "findings.txt").read_text().splitlines(), failed=failed)


def measure_domains(study: Study, out: Path, summary, skip: bool = False) -> str | None:
    """domains.csv (rebuilt when cells ran or it is missing or unreadable; each pair's measures come from the disk
    cache when nothing they depend on changed); the timing block, None if nothing ran."""
    from transferbench.core.atomic import write_text
    from transferbench.measures.domains import domain_tables
    from transferbench.sweep.runner import timing_table
    from transferbench.sweep.store import read_domains

    t1 = time.perf_counter()
    if not skip and (summary.ran or read_domains(out) is None or not (out / "estimators.csv").exists()):
        domains, estimators = domain_tables(study)
        write_text(out / "estimators.csv", estimators.to_csv(index=False))
        write_text(out / "domains.csv", domains.to_csv(index=False))  # last: its presence says both are whole
    if not summary.ran:
        return None
    return timing_table(summary) + ("\ndomain measures: skipped (--skip-domains)" if skip else
                                    f"\ndomain measures: {time.perf_counter() - t1:.1f} s")


def rebuild_report(results: Path, name: str) -> Path:
    """Tables, figures and report rebuilt from a study folder's records (no training)."""
    from transferbench.core.study import load_saved_study
    from transferbench.report.document import build
    from transferbench.sweep.runner import results_lock
    from transferbench.sweep.store import record_paths

    out = study_folder(results, name)
    if not (out / "study.resolved.yaml").exists():
        raise ConfigError("study", f"no results for '{name}' in {results}/", "run `transferbench study` first")
    with results_lock(out):  # a report is never rebuilt from a folder a runner is writing
        study = load_saved_study(out)
        if not record_paths(out / "records"):
            raise ConfigError("study", f"no cell of '{name}' has a record in {out / 'records'} yet", "run "
                              "`transferbench study` until a cell finishes: a report needs one")
        return build(study, out)


# The fields a rerun with other seeds changes: the seed, and which seed's LR choice a cell reuses (lr_search:
# first_seed names the lowest seed of the grid).
RESEEDED = frozenset({"seed", "lr_from_seed"})


def rerun_cells(new: Path, study: Study, cell_ids: list[str], seeds: list[int], opts: Options) -> Path:
    """These cells of a finished study (`study`, saved in results folder `new`) trained again at other seeds, into
    `new`/confirm/ (records kept: confirming the same cells again trains nothing); returns that folder, with its
    runs.csv.
    The rerun plans the study as saved with the grid's seeds replaced, so every cell keeps its protocol, and a cell
    that reuses another seed's LR choice brings that cell along."""
    from transferbench.core.atomic import write_text
    from transferbench.sweep.planning import plan, same_fields
    from transferbench.sweep.runner import results_lock, run_cells
    from transferbench.sweep.store import read_records, runs_table
    from transferbench.training.source import cells_of, ensure_checkpoints

    check_results_folder(new)  # as a study refuses its folder: a link in it would take the rerun's writes elsewhere
    check_writable(new, "compare", "make the results folder writable: a confirmation writes into it")
    planned = {c.cell_id: c for c in cells_of(study)}  # the run's own cells (plan checks the data once, below)
    unknown = [i for i in cell_ids if i not in planned]
    if unknown:
        raise ConfigError("--confirm", f"{len(unknown)} flagged cell(s) of {new} are not cells its study plans with "
                          f"this code (e.g. {unknown[0]})", "rerun the study with this code, then compare again")
    wanted = {same_fields(planned[i], RESEEDED) for i in cell_ids}
    rerun = study.model_copy(update=dict(grid=study.grid.model_copy(update=dict(seed=seeds))))
    fresh = {c.cell_id: c for c in plan(rerun)}
    cells = {i: c for i, c in fresh.items() if same_fields(c, RESEEDED) in wanted}
    cells |= {c.lr_source_id: fresh[c.lr_source_id] for c in list(cells.values()) if c.lr_source_id}
    out = new / "confirm"
    with results_lock(new):
        ensure_checkpoints(rerun)
        run_cells(rerun, list(cells.values()), out / "records", jobs=opts.jobs, backend=opts.backend,
                  progress=opts.progress)
        records = read_records(out / "records")
        write_text(out / "runs.csv", runs_table([records[i] for i in cells if i in records]).to_csv(index=False))
    return out
