"""Results across commits: a history of recorded runs, the gate's base drawn from it, and change points along it.

    results folder --record--> HISTORY/<study>/<host class>/<commit>.json (seed-level runs, gains, speed, host)
    HISTORY --base_runs--> the last k commits on this host class since the last accepted change, seed by seed
    HISTORY --change_points--> steps in a per-commit series, found by a windowed Welch test larger than the margin

One file per (study, host class, commit), written atomically; a second record of the same commit on the same host
class replaces the first. The host class is the CPU model and core count: float results of training differ between
CPU models (and are reproducible on one), so a base pools only runs of the same class. Dependency versions are kept
per record, so a trend can mark where they changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from transferbench.analysis.compare import checked_runs, read_gains, read_runs
from transferbench.analysis.gains import bh_q
from transferbench.core.atomic import write_text
from transferbench.core.errors import ConfigError
from transferbench.core.host import cpu_model
from transferbench.core.study import IDENTIFIER

FORMAT = 1  # bump when a record's layout changes: older records are then refused by name
PACKAGES = ("torch", "torchvision", "timm", "numpy", "scipy", "pandas")
ACCEPTED = "accepted.json"
SHA = re.compile(r"[0-9a-f]{7,40}")


def host_fingerprint() -> dict:
    """What a record's numbers depend on besides the code: the CPU (its class) and the dependency versions."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return dict(cpu=cpu_model(), cores=os.cpu_count(), python=platform.python_version(), packages=versions)


def host_class(fingerprint: dict) -> str:
    """A short name for hosts whose float results agree: the CPU model and the core count."""
    digest = hashlib.sha256(f"{fingerprint['cpu']}|{fingerprint['cores']}".encode()).hexdigest()[:10]
    return f"{fingerprint['cores']}core-{digest}"


