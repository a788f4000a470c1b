"""One JSON record per cell, written atomically; records -> tidy tables (runs.csv, curves.csv)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from .errors import ConfigError

RUN_COLUMNS = ["study", "cell_id", "arm", "backbone", "weights", "target", "dataset", "shift", "severity",
               "frozen_depth", "frozen_groups", "n_groups", "frozen_fraction", "n_per_class", "n_train", "schedule",
               "lr", "epochs", "seed", "val_acc", "test_acc", "test_loss", "train_seconds", "images_per_second",
               "status", "error"]


def write_record(directory: Path, record: dict) -> Path:
    """Write-then-rename: a reader (or a kill -9) never sees half a record."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{record['cell_id']}.json"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_records(directory: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(directory.glob("*.json")) if directory.exists() else []:
        try:
            record = json.loads(path.read_text())
            out[record["cell_id"]] = record
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"record {path}", f"corrupted record file ({type(e).__name__})",
                              "delete that file; its cell will be trained again on the next run") from None
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
    return pd.DataFrame(rows, columns=["cell_id", "epoch", "split", "metric", "value", "images_seen"])
