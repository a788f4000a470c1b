"""The host a run's numbers came from: its CPU model, as /proc/cpuinfo names it. CPUs of two vendors give different
float results for the same training (determinism holds per host), so records and the history carry it."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """'AMD EPYC 9B14', 'Intel(R) Xeon(R) CPU @ 2.20GHz', ...; the platform's processor name where /proc lacks one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
