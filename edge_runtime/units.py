"""How edge-rt shows quantities to people: durations and sizes, one way everywhere (CLI, status page)."""

from __future__ import annotations

__all__ = ["duration", "mib"]

MIB = 1 << 20


def duration(seconds: float) -> str:
    """``seconds`` as a person reads it: "42 s", "12 min", "3.5 h" (negative values show as 0 s)."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def mib(size_bytes: float) -> str:
    """``size_bytes`` in MiB with one decimal: "12.3 MiB"."""
    return f"{size_bytes / MIB:.1f} MiB"
