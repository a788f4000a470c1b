"""The results history: records read back, a base pooled from recorded commits, accepted changes, change points on
synthetic histories with a known step, and the commands through the CLI."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from transferbench.analysis import history
from transferbench.analysis.compare import compare_runs, read_runs
from transferbench.cli import main
from transferbench.core.errors import ConfigError

SMOKE = Path(__file__).parents[1] / "results" / "baselines" / "smoke"
HOST = dict(cpu="test cpu", cores=2, python="3.11", packages={"torch": "2.14.1"})


def commit(i: int) -> str:
    return f"{i:040x}"


def put(h: Path, i: int, folder: Path = SMOKE, host: dict = HOST) -> Path:
    return history.record(folder, h, commit(i), f"2026-01-{i + 1:02d}T00:00:00+00:00", host)


def degraded(tmp_path: Path, drop: float, name: str = "new") -> Path:
    out = tmp_path / name
    shutil.copytree(SMOKE, out)
    runs = pd.read_csv(out / "runs.csv", dtype={"error": object})
    runs["test_acc"] = runs["test_acc"] - drop * (runs["arm"] == "transfer")
    runs.to_csv(out / "runs.csv", index=False)
    return out


def test_a_record_reads_back_as_the_run_it_came_from(tmp_path):
    path = put(tmp_path, 1)
    assert path == tmp_path / "smoke" / history.host_class(HOST) / f"{commit(1)}.json"
    body = json.loads(path.read_text())
    assert body["commit"] == commit(1) and body["host"]["cpu"] == "test cpu" and body["gains"]
    runs, back = read_runs(SMOKE), history.read_history(tmp_path, "smoke")
    assert len(back) == len(runs) and set(back["cell_id"]) == set(runs["cell_id"])
    assert np.allclose(back.sort_values("cell_id")["test_acc"], runs.sort_values("cell_id")["test_acc"])


def test_the_base_pools_the_last_commits_one_value_per_seed(tmp_path):
    """Commits ran the same seeds: each seed is one value of the base (its mean over the commits), never k values,
    which would shrink the base's error as if the commits had drawn new subsets."""
    for i in range(4):
        put(tmp_path, i)
    base, chosen = history.base_runs(tmp_path, "smoke", history.host_class(HOST), exclude=commit(3), k=2)
    assert chosen == [commit(1), commit(2)]
    assert base["seed"].nunique() == 2 * read_runs(SMOKE)["seed"].nunique()  # cells pair within their commit
    pooled = compare_runs(base, read_runs(SMOKE), "history")
    assert pooled.ok
    alone = compare_runs(read_runs(SMOKE), read_runs(SMOKE), "folder")
    assert (pooled.tests["seeds_base"] == read_runs(SMOKE)["seed"].nunique()).all()
    assert pooled.tests.set_index(["kind", "measure", "what"])["p"].equals(
        alone.tests.set_index(["kind", "measure", "what"])["p"])  # two identical commits weigh as one
    assert not compare_runs(base, read_runs(degraded(tmp_path, 0.3)), "history").ok


def test_an_accepted_change_restarts_the_base(tmp_path):
    for i in range(4):
        put(tmp_path, i)
    with pytest.raises(Exception, match="matches 4 recorded commits"):
        history.accept(tmp_path, "smoke", "0000", "new LR grid")
    history.accept(tmp_path, "smoke", commit(2), "new LR grid")
    _, chosen = history.base_runs(tmp_path, "smoke", history.host_class(HOST), exclude=None, k=5)
    assert chosen == [commit(2), commit(3)]
    with pytest.raises(Exception, match="--reason"):
        history.accept(tmp_path, "smoke", commit(2), " ")


def test_another_host_class_is_never_pooled(tmp_path):
    put(tmp_path, 1, host=HOST | {"cpu": "another cpu"})
    with pytest.raises(Exception, match="no recorded run"):
        history.base_runs(tmp_path, "smoke", history.host_class(HOST), exclude=None)


def synthetic(n_commits=30, targets=4, seeds=3, sd=0.02, step=0.0, at=15, seed=0) -> pd.DataFrame:
    """Per-seed gains along commits: noise of sd 2 pp (about a smoke point's seed spread), a step in the first
    target from commit `at` on."""
    r = np.random.default_rng(seed)
    rows = [dict(what=f"gain t{t}", order=o, seed=s, value=0.2 + r.normal(0, sd) + (step if t == 0 and o >= at else 0))
            for o in range(n_commits) for t in range(targets) for s in range(seeds)]
    return pd.DataFrame(rows)


def test_a_planted_step_is_found_where_it_was_planted():
    found = history.change_points(synthetic(step=-0.03, at=15))
    changes = found[found["change"]]
    assert list(zip(changes["what"], changes["order"])) == [("gain t0", 15)]
    assert changes["step"].iloc[0] == pytest.approx(-0.03, abs=0.01)
    assert not found[(found["order"] < 15) & found["change"]].any(axis=None)


