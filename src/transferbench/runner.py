"""Plan a study (validate against the registries), skip cells already done, run the rest in parallel.

Cells run through joblib: loky processes locally (threads per worker set explicitly, so that
workers do not oversubscribe the cores), or a dask.distributed cluster through joblib's dask
backend. Each worker writes its cell's record itself, atomically, the moment the cell ends.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from joblib import Parallel, delayed, parallel_config
from tqdm.auto import tqdm

from .errors import ConfigError
from .study import Cell, Study, expand
from .store import read_records, write_record


def plan(study: Study) -> list[Cell]:
    """Every cell of the grid, after checking each name and range against what exists."""
    import timm

    from .backbones import check_model_name, resolve_depth, resolve_weights
    from .data import DATASETS, SHIFTS, class_counts
    from .data.embedded import load_raw
    from .schedules import SCHEDULES

    for i, t in enumerate(study.targets):
        DATASETS.get(t.dataset, f"targets.{i}.dataset")
        if t.shift:
            SHIFTS.get(t.shift, f"targets.{i}.shift")
    for i, s in enumerate(study.grid.schedule):
        SCHEDULES.get(s.name, f"grid.schedule.{i}.name")
    for i, b in enumerate(study.backbones):
        check_model_name(b.model)
        if b.weights != "hub":  # hub weights need the network: checked when the cell runs
            resolve_weights(b.model, b.weights)
        n_groups = len(_groups_of(timm, b.model))
        for d in study.grid.frozen_depth:
            resolve_depth(d, n_groups, field=f"grid.frozen_depth (backbones.{i}: {b.model})")
    for i, t in enumerate(study.targets):
        smallest = min(class_counts(load_raw(t.dataset).splits["train"][1]).values())
        too_big = [n for n in study.grid.n_per_class if n > smallest]
        if too_big:
            raise ConfigError("grid.n_per_class", f"{too_big} examples per class asked, but '{t.dataset}' holds "
                              f"only {smallest} in its smallest class", f"use sizes up to {smallest}")
    return expand(study)


def _groups_of(timm, model_name: str):
    from .backbones import depth_groups

    return depth_groups(timm.create_model(model_name, pretrained=False))


# ------------------------------------------------------------------ provenance ------------------------------

def provenance() -> dict:
    import timm
    import torch

    from . import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(transferbench_version=__version__, torch_version=torch.__version__, timm_version=timm.__version__,
                python_version=platform.python_version(), git_commit=commit, host=socket.gethostname())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------ one cell in a worker -------------------

_WORKER_CACHE = None


def run_one(cell: Cell, study_name: str, records_dir: str, threads: int, context: dict) -> dict:
    """Train one cell and write its record; a failure becomes a record too (status 'failed')."""
    global _WORKER_CACHE
    import torch

    from .features import FeatureCache
    from .train import train_cell

    torch.set_num_threads(threads)
    if _WORKER_CACHE is None:
        _WORKER_CACHE = FeatureCache.default()
    record = dict(study=study_name, cell_id=cell.cell_id, **cell.model_dump(), **context,
                  threads=threads, worker_pid=os.getpid(), started=_now())
    try:
        record |= train_cell(cell, _WORKER_CACHE) | dict(status="ok", error=None)
    except Exception as e:  # kept, not raised: the study goes on and reports it
        record |= dict(status="failed", error=f"{type(e).__name__}: {e}",
                       traceback=traceback.format_exc(limit=5))
    record["ended"] = _now()
    write_record(Path(records_dir), record)
    return {k: record.get(k) for k in ("cell_id", "arm", "status", "error", "cell_seconds", "train_seconds",
                                       "prefix_seconds", "images_seen", "cache")}


# ------------------------------------------------------------------ the study ------------------------------

@dataclass
class RunSummary:
    total: int
    skipped: int
    ran: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.ran)


def pending(cells: list[Cell], records: dict[str, dict], retry_failed: bool) -> list[Cell]:
    def done(c: Cell) -> bool:
        r = records.get(c.cell_id)
        return r is not None and (r["status"] == "ok" or not retry_failed)

    return [c for c in cells if not done(c)]


def run_cells(study: Study, cells: list[Cell], records_dir: Path, jobs: int | None = None,
              backend: str | None = None, scheduler: str | None = None, retry_failed: bool = False,
              progress: bool = True) -> RunSummary:
    t0 = time.perf_counter()
    records = read_records(records_dir)
    todo = pending(cells, records, retry_failed)
    # Cells that share frozen-prefix features run back to back, so the worker's memory cache hits.
    todo.sort(key=lambda c: (c.model, c.weights, c.dataset, str(c.shift), c.severity, str(c.frozen_depth),
                             c.n_per_class, c.schedule, c.seed))
    summary = RunSummary(total=len(cells), skipped=len(cells) - len(todo))
    if not todo:
        return summary
    records_dir.mkdir(parents=True, exist_ok=True)
    run = study.run
    jobs, backend = jobs or run.jobs, backend or run.backend
    threads = run.threads_per_worker
    context = provenance()
    tasks = (delayed(run_one)(c, study.name, str(records_dir), threads, context) for c in todo)
    bar = tqdm(total=len(todo), desc=f"{study.name}: cells", unit="cell", disable=not progress, smoothing=0.05)
    with _backend(backend, jobs, threads, scheduler or run.scheduler):
        for result in Parallel(n_jobs=1 if backend == "sequential" else jobs, return_as="generator_unordered")(tasks):
            summary.ran.append(result)
            bar.update(1)
            if result["status"] == "failed":
                bar.write(f"cell {result['cell_id']} failed: {result['error']}")
    bar.close()
    summary.wall_seconds = time.perf_counter() - t0
    return summary


def _backend(backend: str, jobs: int, threads: int, scheduler: str | None):
    if backend == "dask":
        try:
            from dask.distributed import Client
        except ImportError:
            raise ConfigError("run.backend", "dask is not installed", "pip install 'transferbench[dask]'") from None
        address = scheduler or os.environ.get("TRANSFERBENCH_DASK_SCHEDULER")
        if not address:
            raise ConfigError("run.scheduler", "backend 'dask' needs a scheduler address",
                              "pass --scheduler tcp://HOST:8786 or set TRANSFERBENCH_DASK_SCHEDULER")
        Client(address)  # joblib's dask backend uses the current client
        return parallel_config(backend="dask")
    if backend == "sequential":
        return parallel_config(backend="sequential")
    return parallel_config(backend="loky", inner_max_num_threads=threads)


def timing_table(summary: RunSummary) -> str:
    by_arm: dict[str, list] = {}
    for r in summary.ran:
        by_arm.setdefault(r["arm"], []).append(r)
    cache = Counter(r.get("cache") for r in summary.ran)
    lines = [f"wall time: {summary.wall_seconds:.1f} s for {len(summary.ran)} cells "
             f"({summary.skipped} already done, {summary.failed} failed)",
             f"{'arm':<10}{'cells':>7}{'cell-seconds':>14}{'prefix-s':>10}{'images/s':>10}"]
    for arm, rs in sorted(by_arm.items()):
        secs = sum(r.get("cell_seconds") or 0 for r in rs)
        train = sum(r.get("train_seconds") or 0 for r in rs)
        seen = sum(r.get("images_seen") or 0 for r in rs)
        lines.append(f"{arm:<10}{len(rs):>7}{secs:>14.1f}{sum(r.get('prefix_seconds') or 0 for r in rs):>10.1f}"
                     f"{seen / max(train, 1e-9):>10.0f}")
    lines.append("feature cache: " + ", ".join(f"{k}={v}" for k, v in sorted(cache.items(), key=str)))
    return "\n".join(lines)
