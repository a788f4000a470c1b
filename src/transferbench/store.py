"""One JSON record per cell, written atomically; records -> tidy tables (runs.csv, curves.csv)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from .errors import ConfigError
from .study import Cell

TMP_PREFIX = ".tmp-"  # a record being written; never read, removed at the start of the next run

RUN_COLUMNS = ["study", "cell_id", "arm", "backbone", "weights", "target", "dataset", "shift", "severity",
               "frozen_depth", "frozen_groups", "n_groups", "frozen_fraction", "n_per_class", "n_train", "schedule",
               "lr", "epochs", "seed", "val_acc", "test_acc", "test_loss", "train_seconds", "images_per_second",
               "status", "error"]


def _checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def write_record(directory: Path, record: dict) -> Path:
    """Write-then-rename: a reader (or a kill -9) never sees half a record. A failed write (a full
    disk) leaves no temporary file behind. The record carries a checksum of its own content."""
    directory.mkdir(parents=True, exist_ok=True)
    record = json.loads(json.dumps(record, default=str))  # exactly what is stored is what is checksummed
    record["checksum"] = _checksum(record)
    path = directory / f"{record['cell_id']}.json"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_orphans(directory: Path) -> int:
    """Temporary files (records, tables, figures) left by a kill or a full disk mid-write, in `directory` and its
    subfolders; call while holding the results lock."""
    orphans = list(directory.rglob(TMP_PREFIX + "*")) if directory.exists() else []
    for p in orphans:
        p.unlink(missing_ok=True)
    return len(orphans)


def check_record(record: dict) -> str | None:
    """Why a record cannot be trusted, or None: its content must match its checksum and its config its cell_id."""
    config = {k: record[k] for k in Cell.model_fields if k in record}
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


def read_records(directory: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(directory.glob("*.json")) if directory.exists() else []:
        if path.name.startswith(TMP_PREFIX):
            continue
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
        out[record["cell_id"]] = record
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
