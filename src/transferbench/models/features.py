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

from transferbench.core.atomic import replacing
from transferbench.core.paths import cache_dir

FORMAT = 2  # bump when what the prefix computes changes (2: targets keyed by content digest)


def feature_key(**parts) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes): cached features, a model's loaded weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class FeatureCache:
    def __init__(self, directory: Path | None = None, memory_bytes: int = 1 << 30, disk_bytes: int = 4 << 30):
        self.dir = directory
        self.memory_bytes, self.disk_bytes = memory_bytes, disk_bytes
        self._mem: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.hits = {"memory": 0, "disk": 0, "miss": 0}

    @classmethod
    def default(cls) -> FeatureCache:
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
            feats = _read_checked(path)
            if feats is not None:
                os.utime(path)  # recently used: evicted last
                return self._remember("disk", key, feats)
        feats = {k: v.contiguous() for k, v in compute().items()}
        if path:
            with replacing(path) as tmp:  # a reader never sees half a file
                save_file(feats, str(tmp), metadata={"sha256": tensor_digest(feats)})
            self._evict_disk()
        return self._remember("miss", key, feats)

    def _remember(self, where: str, key: str, feats: dict[str, torch.Tensor]):
        self.hits[where] += 1
        self._mem[key] = feats
        while len(self._mem) > 1 and sum(map(_nbytes, self._mem.values())) > self.memory_bytes:
            self._mem.popitem(last=False)
        return feats, where

    def _evict_disk(self) -> None:
        assert self.dir is not None  # called after a write to the disk cache only
        files = sorted(self.dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for p in files[:-1]:
            if total <= self.disk_bytes:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)


def _read_checked(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached features if they match the digest stored with them; a damaged file is removed (and recomputed)."""
    import sys

    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            stored = (f.metadata() or {}).get("sha256")
        feats = load_file(str(path))
        problem = None if stored and tensor_digest(feats) == stored else "content does not match its digest"
    except Exception as e:  # safetensors raises its own error types (SafetensorError, ...) for a bad file
        feats, problem = None, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    if problem:
        print(f"warning: feature cache {path} is damaged ({problem}); recomputing it", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None
    return feats


def prefix_key(model_name: str, backbone, depth: int, target_key: str, image_size: int) -> str:
    """The key of a frozen prefix's output: everything it depends on (the target by its content digest, not its
    name), and nothing else."""
    return feature_key(model=model_name, weights=backbone.weights_id, depth=depth, target=target_key,
                       image_size=image_size, mean=backbone.data_config["mean"], std=backbone.data_config["std"])
