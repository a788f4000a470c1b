"""Where derived, rebuildable files live (embedded datasets, feature cache): never in results/."""

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("TRANSFERBENCH_CACHE", Path.home() / ".cache" / "transferbench"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
