"""The one write-then-rename helper, for every file transferbench writes (records, tables, figures, reports, caches):
a full disk, a kill or a power cut mid-write leaves the old file (or none), never half of one. The temporary file
is flushed to disk (fsync) before the rename and the folder after it, so a rename that survives a crash names
complete content.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"  # a file being written; never read, removed as an orphan at the start of the next run


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yields a fresh temporary path beside `path`, with the same extension (writers that pick the format from it,
    like matplotlib, still work). On a clean exit it is synced and renamed onto `path`; on any exception it is
    removed and the exception propagates, so `path` keeps its previous content (or stays absent)."""
    path = Path(path)
    # Not mkstemp: that creates the file 0600 and the rename would keep it; the writer creates it under the umask.
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # some filesystems cannot sync a folder; the file itself is synced
        _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> Path:
    """`path.write_text(text)` (UTF-8), atomically."""
    with replacing(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def write_bytes(path: Path, data: bytes) -> Path:
    with replacing(path) as tmp, open(tmp, "xb") as f:
        f.write(data)
    return Path(path)
