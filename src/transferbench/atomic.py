"""Write-then-rename for output files: a full disk or a crash mid-write leaves the old file (or none), not half of one.

No fsync: these are rebuildable outputs (reports, figures, tables); the rename is what keeps a reader from
seeing a truncated file. Records, which are not rebuildable, are written by `store.write_record` (with fsync).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yields a fresh temporary path beside `path`, with the same extension (writers that pick the format from it,
    like matplotlib, still work). On a clean exit it is renamed onto `path`; on any exception it is removed and the
    exception propagates, so `path` keeps its previous content (or stays absent)."""
    path = Path(path)
    # Not mkstemp: that creates the file 0600 and the rename would keep it; the writer creates it under the umask.
    tmp = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(path: Path, text: str) -> Path:
    """`path.write_text(text)` (UTF-8), atomically."""
    with replacing(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
        f.write(text)
    return Path(path)
