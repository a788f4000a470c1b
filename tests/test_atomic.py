"""Outputs are written under a temporary name and renamed: a failed write (full disk) leaves no half file."""

import errno
import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from transferbench.core import atomic
from transferbench.report import plots  # noqa: E402


def disk_full_after(n_ok: int):
    """A Figure.savefig that writes `n_ok` files, then writes a few bytes of the next one and fails like a full disk."""
    calls = []

    def savefig(self, fname, *args, **kwargs):
        calls.append(Path(fname))
        Path(fname).write_bytes(b"\x89PNG\r\n" if len(calls) <= n_ok else b"<svg")
        if len(calls) > n_ok:
            raise OSError(errno.ENOSPC, "No space left on device")

    return savefig, calls


def test_figure_write_failing_midway_leaves_no_file(tmp_path, monkeypatch):
    savefig, calls = disk_full_after(0)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    fig = plt.figure()
    with pytest.raises(OSError) as err:
        plots.save(fig, tmp_path / "figures", "gain_heatmap")
    assert err.value.errno == errno.ENOSPC
    assert calls and all(p.parent == tmp_path / "figures" for p in calls)  # the temporary file was beside the target
    assert list((tmp_path / "figures").iterdir()) == []  # neither the final name nor the temporary one
    assert not plt.fignum_exists(fig.number)  # the figure is closed on failure too


def test_figure_write_failing_on_svg_keeps_the_previous_svg(tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "gain_heatmap.svg").write_text("<svg>previous run</svg>")
    savefig, _ = disk_full_after(1)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    with pytest.raises(OSError):
        plots.save(plt.figure(), figures, "gain_heatmap")
    assert sorted(p.name for p in figures.iterdir()) == ["gain_heatmap.png", "gain_heatmap.svg"]
    assert (figures / "gain_heatmap.svg").read_text() == "<svg>previous run</svg>"


def test_figures_are_written_in_their_own_format(tmp_path):
    fig = plt.figure(figsize=(1, 1))
    png, svg = plots.save(fig, tmp_path, "f")
    assert png.read_bytes().startswith(b"\x89PNG") and b"<svg" in svg.read_bytes()[:400]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "f.svg"]


def test_write_text_failing_keeps_the_previous_file(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("previous")
    with pytest.raises(UnicodeEncodeError):
        atomic.write_text(path, "new text, then a lone surrogate that UTF-8 cannot encode: \ud800")
    assert path.read_text() == "previous"
    assert list(tmp_path.iterdir()) == [path]


def test_write_text_replaces_and_follows_the_umask(tmp_path):
    path = tmp_path / "findings.txt"
    path.write_text("old")
    atomic.write_text(path, "ünïcode\n")
    assert path.read_text(encoding="utf-8") == "ünïcode\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert list(tmp_path.iterdir()) == [path]
