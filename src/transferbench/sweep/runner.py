"""Run a planned study: skip cells already done, run the rest in parallel, one record per cell.

Cells run through joblib: loky processes locally (threads per worker set explicitly, so that
workers do not oversubscribe the cores), or a dask.distributed cluster through joblib's dask
backend. Each worker writes its cell's record itself, atomically, the moment the cell ends.
"""

from __future__ import annotations

import errno
import hashlib
import os
import platform
import socket
import stat
import subprocess
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from joblib import Parallel, delayed, parallel_config
from tqdm.auto import tqdm

from transferbench.core.errors import ConfigError
from transferbench.core.host import cpu_model
from transferbench.core.paths import LINK_FIX, check_results_folder, results_subfolder
from transferbench.core.study import Cell, Study
from transferbench.sweep import reference
from transferbench.sweep.costs import cell_work
from transferbench.sweep.planning import chosen_lr, feature_groups, lr_phases, pack_groups, packs
from transferbench.sweep.store import read_records, write_record

# ------------------------------------------------------------------ provenance ------------------------------

def provenance() -> dict:
    import timm
    import torch

    from transferbench import __version__

    return dict(transferbench_version=__version__, torch_version=torch.__version__, timm_version=timm.__version__,
                python_version=platform.python_version(), host=socket.gethostname(), cpu=cpu_model(), **git_state())


def git_state() -> dict:
    """The commit the code ran from, and a hash of its uncommitted changes (None when clean or not a checkout)."""
    def git(*args) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = (git("rev-parse", "--verify", "-q", "HEAD") or "").strip() or None
    diff = git("diff", "HEAD", "--", ".") if commit else None
    return dict(git_commit=commit, git_dirty=hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------ one cell in a worker -------------------

_WORKER_CACHE = None


def run_one(cell: Cell, lr: float | None, study_name: str, records_dir: str, threads: int, context: dict) -> dict:
    """Train one cell (at `lr`, another seed's choice, where given) and write its record; a failure becomes a record
    too (status 'failed')."""
    from transferbench.training.cell import train_cell

    record = start_record(cell, lr, study_name, threads, context)
    try:
        measured, error = train_cell(cell, worker_cache(threads), lr=lr), None
    except Exception as e:  # kept, not raised: the study goes on and reports it
        measured, error = None, e
    return finish_record(record, measured, error, records_dir)


def worker_cache(threads: int):
    """This worker's feature cache (one per process), with its thread count set."""
    global _WORKER_CACHE
    import torch

    from transferbench.models.features import FeatureCache

    torch.set_num_threads(threads)
    if _WORKER_CACHE is None:
        _WORKER_CACHE = FeatureCache.default()
    return _WORKER_CACHE


def start_record(cell: Cell, lr: float | None, study_name: str, threads: int, context: dict) -> dict:
    """The record's fields known before training; `packed` says whether its runs trained in a pack (same precision
    and arithmetic, summed in another order) or alone."""
    return dict(study=study_name, cell_id=cell.cell_id, **cell.model_dump(), **context, threads=threads,
                worker_pid=os.getpid(), started=_now(), packed=False,
                lr_source=cell.lr_source_id if lr else None)  # None: the cell chose its own LR


def finish_record(record: dict, measured: dict | None, error: Exception | None, records_dir: str) -> dict:
    """Write the record (a failure is a record too: status 'failed'); the summary line the runner keeps."""
    if error is None:
        assert measured is not None  # a cell that did not fail was measured
        assert not set(measured) & set(Cell.model_fields), "a measurement must not overwrite the cell's config"
        record |= measured | dict(status="ok", error=None)
    else:
        trace = "".join(traceback.format_exception(error, limit=5))
        record |= dict(status="failed", error=f"{type(error).__name__}: {error}", traceback=trace)
    record["ended"] = _now()
    write_record(Path(records_dir), record)
    return {k: record.get(k) for k in ("cell_id", "arm", "status", "error", "cell_seconds", "train_seconds",
                                       "prefix_seconds", "images_seen", "cache")}


def run_group(cells: list[tuple[Cell, float | None]], *args) -> list[dict]:
    """Cells (each with its given LR or None) that share frozen-prefix features, run in one worker: the features are
    computed once."""
    return [run_one(c, lr, *args) for c, lr in cells]


def run_pack(cells: list[tuple[Cell, float | None]], study_name: str, records_dir: str, threads: int, context: dict,
             pack_size: int) -> list[dict]:
    """Cells trained together in one worker, the runs of those of one network shape packed (packed.py); each still
    gets its own record, written when the group ends."""
    from transferbench.training.cell import fit_together
    from transferbench.training.packed import packed

    starts = [start_record(c, lr, study_name, threads, context) | dict(packed=True) for c, lr in cells]
    results = fit_together(cells, worker_cache(threads), packed(pack_size))
    return [finish_record(r, measured, error, records_dir) for r, (measured, error) in zip(starts, results)]


# ------------------------------------------------------------------ the study ------------------------------

class PeakMemory:
    """Peak memory of this process and all its children (the workers), sampled every `interval`
    seconds in a background thread. Summed as PSS (shared library pages split between the
    processes that map them), so torch's libraries are not counted once per worker."""

    def __init__(self, interval: float = 1.0):
        import threading

        self.peak, self.interval = 0, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@dataclass
class RunSummary:
    total: int
    skipped: int
    ran: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    peak_pss_bytes: int = 0  # proportional set size: shared library pages split between processes
    pretrain_seconds: float = 0.0  # sources trained before the cells (pretrain:<dataset>)
    reference: float | None = None  # images/s of the host's bare step, measured before the cells (sweep.reference)

    @property
    def failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.ran)


