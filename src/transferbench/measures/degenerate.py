"""Undefined measures: a stated reason instead of an exception deep in linear algebra, or a silent NaN."""

from __future__ import annotations

import math
from collections.abc import Callable


class Degenerate(ValueError):
    """The measure is undefined for this input; the message says why."""


def require(condition: bool, reason: str) -> None:
    if not condition:
        raise Degenerate(reason)


def safely(fn: Callable[..., float], *args, **kwargs) -> tuple[float, str | None]:
    """(value, None), or (nan, the reason) where the measure is undefined or came out non-finite."""
    try:
        value = float(fn(*args, **kwargs))
    except Degenerate as e:
        return math.nan, str(e)
    return (value, None) if math.isfinite(value) else (math.nan, "not finite")
