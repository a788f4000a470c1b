"""One JSON record per cell, written atomically; records -> tidy tables (runs.csv, curves.csv).

On disk a record is {study, cell_id, cell, result, provenance, checksum}: `cell` is the cell's config exactly as
hashed into its id, `result` what training measured (metrics, convergence check, curves, status), `provenance`
where and with what it ran (resolved device, versions, host, git commit and a hash of uncommitted changes,
threads, times). Readers get one flat dict per record (`flat`), the shape the tables are built from; flat records
read the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from transferbench.core.atomic import TMP_PREFIX, write_text
from transferbench.core.errors import ConfigError
from transferbench.core.paths import results_subfolder
from transferbench.core.study import Cell

RUN_COLUMNS = ["study", "cell_id", "arm", "backbone", "weights", "target", "dataset", "shift", "severity",
               "frozen_depth", "frozen_groups", "n_groups", "frozen_fraction", "n_per_class", "n_train", "schedule",
               "lr", "epochs", "seed", "val_acc", "test_acc", "test_loss", "train_seconds", "images_per_second",
               "status", "error"]


def _checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


PROVENANCE = ("device_used", "transferbench_version", "torch_version", "timm_version", "python_version", "git_commit",
              "git_dirty", "host", "jobs", "threads", "worker_pid", "started", "ended")
TOP = ("study", "cell_id")


def nest(record: dict) -> dict:
    """A flat record (as a worker assembles it) in its stored shape: {study, cell_id, cell, result, provenance}."""
    cell = {k: record[k] for k in Cell.model_fields if k in record}
    provenance = {k: record[k] for k in PROVENANCE if k in record}
    result = {k: v for k, v in record.items() if k not in cell and k not in provenance and k not in TOP + ("checksum",)}
    return {k: record[k] for k in TOP} | dict(cell=cell, result=result, provenance=provenance)


def flat(record: dict) -> dict:
    """One flat dict of a stored record (nested or flat)."""
    if "cell" not in record:
        return record
    parts = [record["cell"], record["result"], record["provenance"]]
    assert not set.intersection(*map(set, parts)), "a record repeats a key across cell, result and provenance"
    return {k: record[k] for k in TOP + ("checksum",) if k in record} | parts[0] | parts[1] | parts[2]


def write_record(directory: Path, record: dict) -> Path:
    """Write-then-rename (synced): a reader (or a kill -9) never sees half a record, and a failed write (a full
    disk) leaves no temporary file behind. The record carries a checksum of its own content."""
    results_subfolder(directory)
    record = json.loads(json.dumps(nest(record), default=str))  # exactly what is stored is what is checksummed
    record["checksum"] = _checksum(record)
    return write_text(directory / f"{record['cell_id']}.json", json.dumps(record, indent=1))


def remove_orphans(directory: Path) -> int:
    """Temporary files (records, tables, figures) left by a kill or a full disk mid-write, in `directory` and its
    subfolders; call while holding the results lock."""
    orphans = list(directory.rglob(TMP_PREFIX + "*")) if directory.exists() else []
    for p in orphans:
        p.unlink(missing_ok=True)
    return len(orphans)


def check_record(record: dict) -> str | None:
    """Why a record cannot be trusted, or None: its content must match its checksum and its config its cell_id."""
    config = record["cell"] if "cell" in record else {k: record[k] for k in Cell.model_fields if k in record}
    try:
        cell = Cell.model_validate(config)
    except ValueError:
        return "its config is not a valid cell"
    if cell.cell_id != record.get("cell_id"):
        return f"its config hashes to {cell.cell_id}, not to its cell_id {record.get('cell_id')}"
    if "checksum" not in record:
        return "it has no checksum (written by an older transferbench, whose cells no longer match this protocol)"
    if record["checksum"] != _checksum(record):
        return "content does not match its checksum (edited or damaged)"
    return None


def record_paths(directory: Path) -> list[Path]:
    """The record files of a records folder, in name order (a write in flight, named TMP_PREFIX..., is none)."""
    return [p for p in sorted(directory.glob("*.json")) if not p.name.startswith(TMP_PREFIX)] \
        if directory.exists() else []


def read_records(directory: Path) -> dict[str, dict]:
    out = {}
    for path in record_paths(directory):
        if not path.is_file():  # a folder (or FIFO) named like a record: never read, never trained over
            raise ConfigError(f"record {path}", "not a regular file", "move it away; its cell will be trained again "
                              "on the next run")
        try:
            record = json.loads(path.read_text())
            problem = check_record(record) if isinstance(record, dict) else "not a JSON object"
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problem = f"not readable JSON ({type(e).__name__})"
        if problem is None and path.stem != record["cell_id"]:
            problem = f"its file name does not match its cell_id {record['cell_id']}"
        if problem:
            fix = (f"delete {directory}; its cells will be trained again on the next run" if "older" in problem
                   else "delete that file; its cell will be trained again on the next run")
            raise ConfigError(f"record {path}", f"corrupted record file: {problem}", fix)
        out[record["cell_id"]] = flat(record)
    return out


def runs_table(records: list[dict]) -> pd.DataFrame:
    rows = [{k: v for k, v in r.items() if k != "curves"} | {"backbone": r.get("model")} for r in records]
    df = pd.DataFrame(rows)
    extra = [c for c in df.columns if c not in RUN_COLUMNS and c != "model"]
    return df.reindex(columns=RUN_COLUMNS + sorted(extra)).sort_values(
        ["backbone", "target", "arm", "frozen_groups", "n_per_class", "schedule", "seed"], na_position="first",
        ignore_index=True)


def curves_table(records: list[dict]) -> pd.DataFrame:
    rows = [{"cell_id": r["cell_id"], **point} for r in records for point in r.get("curves") or []]
    return pd.DataFrame(rows, columns=["cell_id", "epoch", "step", "split", "metric", "value", "images_seen"])


DOMAIN_COLUMNS = ["backbone", "weights", "target", "fd", "mmd", "pad", "logme"]


def read_domains(out: Path) -> pd.DataFrame | None:
    """domains.csv, or None where it is missing or damaged (then it is rebuilt, never used half-written)."""
    path = out / "domains.csv"
    try:
        complete = path.read_bytes().endswith(b"\n")  # a cut-off file ends mid-line
        df = pd.read_csv(path)
    except (OSError, ValueError):  # missing, empty, unparsable
        return None
    if not complete or not set(DOMAIN_COLUMNS) <= set(df.columns) or df[DOMAIN_COLUMNS[:4]].isna().any().any():
        return None
    return df
