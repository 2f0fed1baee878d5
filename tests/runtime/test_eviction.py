"""The eviction choice as a pure function: least recently used first, never pinned or in-use adapters."""

from __future__ import annotations

from edge_runtime.runtime.eviction import EvictionCandidate, choose_evictions

MB = 1 << 20


def resident(name: str, last_use: int, *, size: int = 10 * MB, pinned: bool = False,
             in_use: bool = False) -> EvictionCandidate:
    return EvictionCandidate(name=name, resident_bytes=size, last_use=last_use, pinned=pinned, in_use=in_use)


def test_nothing_is_evicted_when_the_adapter_fits_already() -> None:
    plan = choose_evictions([resident("a", 1)], need_bytes=10 * MB, free_bytes=10 * MB)
    assert plan.victims == () and plan.fits and plan.evictable_bytes == 10 * MB


def test_least_recently_used_go_first_and_only_as_many_as_needed() -> None:
    adapters = [resident("recent", 9), resident("oldest", 1), resident("middle", 5)]
    plan = choose_evictions(adapters, need_bytes=15 * MB, free_bytes=0)
    assert plan.victims == ("oldest", "middle") and plan.fits


def test_pinned_and_in_use_adapters_are_never_chosen() -> None:
    adapters = [resident("pinned", 1, pinned=True), resident("busy", 2, in_use=True), resident("idle", 3)]
    plan = choose_evictions(adapters, need_bytes=10 * MB, free_bytes=0)
    assert plan.victims == ("idle",) and plan.evictable_bytes == 10 * MB


def test_when_room_cannot_be_made_nothing_is_evicted() -> None:
    adapters = [resident("busy", 1, in_use=True), resident("idle", 2)]
    plan = choose_evictions(adapters, need_bytes=25 * MB, free_bytes=5 * MB)
    assert plan.victims == () and not plan.fits and plan.evictable_bytes == 10 * MB


def test_memory_still_being_freed_counts_as_negative_room() -> None:
    plan = choose_evictions([resident("a", 1), resident("b", 2)], need_bytes=10 * MB, free_bytes=-5 * MB)
    assert plan.victims == ("a", "b") and plan.fits


def test_a_larger_adapter_may_need_several_small_ones_evicted() -> None:
    smalls = [resident(f"s{i}", i, size=3 * MB) for i in range(5)]
    plan = choose_evictions(smalls, need_bytes=10 * MB, free_bytes=1 * MB)
    assert plan.victims == ("s0", "s1", "s2") and plan.fits
