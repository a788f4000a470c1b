"""`transferbench compare BASE NEW`: what moved between two result sets, and whether it regressed.

A grid point regresses when its new gain falls below the base gain's CI low end minus a tolerance
(noise inside the seeds' spread is not a regression); cells regress when they go missing or fail;
the harness regresses when its median images/s falls below a fraction of the base's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import ConfigError

POINT = ["backbone", "weights", "target", "frozen_depth", "n_per_class", "schedule"]


@dataclass
class Comparison:
    moved: pd.DataFrame
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _read(folder: Path, name: str) -> pd.DataFrame:
    path = folder / name
    if not path.exists():
        raise ConfigError("compare", f"{path} does not exist", "give result folders written by `transferbench study`")
    try:
        df = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as e:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise ConfigError("compare", f"{path} is not a readable table ({type(e).__name__})",
                          "rebuild it with `transferbench report STUDY`") from None
    if df.empty:
        raise ConfigError("compare", f"{path} has no rows", "compare folders of studies that ran cells")
    if "frozen_depth" in df:
        df["frozen_depth"] = df["frozen_depth"].astype(str)
    return df


def compare(base: Path, new: Path, tolerance: float = 0.02, speed_fraction: float = 0.5) -> Comparison:
    b_runs, n_runs = _read(base, "runs.csv"), _read(new, "runs.csv")
    b_gain, n_gain = _read(base, "gains.csv"), _read(new, "gains.csv")
    problems = []
    missing = sorted(set(b_runs["cell_id"]) - set(n_runs["cell_id"]))
    if missing:
        problems.append(f"{len(missing)} cell(s) of the base are missing from the new results (e.g. {missing[:3]})")
    failed = n_runs[n_runs["status"] != "ok"]
    if len(failed):
        problems.append(f"{len(failed)} cell(s) failed in the new results (e.g. {failed['error'].iloc[0]})")
    m = b_gain.merge(n_gain, on=POINT, suffixes=("_base", "_new"))
    m["delta_gain"] = m["gain_new"] - m["gain_base"]
    m["delta_transfer"] = m["transfer_mean_new"] - m["transfer_mean_base"]
    m["regressed"] = m["gain_new"] < m["ci_low_base"].fillna(m["gain_base"]) - tolerance
    worse = m[m["regressed"]]
    if len(worse):
        problems.append(f"{len(worse)} grid point(s) lost gain beyond the base CI - {tolerance:.3f}")
    b_speed, n_speed = b_runs["images_per_second"].median(), n_runs["images_per_second"].median()
    if pd.notna(b_speed) and pd.notna(n_speed) and n_speed < speed_fraction * b_speed:
        problems.append(f"harness slower: median {n_speed:.0f} images/s vs {b_speed:.0f} in the base "
                        f"(below {speed_fraction:.0%})")
    moved = m[(m["delta_gain"].abs() > 1e-9) | m["regressed"]][
        POINT + ["gain_base", "ci_low_base", "ci_high_base", "gain_new", "delta_gain", "delta_transfer", "regressed"]]
    return Comparison(moved.sort_values("delta_gain").reset_index(drop=True), problems)


def render(c: Comparison, base: Path, new: Path) -> str:
    lines = [f"compare {base} -> {new}: {len(c.moved)} grid point(s) moved"]
    if len(c.moved):
        shown = c.moved.assign(**{k: (100 * c.moved[k]).round(1) for k in
                                  ("gain_base", "ci_low_base", "ci_high_base", "gain_new", "delta_gain", "delta_transfer")})
        lines.append(shown.head(20).to_string(index=False))
        lines.append("(gains in percentage points)")
    lines += [f"REGRESSION: {p}" for p in c.problems] or ["no regression"]
    return "\n".join(lines)
