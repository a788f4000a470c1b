"""Cache of frozen-prefix outputs: computed once per (weights, depth, target condition, size,
preprocessing) and shared by every cell that differs only in size, schedule or seed.

In memory within a worker (LRU, bounded in bytes) and on disk across processes (safetensors,
bounded in bytes, oldest evicted). The key is a SHA-256 of everything the features depend on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .paths import cache_dir

FORMAT = 1  # bump when what the prefix computes changes


def feature_key(**parts) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str).encode()).hexdigest()


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class FeatureCache:
    def __init__(self, directory: Path | None = None, memory_bytes: int = 1 << 30, disk_bytes: int = 4 << 30):
        self.dir = directory
        self.memory_bytes, self.disk_bytes = memory_bytes, disk_bytes
        self._mem: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.hits = {"memory": 0, "disk": 0, "miss": 0}

    @classmethod
    def default(cls) -> "FeatureCache":
        env = os.environ.get
        return cls(cache_dir("features"), int(env("TRANSFERBENCH_CACHE_MEMORY", 256 << 20)),
                   int(env("TRANSFERBENCH_CACHE_DISK", 4 << 30)))

    def get(self, key: str, compute, disk: bool = True) -> tuple[dict[str, torch.Tensor], str]:
        """(features, where they came from: memory, disk or miss)."""
        if key in self._mem:
            self._mem.move_to_end(key)
            return self._remember("memory", key, self._mem[key])
        path = self.dir / f"{key}.safetensors" if self.dir and disk else None
        if path and path.exists():
            try:
                feats = load_file(str(path))
                os.utime(path)  # recently used: evicted last
                return self._remember("disk", key, feats)
            except Exception:
                path.unlink(missing_ok=True)  # unreadable (e.g. truncated): recompute
        feats = {k: v.contiguous() for k, v in compute().items()}
        if path:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            save_file(feats, str(tmp))
            os.replace(tmp, path)  # atomic: a reader never sees half a file
            self._evict_disk()
        return self._remember("miss", key, feats)

    def _remember(self, where: str, key: str, feats: dict[str, torch.Tensor]):
        self.hits[where] += 1
        self._mem[key] = feats
        while len(self._mem) > 1 and sum(map(_nbytes, self._mem.values())) > self.memory_bytes:
            self._mem.popitem(last=False)
        return feats, where

    def _evict_disk(self) -> None:
        files = sorted(self.dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for p in files[:-1]:
            if total <= self.disk_bytes:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)


def prefix_key(model_name: str, backbone, depth: int, target_name: str, image_size: int) -> str:
    """The key of a frozen prefix's output: everything it depends on, and nothing else."""
    return feature_key(model=model_name, weights=backbone.weights_id, depth=depth, target=target_name,
                       image_size=image_size, mean=backbone.data_config["mean"], std=backbone.data_config["std"])
