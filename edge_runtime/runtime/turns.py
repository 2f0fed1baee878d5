"""Whose turn it is: which adapter set the engine's next decode step serves when running sequences need several.

One step applies one adapter set (llama.cpp computes a batch under the set applied to the context), so sequences
are grouped by the set their next work runs under. A turn serves one set for consecutive steps, up to the engine's
``turn_s`` seconds: changing the applied set makes llama.cpp reserve its compute graphs again on the next decode
(``sched_reserve``: ~12 ms for SmolLM2 on the 2-core test machine, most of a 17 ms decode step), so switching at
every step would spend two fifths of the time on switches. The rule when a turn ends: the set served least
recently goes next (a set never served counts as the least recent); ties go to the set whose oldest sequence
arrived first. With K sets present, every running sequence is served at least once every K turns, so it waits at
most (K - 1) turns, whatever the arrival order, the slot numbers or how busy another set is: K is at most the
number of sequences the engine runs at once.

A pure function over keys and numbers, tested without llama.cpp.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TypeVar

__all__ = ["next_turn"]

K = TypeVar("K", bound=Hashable)


def next_turn(waiting: Mapping[K, int], last_served: Mapping[K, int], *, current: K | None = None) -> K | None:
    """The set to serve next among ``waiting`` (set → arrival number of its oldest sequence), given the turn number
    each set was last served at (``last_served``; absent: never); None when nothing waits. ``current``: a set whose
    turn goes on (it still has time left), served again while it has work."""
    if current is not None and current in waiting:
        return current
    if not waiting:
        return None
    return min(waiting, key=lambda key: (last_served.get(key, -1), waiting[key]))