def git_commit(cwd: Path = Path(".")) -> tuple[str, str]:
    """(sha, committer date in ISO 8601) of HEAD; refused outside a git checkout."""
    try:
        out = subprocess.run(["git", "show", "-s", "--format=%H %cI", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        raise ConfigError("--commit", "this folder is not a git checkout (or git is missing)",
                          "run inside the repository, or give --commit SHA") from None
    return out[0], out[1]


def ancestors(ref: str, commits: list[str], cwd: Path = Path(".")) -> set[str]:
    """Those of `commits` that are `ref` or its ancestors in this checkout (a pull request's merge-base with its
    target, say); a commit this checkout does not know is none."""
    if ref.startswith("-") or not ref.strip():  # never read as an option of git
        raise ConfigError("--base-commit", f"{ref!r} is not a commit name", "give a branch, tag or commit hash")
    try:
        sha = subprocess.run(["git", "rev-parse", "--verify", "-q", f"{ref}^{{commit}}"], cwd=cwd, capture_output=True,
                             text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        raise ConfigError("--base-commit", f"{ref!r} is not a commit of this checkout", "fetch it first (e.g. git "
                          "fetch origin main), or give a commit hash") from None
    return {c for c in commits if subprocess.run(["git", "merge-base", "--is-ancestor", c, sha], cwd=cwd,
                                                 capture_output=True, timeout=30).returncode == 0}


def commit_date(commit: str) -> str | None:
    """The committer date of a commit of this checkout, or None (not a checkout, or an unknown commit)."""
    try:
        out = subprocess.run(["git", "show", "-s", "--format=%cI", commit, "--"], capture_output=True, text=True,
                             check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def _study_dir(history: Path, study: str) -> Path:
    if not IDENTIFIER.fullmatch(study):
        raise ConfigError("study", f"{study!r} is not a study name", "use the study's plain name, e.g. smoke")
    return history / study


def record(folder: Path, history: Path, commit: str | None = None, committed_at: str | None = None,
           fingerprint: dict | None = None) -> Path:
    """Append a results folder's run to the history: its seed-level cells (runs.csv, as the gate reads it), gains with
    verdicts, the study configuration's digest, the commit and the host. Returns the record's path."""
    runs = read_runs(folder)  # the gate's own checks: a table it would refuse is never recorded
    config = folder / "study.resolved.yaml"
    if not config.is_file():
        raise ConfigError("STUDY", f"{folder} has no study.resolved.yaml", "record a folder written by "
                          "`transferbench study`")
    study = study_name(config)
    if commit is None:
        commit, committed_at = git_commit()
    elif committed_at is None:
        committed_at = commit_date(commit)
    if not SHA.fullmatch(commit):
        raise ConfigError("--commit", f"{commit!r} is not a commit hash", "give the hex sha, e.g. `git rev-parse HEAD`")
    fingerprint = fingerprint or host_fingerprint()
    gains = read_gains(folder)
    body = dict(format=FORMAT, study=study, commit=commit, committed_at=committed_at or _now(), recorded_at=_now(),
                host=fingerprint, host_class=host_class(fingerprint),
                config_sha256=hashlib.sha256(config.read_bytes()).hexdigest(),
                runs=runs.astype(object).where(runs.notna(), None).to_dict("records"),
                gains=None if gains is None else gains.astype(object).where(gains.notna(), None).to_dict("records"))
    path = _study_dir(history, study) / body["host_class"] / f"{commit}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(body, default=str) + "\n")
    return path


def study_name(config: Path) -> str:
    from transferbench.core.study import safe_yaml

    raw = safe_yaml(config.read_text(errors="replace"), str(config))
    name = raw.get("name") if isinstance(raw, dict) else None
    if not isinstance(name, str):
        raise ConfigError("STUDY", f"{config} names no study", "rerun the study to rewrite it")
    return name


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")  # records made within a second keep their order


def _records(history: Path, study: str, host: str | None) -> list[dict]:
    """Every record of the study (on one host class, or all), each file read once, in commit order (committer
    date, then record time)."""
    found = []
    for path in sorted(_study_dir(history, study).glob("*/*.json")):
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ConfigError("--history", f"{path} is not a readable record", "remove it, or record again") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ConfigError("--history", f"{path} is record format "
                              f"{body.get('format') if isinstance(body, dict) else None}, this version reads "
                              f"{FORMAT}", "record that commit again")
        problem = _shape_problem(body)
        if problem:
            raise ConfigError("--history", f"{path} is not a readable record ({problem})", "remove it, or record "
                              "that commit again")
        if host is None or body["host_class"] == host:
            found.append(body | dict(path=path))
    return sorted(found, key=lambda b: (b["committed_at"], b["recorded_at"]))


# What a record must hold, and of which type, before anything reads it.
SHAPE = {"study": str, "commit": str, "committed_at": str, "recorded_at": str, "host_class": str, "host": dict,
         "runs": list}


def _shape_problem(body: dict) -> str:
    for key, kind in SHAPE.items():
        if not isinstance(body.get(key), kind):
            return f"'{key}' is missing or not a {kind.__name__}"
    if not SHA.fullmatch(body["commit"]):
        return "'commit' is not a commit hash"
    if not isinstance(body["host"].get("packages"), dict):
        return "'host.packages' is missing"
    return ""


def _entry(body: dict) -> dict:
    return dict(commit=body["commit"], committed_at=body["committed_at"], recorded_at=body["recorded_at"],
                host_class=body["host_class"], packages=json.dumps(body["host"]["packages"], sort_keys=True),
                path=body["path"])


def entries(history: Path, study: str, host: str | None = None) -> pd.DataFrame:
    """One row per record of the study (on one host class, or all): commit, dates, host class, dependency versions,
    path, in commit order."""
    return pd.DataFrame([_entry(b) for b in _records(history, study, host)],
                        columns=["commit", "committed_at", "recorded_at", "host_class", "packages", "path"])


def read_history(history: Path, study: str, host: str | None = None) -> pd.DataFrame:
    """The tidy table: every recorded cell with its commit, commit order (0, 1, ...) and host class."""
    return _cells(_records(history, study, host))


def _cells(records: list[dict]) -> pd.DataFrame:
    """Every record's runs, each checked as the gate checks a folder's runs.csv."""
    fix = "remove that record, or record the commit again"
    frames = [checked_runs(pd.DataFrame(b["runs"]), str(b["path"]), fix, require_valid=False, field="--history").assign(
        commit=e["commit"], order=order, host_class=e["host_class"], packages=e["packages"])
              for order, (b, e) in enumerate((b, _entry(b)) for b in records)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _marks(history: Path, study: str) -> list[dict]:
    """The accepted changes, oldest first."""
    path = _study_dir(history, study) / ACCEPTED
    if not path.is_file():
        return []
    try:
        marks = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marks = None
    if not isinstance(marks, list) or not all(isinstance(m, dict) and isinstance(m.get("commit"), str)
                                              for m in marks):
        raise ConfigError("--history", f"{path} is not a readable list of accepted changes", "remove it, then accept "
                          "the change again (transferbench history accept)")
    return marks


def accept(history: Path, study: str, commit: str, reason: str) -> Path:
    """Mark an intended change at `commit`: later bases pool only commits from it on (what `make baseline` does by
    hand for a committed baseline)."""
    if not reason.strip():
        raise ConfigError("--reason", "an accepted change needs a reason", "say why, e.g. --reason 'new LR grid'")
    if not re.fullmatch(r"[0-9a-f]{4,40}", commit):
        raise ConfigError("COMMIT", f"{commit!r} is not a commit hash or a prefix of one (4 or more hex digits)",
                          "give the commit's hash, e.g. `git rev-parse --short HEAD`")
    known = entries(history, study)
    match = known[known["commit"].str.startswith(commit)]
    if match.empty:
        raise ConfigError("COMMIT", f"{commit!r} has no record of {study} in {history}",
                          "record it first: transferbench record STUDY")
    if match["commit"].nunique() > 1:
        raise ConfigError("COMMIT", f"{commit!r} matches {match['commit'].nunique()} recorded commits",
                          "give more of the hash")
    marks = _marks(history, study) + [dict(commit=match["commit"].iloc[0], reason=reason.strip(), at=_now())]
    path = _study_dir(history, study) / ACCEPTED
    write_text(path, json.dumps(marks, indent=1) + "\n")
    return path


class NoBase(ConfigError):
    """The history holds no commit to compare with (where a fallback folder may stand in; no other refusal)."""


def base_runs(history: Path, study: str, host: str, exclude: str | None, k: int = 5,
              up_to: str | None = None) -> tuple[pd.DataFrame, list]:
    """The gate's base from the history: the cells of the last k recorded commits on this host class (not
    `exclude`, the commit under test; where `up_to` names one, only it and its ancestors: a merge-base), from the
    last accepted change on. Each commit's cells pair within the commit (seed "<commit>/<seed>"), and the tests take
    one value per `draw` (the seed number), averaged over commits: the commits ran the same seeds, so the same k-shot
    subsets and initialisations (on one host, identical numbers where nothing changed), and counting them as more
    seeds would shrink the base's error k-fold. Returns (runs, commits)."""
    records = _records(history, study, host)
    order = [b["commit"] for b in records]
    among = None if up_to is None else ancestors(up_to, order)
    start = max((order.index(m["commit"]) for m in _marks(history, study) if m["commit"] in order), default=0)
    chosen = [c for c in order[start:] if c != exclude and (among is None or c in among)][-k:]
    if not chosen:
        raise NoBase("--history", f"no recorded run of {study} on host class {host} to compare with",
                          "record a run of the base commit on this kind of host first (transferbench record)")
    runs = _cells([b for b in records if b["commit"] in chosen])
    runs = runs.assign(draw=runs["seed"], seed=runs["commit"] + "/" + runs["seed"].astype(str),
                       cell_id=runs["commit"] + "/" + runs["cell_id"].astype(str))
    return runs.drop(columns=["commit", "order", "host_class", "packages"]).reset_index(drop=True), chosen


def last_gains(history: Path, study: str, host: str, commit: str) -> pd.DataFrame | None:
    """The gains table recorded with `commit` on this host class (for verdict flips), or None."""
    path = _study_dir(history, study) / host / f"{commit}.json"
    try:
        gains = json.loads(path.read_text(encoding="utf-8"))["gains"]
    except (OSError, ValueError, KeyError):
        return None
    return None if gains is None else pd.DataFrame(gains)


def change_points(series: pd.DataFrame, window: int = 5, margin: float = 0.02, fdr: float = 0.05) -> pd.DataFrame:
    """Steps along commits in per-seed values. `series` has columns what (a series' name), order (the commit's
    position) and value (one per seed and commit). For every position k with `window` commits on each side, a
    two-sided Welch test of the window after k against the window before; a step is flagged where the difference
    exceeds `margin` in size and survives Benjamini-Hochberg across all positions of all series, and within a run
    of adjacent flagged positions only the one with the largest |t| is the change point (the windows straddling a
    step flag its neighbours too). Returns every position tested, with `change` marking the change points."""
    rows = []
    for what, g in series.groupby("what", sort=True):
        orders = sorted(g["order"].unique())
        by = {o: g.loc[g["order"] == o, "value"].to_numpy(float) for o in orders}
        for i in range(window, len(orders) - window + 1):
            before = np.concatenate([by[o] for o in orders[i - window:i]])
            after = np.concatenate([by[o] for o in orders[i:i + window]])
            t, p = stats.ttest_ind(after, before, equal_var=False)
            rows.append(dict(what=what, order=orders[i], step=after.mean() - before.mean(), t=float(t),
                             p=float(p) if np.isfinite(p) else 1.0))
    table = pd.DataFrame(rows, columns=["what", "order", "step", "t", "p"])
    table["q"] = bh_q(table["p"]) if len(table) else []
    table["flagged"] = (table["q"] <= fdr) & (table["step"].abs() > margin)
    table["change"] = False
    for _, g in table.groupby("what"):
        run: list[int] = []
        for idx in list(g.index) + [None]:
            if idx is not None and table.at[idx, "flagged"] and (not run or table.at[run[-1], "order"] + 1 ==
                                                                 table.at[idx, "order"]):
                run.append(idx)
                continue
            if run:
                table.loc[max(run, key=lambda j: abs(table.at[j, "t"])), "change"] = True
            run = [idx] if idx is not None and table.at[idx, "flagged"] else []
    return table


def series(runs: pd.DataFrame) -> pd.DataFrame:
    """Per commit (order) and seed, the values a trend follows: the gain per target (mean over the target's grid
    points at each arm's configuration chosen on validation) and each network arm's test accuracy; with `what`
    naming the series, ready for `change_points`."""
    from transferbench.analysis.gains import ok_runs, paired

    out = []
    for order, g in runs.groupby("order", sort=True):
        gain = paired(g).groupby(["target", "seed"])["gain"].mean().reset_index()
        gain = gain.assign(what="gain " + gain["target"].astype(str), order=order)
        out.append(gain.rename(columns={"gain": "value"}))
        arms = ok_runs(g)
        arms = arms[arms["arm"].isin(["transfer", "scratch"])].groupby(["arm", "seed"])["test_acc"].mean()
        arms = arms.reset_index()
        out.append(arms.assign(what=arms["arm"] + " accuracy", order=order).rename(columns={"test_acc": "value"}))
    return pd.concat(out, ignore_index=True)[["what", "order", "seed", "value"]] if out else \
        pd.DataFrame(columns=["what", "order", "seed", "value"])


def speeds(runs: pd.DataFrame) -> pd.DataFrame:
    """Per commit and network arm: the median images/s."""
    g = runs[runs["arm"].isin(["transfer", "scratch"])]
    return g.groupby(["order", "arm"])["images_per_second"].median().reset_index()