def pending(cells: list[Cell], records: dict[str, dict], retry_failed: bool) -> list[Cell]:
    def done(c: Cell) -> bool:
        r = records.get(c.cell_id)
        return r is not None and (r["status"] == "ok" or not retry_failed)

    return [c for c in cells if not done(c)]


class WorkBar:
    """Progress in planned work, not in cells (which differ 100x in cost): the ETA is the elapsed time scaled by
    the work left over the work done (costs.cell_work), at the average rate since the start."""

    def __init__(self, cells: list[Cell], name: str, disable: bool = False):
        self.work, self.name, self.cells = {c.cell_id: cell_work(c) for c in cells}, name, 0
        self.bar = tqdm(total=sum(self.work.values()), desc=self._cells(), disable=disable, smoothing=0,
                        bar_format="{desc}, {percentage:3.0f}% of the work |{bar}| [{elapsed}<{remaining}]")

    def _cells(self) -> str:
        return f"{self.name}: {self.cells}/{len(self.work)} cells"

    def done(self, cell_ids: list[str]) -> None:
        self.cells += len(cell_ids)
        self.bar.set_description_str(self._cells(), refresh=False)
        self.bar.update(sum(self.work[i] for i in cell_ids))

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


def run_cells(study: Study, cells: list[Cell], records_dir: Path, jobs: int | None = None,
              backend: str | None = None, scheduler: str | None = None, retry_failed: bool = False,
              progress: bool = True) -> RunSummary:
    t0 = time.perf_counter()
    records = read_records(records_dir)
    todo = pending(cells, records, retry_failed)
    summary = RunSummary(total=len(cells), skipped=len(cells) - len(todo))
    if not todo:
        return summary
    results_subfolder(records_dir)
    run = study.run
    jobs, backend = jobs or run.jobs, backend or run.backend
    workers = 1 if backend == "sequential" else jobs
    threads = run.threads_per_worker
    # Each record carries its job's reference step, timed in as many processes at once as the job has workers (the
    # cells' load): speeds compare as ratios measured within one job (compare.py).
    context = provenance() | reference.for_job(study, backend, workers) | dict(jobs=workers)
    summary.reference = context.get("reference_images_per_second")
    bar = WorkBar(todo, study.name, disable=not progress)
    # Two phases: the cells that choose their LR, then those that reuse another seed's choice (lr_from_seed), so
    # every reuse reads a finished record and the result never depends on which worker ran first.
    with PeakMemory() as memory, _backend(backend, jobs, threads, scheduler or run.scheduler):
        for i, phase in enumerate(p for p in lr_phases(todo) if p):
            records = read_records(records_dir) if i else records
            args = (study.name, str(records_dir), threads, context)
            if packs(study):
                tasks = (delayed(run_pack)([(c, chosen_lr(c, records)) for c in g], *args, run.pack_size)
                         for g in pack_groups(phase, run.pack_size))
            else:
                tasks = (delayed(run_group)([(c, chosen_lr(c, records)) for c in g], *args)
                         for g in feature_groups(phase))
            for results in Parallel(n_jobs=workers,
                                    return_as="generator_unordered")(tasks):
                summary.ran += results
                bar.done([r["cell_id"] for r in results])
                for r in results:
                    if r["status"] == "failed":
                        bar.write(f"cell {r['cell_id']} failed: {r['error']}")
    bar.close()
    summary.peak_pss_bytes = memory.peak
    summary.wall_seconds = time.perf_counter() - t0
    return summary


