"""The eviction choice: which resident adapters make room for another, as a pure function of what is resident."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["EvictionCandidate", "EvictionPlan", "choose_evictions"]


@dataclass(frozen=True)
class EvictionCandidate:
    """One resident adapter as the eviction choice sees it."""

    name: str
    resident_bytes: int
    last_use: int  # a monotonic use counter: larger is more recent (wall clocks jump on devices)
    pinned: bool = False
    in_use: bool = False

    @property
    def evictable(self) -> bool:
        """Neither pinned nor used by a running generation."""
        return not (self.pinned or self.in_use)


@dataclass(frozen=True)
class EvictionPlan:
    """The adapters to evict (least recently used first), and whether that makes room at all."""

    victims: tuple[str, ...]
    fits: bool
    evictable_bytes: int  # everything that could have been evicted


def choose_evictions(resident: Sequence[EvictionCandidate], *, need_bytes: int, free_bytes: int) -> EvictionPlan:
    """Evict least recently used evictable adapters until ``need_bytes`` fit in ``free_bytes`` plus what they free.

    When even evicting every evictable adapter leaves too little room, nothing is evicted (``fits`` is False).
    ``free_bytes`` may be negative (memory still held by adapters being freed).
    """
    candidates = sorted((c for c in resident if c.evictable), key=lambda c: c.last_use)
    evictable = sum(c.resident_bytes for c in candidates)
    if free_bytes + evictable < need_bytes:
        return EvictionPlan(victims=(), fits=False, evictable_bytes=evictable)
    victims = []
    for candidate in candidates:
        if free_bytes >= need_bytes:
            break
        free_bytes += candidate.resident_bytes
        victims.append(candidate.name)
    return EvictionPlan(victims=tuple(victims), fits=True, evictable_bytes=evictable)
