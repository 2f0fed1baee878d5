"""The CPU cores llama.cpp decodes on: CPU-bound work running beside a decode is counted here, and the engine
decodes with the cores that work leaves free.

llama.cpp's CPU backend decodes each token with a team of threads that meet at a barrier after every graph node.
When one more busy thread than there are cores is runnable, the team's threads are preempted in turn and every
barrier waits for a time slice: measured on a 2-core machine (SmolLM2, 2 decode threads), one megabyte prompt being
tokenized beside the decode slowed it from ~130 to ~30 tok/s. Decoding on the one core left free keeps ~80 tok/s
(one thread has no barrier to wait at) while the tokenization runs at full speed on the other.

Tokenizing request text, parsing large request bodies and hashing downloads enter ``busy()``; the engine reads
``decode_threads`` before each step.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_busy = 0


@contextmanager
def busy() -> Iterator[None]:
    """Count the calling thread as running CPU-bound work beside the decode while the block runs."""
    global _busy
    with _lock:
        _busy += 1
    try:
        yield
    finally:
        with _lock:
            _busy -= 1


def busy_threads() -> int:
    """Threads inside ``busy()`` now."""
    return _busy


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, as ``taskset`` or a cpuset sets it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def decode_threads(configured: int, cpus: int) -> int:
    """Threads for the next decode step: ``configured``, or fewer so that they and the busy threads fit on ``cpus``
    cores; at least one."""
    return max(1, min(configured, cpus - _busy))


class DecodeCores:
    """The thread count of a context's decode steps, changed through ``apply(threads)`` when ``fit`` finds that busy
    threads beside it now leave more or fewer cores."""

    def __init__(self, configured: int, apply: Callable[[int], None]) -> None:
        self.configured = configured
        self.current = configured
        self._apply = apply
        self._cpus = usable_cpus()

    def fit(self) -> None:
        """Call before each decode step (a changed count costs a call into llama.cpp, an unchanged one nothing)."""
        wanted = decode_threads(self.configured, self._cpus)
        if wanted != self.current:
            self._apply(wanted)
            self.current = wanted