@contextmanager
def results_lock(out: Path):
    """One writer per results folder: a second runner is refused (not queued, not interleaved)."""
    import fcntl

    check_results_folder(results_subfolder(out))
    # O_NOFOLLOW: a `.lock` planted as a symbolic link is refused (ELOOP), not truncated through; a hard link (a
    # second name of a file elsewhere) is refused by its link count before anything is written to it.
    try:
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise ConfigError("--results", f"{out / '.lock'} is a symbolic link", LINK_FIX) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise ConfigError("--results", f"{out / '.lock'} is " + ("a hard link to another file" if stat.S_ISREG(
            st.st_mode) else "not a regular file"), "remove it (transferbench makes its own lock file), then rerun")
    with open(fd, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise ConfigError("--results", f"another transferbench run holds {out} (pid {holder})",
                              "wait for it to finish, or write to another --results folder") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def dask_address(scheduler: str | None) -> str:
    """The scheduler to use: --scheduler / run.scheduler, else $TRANSFERBENCH_DASK_SCHEDULER."""
    address = scheduler or os.environ.get("TRANSFERBENCH_DASK_SCHEDULER")
    if not address:
        raise ConfigError("run.scheduler", "backend 'dask' needs a scheduler address",
                          "pass --scheduler tcp://HOST:8786 or set TRANSFERBENCH_DASK_SCHEDULER")
    return address


@contextmanager
def _backend(backend: str, jobs: int, threads: int, scheduler: str | None):
    if backend == "dask":
        try:
            from dask.distributed import Client
        except ImportError:
            raise ConfigError("run.backend", "dask is not installed", "pip install 'transferbench[dask]'") from None
        with Client(dask_address(scheduler)), parallel_config(backend="dask"):  # joblib's dask backend uses this client
            yield
    elif backend == "sequential":
        with parallel_config(backend="sequential"):
            yield
    else:
        with parallel_config(backend="loky", inner_max_num_threads=threads):
            yield


def timing_table(summary: RunSummary) -> str:
    by_arm: dict[str, list] = {}
    for r in summary.ran:
        by_arm.setdefault(r["arm"], []).append(r)
    cache = Counter(r.get("cache") for r in summary.ran)
    lines = [f"wall time: {summary.wall_seconds:.1f} s for {len(summary.ran)} cells "
             f"({summary.skipped} already done, {summary.failed} failed)"
             + (f", after {summary.pretrain_seconds:.1f} s of source pretraining" if summary.pretrain_seconds else ""),
             f"peak memory (PSS), runner + workers: {summary.peak_pss_bytes / 2**30:.2f} GiB",
             f"{'arm':<10}{'cells':>7}{'cell-seconds':>14}{'prefix-s':>10}{'images/s':>10}"]
    for arm, rs in sorted(by_arm.items()):
        secs = sum(r.get("cell_seconds") or 0 for r in rs)
        train = sum(r.get("train_seconds") or 0 for r in rs)
        seen = sum(r.get("images_seen") or 0 for r in rs)
        lines.append(f"{arm:<10}{len(rs):>7}{secs:>14.1f}{sum(r.get('prefix_seconds') or 0 for r in rs):>10.1f}"
                     f"{seen / max(train, 1e-9):>10.0f}")
    lines.append("feature cache: " + ", ".join(f"{k or 'none (pixels)'}={v}" for k, v in sorted(cache.items(),
                                                                                                key=str)))
    if summary.reference:
        lines.append(f"reference: a bare PyTorch step of lite0 at 32 px, in one process per worker at once: "
                     f"{summary.reference:.0f} images/s (the gate's speed check divides each cell's images/s by it)")
    return "\n".join(lines)
