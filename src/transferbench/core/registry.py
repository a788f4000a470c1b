"""Named registries (timm-style): adding a dataset, shift, schedule or weight source = one decorated function."""

import re
from collections.abc import Callable

from transferbench.core.errors import ConfigError, did_you_mean

SENTENCE_END = re.compile(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)\.(?=\s+[A-Z(]|\s*$)")


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

    def summary(self, name: str) -> str:
        """The first sentence of the entry's docstring (a figure's caption; what `transferbench list` prints beside a
        name): up to the first full stop before a capital, an opening parenthesis or the end, not the one of 'et al.'
        or 'e.g.'."""
        doc = " ".join((self._entries[name].__doc__ or "").split())
        end = SENTENCE_END.search(doc)
        return doc[:end.end()] if end else (doc.rstrip(".") + "." if doc else "")

    def describe(self, names: list[str] | None = None) -> str:
        """One line per entry (registration order): its name, its metadata (functions left out), its summary."""
        names = list(self) if names is None else names
        width = max(map(len, names), default=0)
        lines = []
        for name in names:
            meta = ", ".join(f"{k}={v}" for k, v in self._meta[name].items() if not callable(v) and v is not None)
            lines.append(f"{name:<{width}}  {self.summary(name)}" + (f" [{meta}]" if meta else ""))
        return "\n".join(lines)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> Callable:
        return self.get(name)

    def __iter__(self):
        """Names in registration order."""
        return iter(list(self._entries))
