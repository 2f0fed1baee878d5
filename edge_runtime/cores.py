"""The CPU cores llama.cpp decodes on: CPU-bound work running beside a decode is counted here, and the engine
decodes with the cores that work leaves free.

llama.cpp's CPU backend decodes each token with a team of threads that meet at a barrier after every graph node.
When one more busy thread than there are cores is runnable, the team's threads are preempted in turn and every
barrier waits for a time slice: measured on a 2-core machine (SmolLM2, 2 decode threads), one megabyte prompt being
tokenized beside the decode slowed it from ~130 to ~30 tok/s. Decoding on the one core left free keeps ~80 tok/s
(one thread has no barrier to wait at) while the tokenization runs at full speed on the other.

Tokenizing request text, parsing request bodies, converting JSON schemas to grammars and hashing files enter
``busy()``; the engine's ``DecodeCores.fit`` reads the count before each decode step.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


class BusyThreads:
    """How many threads run CPU-bound work beside the decode now. The process has one (``BUSY``): its CPUs are
    shared by all of its threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Count the calling thread while the block runs."""
        with self._lock:
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1

    @property
    def count(self) -> int:
        """Threads inside ``busy()`` now."""
        return self._count


BUSY = BusyThreads()


def busy() -> AbstractContextManager[None]:
    """Count the calling thread as running CPU-bound work beside the decode while the block runs (``BUSY``)."""
    return BUSY.busy()


def counted(function: Callable[..., T], *args: object) -> T:
    """``function(*args)``, counted as CPU-bound work beside the decode (for an executor to run)."""
    with BUSY.busy():
        return function(*args)


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask (``taskset``, a cpuset) and a cgroup v2 CPU quota (a container
    started with ``--cpus``), whichever is smaller."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 (or not Linux): the affinity mask alone
        pass
    return cpus


def decode_threads(configured: int, cpus: int, busy: int) -> int:
    """Threads for the next decode step: ``configured``, or fewer so that they and ``busy`` other busy threads fit
    on ``cpus`` cores; at least one."""
    return max(1, min(configured, cpus - busy))


class DecodeCores:
    """The thread count of a context's decode steps, changed through ``apply(threads)`` when ``fit`` finds that busy
    threads beside it now leave more or fewer cores."""

    def __init__(self, configured: int, apply: Callable[[int], object], *, busy: BusyThreads = BUSY,
                 cpus: int | None = None) -> None:
        self.configured = configured  # threads the profile asks for
        self.current = configured  # threads llama.cpp decodes with now
        self._apply = apply
        self._busy = busy
        self._cpus = cpus or usable_cpus()

    def fit(self) -> None:
        """Call before each decode step (a changed count costs a call into llama.cpp, an unchanged one nothing)."""
        wanted = decode_threads(self.configured, self._cpus, self._busy.count)
        if wanted != self.current:
            self._apply(wanted)
            self.current = wanted
