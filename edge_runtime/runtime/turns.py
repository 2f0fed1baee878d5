"""Whose turn it is: which adapter set the engine's next decode step serves when running sequences need several.

One step applies one adapter set (llama.cpp computes a batch under the set applied to the context), so sequences
are grouped by the set their next work runs under. The rule: the set served least recently goes next (a set never
served counts as the least recent); ties go to the set whose oldest sequence arrived first. With K sets present,
every running sequence is served at least once every K steps, whatever the arrival order, the slot numbers or how
busy another set is: K is at most the number of sequences the engine runs at once.

A pure function over keys and numbers, tested without llama.cpp.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TypeVar

__all__ = ["next_turn"]

K = TypeVar("K", bound=Hashable)


def next_turn(waiting: Mapping[K, int], last_served: Mapping[K, int]) -> K | None:
    """The set to serve next among ``waiting`` (set → arrival number of its oldest sequence), given the step number
    each set was last served at (``last_served``; absent: never); None when nothing waits."""
    if not waiting:
        return None
    return min(waiting, key=lambda key: (last_served.get(key, -1), waiting[key]))
