"""Where files live: derived, rebuildable files (embedded datasets, feature cache) under the cache, never in
results/; and the rule for the results folder: transferbench writes only into folders it created, never through a
symbolic link planted there (a linked `records/` or `.lock` would send records, figures or a pid outside it)."""

import os
import stat
from pathlib import Path

from transferbench.core.errors import ConfigError

LINK_FIX = "remove the link (transferbench writes only into real folders inside the results folder), then rerun"


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("TRANSFERBENCH_CACHE", Path.home() / ".cache" / "transferbench"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_writable(folder: Path, field: str, fix: str) -> None:
    """Refuse, before anything is written, a folder (or its nearest existing parent) that is read-only or is not a
    folder. Mode bits are checked too: root may write anywhere, and a read-only folder is a user's intent."""
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise ConfigError(field, f"{probe} is a file, not a folder", "move that file away, or give another folder")
    if not os.access(probe, os.W_OK) or not probe.stat().st_mode & stat.S_IWUSR:
        raise ConfigError(field, f"{probe} is read-only", fix)


def check_results_folder(folder: Path) -> None:
    """Refuse a results folder that is, or holds anywhere, a symbolic link or anything but files and folders (a
    FIFO named timing.txt would block `report` forever); the entry is named in the error."""
    if folder.is_symlink():
        raise ConfigError("--results", f"{folder} is a symbolic link", LINK_FIX)
    for root, dirs, files in os.walk(folder):  # followlinks=False: a linked folder is listed, never entered
        for name in sorted(dirs + files):
            mode = os.lstat(os.path.join(root, name)).st_mode
            if stat.S_ISLNK(mode):
                raise ConfigError("--results", f"{os.path.join(root, name)} is a symbolic link", LINK_FIX)
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ConfigError("--results", f"{os.path.join(root, name)} is not a regular file or folder (a FIFO, "
                                  "socket or device)", "remove it, then rerun")


def results_subfolder(path: Path) -> Path:
    """`path` made (with its parents) as a real folder: refused if it is a link (one planted while a run goes on)."""
    path.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        raise ConfigError("--results", f"{path} is a symbolic link", LINK_FIX)
    return path
