"""Named registries (timm-style): adding a dataset, shift, schedule or weight source = one decorated function."""

from collections.abc import Callable

from transferbench.core.errors import ConfigError, did_you_mean


class Registry:
    """name -> function, with metadata beside each entry (timm's registry: what an entry is, next to it)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}
        self._meta: dict[str, dict] = {}

    def register(self, name: str | None = None, **meta):
        def add(fn: Callable) -> Callable:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} '{key}' registered twice")
            self._entries[key], self._meta[key] = fn, meta
            return fn

        return add

    def meta(self, name: str) -> dict:
        return self._meta[name]

    def items(self) -> list[tuple[str, Callable]]:
        """(name, function) in registration order."""
        return list(self._entries.items())

    def get(self, name: str, field: str | None = None) -> Callable:
        if name not in self._entries:
            raise ConfigError(field or self.kind, f"unknown {self.kind} '{name}'", did_you_mean(name, self._entries))
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