@pytest.mark.parametrize("seed", range(5))
def test_thirty_commits_without_a_change_raise_no_alarm(seed):
    assert not history.change_points(synthetic(seed=seed))["change"].any()


def test_a_step_within_the_margin_is_not_a_change_point():
    assert not history.change_points(synthetic(step=-0.01, sd=0.002))["change"].any()


def test_record_compare_and_trend_through_the_cli(tmp_path, capsys, monkeypatch):
    results, h = tmp_path / "results", tmp_path / "results" / "history"
    shutil.copytree(SMOKE, results / "smoke")
    monkeypatch.setattr(history, "git_commit", lambda cwd=Path("."): (commit(99), "2026-02-01T00:00:00+00:00"))
    for i in range(3):
        assert main(["record", "smoke", "--results", str(results), "--history", str(h), "--commit", commit(i)]) == 0
    assert main(["compare", str(results / "smoke"), "--history", str(h), "--format", "md"]) == 0
    assert "## transferbench gate: PASS" in capsys.readouterr().out
    lonely = tmp_path / "results" / "lonely"  # a history holding only the commit under test
    assert main(["record", "smoke", "--results", str(results), "--history", str(lonely), "--commit", commit(99)]) == 0
    assert main(["compare", str(results / "smoke"), "--history", str(lonely)]) == 2
    assert "no recorded run" in capsys.readouterr().err
    assert main(["compare", str(results / "smoke"), "--history", str(lonely), "--fallback", str(SMOKE)]) == 0
    assert "comparing with" in capsys.readouterr().err
    worse = degraded(tmp_path, 0.3)
    assert main(["compare", str(worse), "--history", str(h)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    for i in range(3, 6):  # three more commits, after a real drop of the transfer arm
        shutil.copy(worse / "runs.csv", results / "smoke" / "runs.csv")
        assert main(["record", "smoke", "--results", str(results), "--history", str(h), "--commit", commit(i)]) == 0
    capsys.readouterr()
    assert main(["trend", "smoke", "--history", str(h), "--results", str(results), "--window", "2"]) == 0
    printed = capsys.readouterr().out
    assert "change point: gain" in printed and commit(3)[:8] in printed
    assert (results / "trend" / "smoke" / "trend.png").is_file()
    points = pd.read_csv(results / "trend" / "smoke" / "change_points.csv", dtype={"commit": str})
    assert set(points.loc[points["change"], "commit"]) == {commit(3)}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_the_base_can_be_limited_to_a_merge_base_and_its_ancestors(tmp_path, monkeypatch):
    """main: a - b - c; a pull request branches at b. With --base-commit b the base pools a and b, never c (a later
    commit of main the branch does not contain); an unknown ref is refused in one line."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    shas = []
    for name in "abc":
        git(repo, "commit", "-q", "--allow-empty", "-m", name)
        shas.append(git(repo, "rev-parse", "HEAD"))
    h = tmp_path / "history"
    for i, sha in enumerate(shas):
        history.record(SMOKE, h, sha, f"2026-01-0{i + 1}T00:00:00+00:00", HOST)
    assert history.ancestors(shas[1], shas, cwd=repo) == {shas[0], shas[1]}
    host = history.host_class(HOST)
    monkeypatch.chdir(repo)
    _, chosen = history.base_runs(h, "smoke", host, None, k=5, up_to=shas[1])
    assert chosen == shas[:2]
    with pytest.raises(ConfigError, match="not a commit of this checkout"):
        history.ancestors("no-such-branch", shas, cwd=repo)
    with pytest.raises(ConfigError, match="not a commit name"):
        history.ancestors("--all", shas, cwd=repo)


def test_base_commit_through_the_cli(tmp_path, capsys, monkeypatch):
    results, h = tmp_path / "results", tmp_path / "history"
    shutil.copytree(SMOKE, results / "smoke")
    monkeypatch.setattr(history, "git_commit", lambda cwd=Path("."): (commit(99), "2026-02-01T00:00:00+00:00"))
    monkeypatch.setattr(history, "ancestors", lambda ref, commits, cwd=Path("."): {commit(0)})
    for i in range(3):
        assert main(["record", "smoke", "--results", str(results), "--history", str(h), "--commit", commit(i)]) == 0
    capsys.readouterr()
    assert main(["compare", str(results / "smoke"), "--history", str(h), "--base-commit", "main"]) == 0
    assert f"1 commit(s) up to {commit(0)[:8]}" in capsys.readouterr().out
    assert main(["compare", str(SMOKE), str(results / "smoke"), "--base-commit", "main"]) == 2
    assert "--base-commit" in capsys.readouterr().err


def test_the_copyable_workflow_runs_only_commands_that_exist():
    """docs/ci/github-actions.yml parses, has a pull-request gate, a main-branch record and a scheduled job, and every
    command it runs is a Makefile target or a transferbench command line the CLI accepts."""
    import re
    import shlex

    import yaml

    from transferbench.cli import _parser

    root = Path(__file__).parents[1]
    flow = yaml.safe_load((root / "docs" / "ci" / "github-actions.yml").read_text())
    triggers = flow[True] if True in flow else flow["on"]  # YAML 1.1 reads the key `on` as True
    assert {"pull_request", "push", "schedule"} <= set(triggers)
    targets = set(re.findall(r"^([a-z][a-z-]*):", (root / "Makefile").read_text(), re.M))
    commands = [line.split(" | ")[0].strip() for job in flow["jobs"].values() for step in job["steps"]
                if "run" in step for line in step["run"].splitlines() if line.strip()]
    cli = [c for c in commands if c.startswith(".venv/bin/transferbench ")]
    assert any("--history" in c for c in cli) and any(" record " in f" {c} " for c in cli)
    for c in commands:
        words = shlex.split(c)
        if words[0] == "make":
            assert words[1] in targets, c
        elif words[0] == ".venv/bin/transferbench":
            _parser().parse_args(words[1:])  # exits (fails the test) on an unknown command or flag
        else:
            assert words[0] in (".venv/bin/pip", "exit"), c


def damage(path: Path, edit) -> None:
    body = json.loads(path.read_text())
    path.write_text(json.dumps(edit(body)))


def _runs_edit(edit):
    def go(body):
        runs = pd.DataFrame(body["runs"])
        body["runs"] = json.loads(edit(runs).to_json(orient="records"))
        return body
    return go


DAMAGED = {
    "not an object": lambda b: [1, 2],
    "a key missing": lambda b: {k: v for k, v in b.items() if k != "host_class"},
    "a date that is a number": lambda b: b | {"committed_at": 5},
    "no runs": lambda b: b | {"runs": None},
    "a cell twice": _runs_edit(lambda r: pd.concat([r, r.iloc[:1]])),
    "a seed that is text": _runs_edit(lambda r: r.assign(seed="s" + r["seed"].astype(str))),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_history_is_refused_in_one_line(tmp_path, capsys, monkeypatch, case):
    results = tmp_path / "results"
    shutil.copytree(SMOKE, results / "smoke")
    monkeypatch.setattr(history, "git_commit", lambda cwd=Path("."): (commit(99), "2026-02-01T00:00:00+00:00"))
    paths = [put(tmp_path / "h", i) for i in range(2)]
    damage(paths[0], DAMAGED[case])
    assert main(["compare", str(results / "smoke"), "--history", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err
    assert "--history" in err and len(err.strip().splitlines()) == 1, err


def test_text_accuracies_in_a_record_are_untestable_not_a_crash(tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    shutil.copytree(SMOKE, results / "smoke")
    monkeypatch.setattr(history, "git_commit", lambda cwd=Path("."): (commit(99), "2026-02-01T00:00:00+00:00"))
    h = tmp_path / "h"
    assert main(["record", "smoke", "--results", str(results), "--history", str(h), "--commit", commit(0)]) == 0
    some_text = _runs_edit(lambda r: r.assign(test_acc=r["test_acc"].astype(object).where(r.index >= 3, "high")))
    damage(next(h.glob("smoke/*/*.json")), some_text)
    assert main(["compare", str(results / "smoke"), "--history", str(h)]) == 1
    assert "UNTESTABLE" in capsys.readouterr().out


def test_damaged_marks_and_odd_refs_are_refused(tmp_path, capsys, monkeypatch):
    results, h = tmp_path / "results", tmp_path / "h"
    shutil.copytree(SMOKE, results / "smoke")
    monkeypatch.setattr(history, "git_commit", lambda cwd=Path("."): (commit(99), "2026-02-01T00:00:00+00:00"))
    put(h, 0)
    assert main(["history", "accept", "", "--study", "smoke", "--reason", "x", "--history", str(h)]) == 2
    assert "not a commit hash" in capsys.readouterr().err
    (h / "smoke" / "accepted.json").write_text('{"commit": 1}')
    assert main(["compare", str(results / "smoke"), "--history", str(h)]) == 2
    assert "accepted changes" in capsys.readouterr().err
    (h / "smoke" / "accepted.json").unlink()
    assert main(["compare", str(results / "smoke"), "--history", str(h), "--base-commit", ""]) == 2
    assert "not a commit name" in capsys.readouterr().err
    assert main(["compare", str(SMOKE), str(results / "smoke"), "--base-commit", ""]) == 2
    assert main(["compare", str(results / "smoke"), "--history", str(SMOKE / "runs.csv")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_outside_a_checkout_the_history_compare_refuses_instead_of_falling_back(tmp_path, capsys, monkeypatch):
    results, h = tmp_path / "results", tmp_path / "h"
    shutil.copytree(SMOKE, results / "smoke")
    put(h, 0)

    def no_checkout(cwd=Path(".")):
        raise ConfigError("--commit", "this folder is not a git checkout", "run inside the repository")

    monkeypatch.setattr(history, "git_commit", no_checkout)
    assert main(["compare", str(results / "smoke"), "--history", str(h), "--fallback", str(SMOKE)]) == 2
    err = capsys.readouterr().err
    assert "--history" in err and "not a git checkout" in err
