"""How many of the engine's threads run the next decode step: all of them while the device has cores to spare,
fewer while other processes keep them waiting for a CPU.

llama.cpp's threads meet at a barrier after every graph node, hundreds of times per token, so one thread
descheduled by a busy neighbour (a flight stack, a perception loop) stalls the others: on a 2-core device beside
one CPU-bound process, 2 threads decode at about a quarter of their idle speed and 1 thread at about 80% of its own
(``scripts/bench_busy.py``). The governor reads, every ``window_s`` of decoding, how long the engine's threads
waited for a CPU (``/proc/self/task/*/schedstat``) and how much CPU the device left idle (``/proc/stat``); it
sheds one thread when they waited more than ``shed_above`` of the time they wanted a CPU, and takes one back when
the device left at least ``restore_idle_cores`` of a core idle (not sooner than ``hold_s`` after a shed), or to
try, ``probe_s`` after a shed: a neighbour at nice 19 soaks up the idle CPU without making the engine's threads
wait, so only a try shows the cores are there. A try that makes the threads wait is shed again at the next window
and the next try waits twice as long (at most ``probe_max_s``).

Shedding must never change an answer, so the engine enables the governor only where llama.cpp's kernels give the
same bits at every thread count (``thread_invariant``): each output element of a matrix product, a norm or a
softmax is computed whole by one thread, whatever the split. The one operation that merges per-thread partial
results is flash attention's split-KV decode (ggml-cpu ``ops.cpp``, ``use_split_kv_path``: one query row over an
f16 or f32 KV cache of 512 cells or more, split into one chunk per thread); a quantised KV cache never takes it.
``tests/runtime/test_threads.py`` compares tokens and log-probabilities bit for bit across thread counts and
across a governor that changes the count at every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edge_runtime.cores import ThreadTimes, idle_cpu_seconds, thread_times

__all__ = ["Reading", "ThreadGovernor", "thread_invariant", "threads_text"]

INVARIANT_KV_TYPES = ("q8_0", "q4_0")  # flash attention's split-KV decode takes only f16/f32 caches


def thread_invariant(kv_type: str) -> bool:
    """Whether llama.cpp's CPU results are the same at every thread count for a context with this KV cache type."""
    return kv_type in INVARIANT_KV_TYPES


@dataclass(frozen=True)
class Reading:
    """What the governor decides from: the engine's threads' CPU times, the device's idle CPU seconds, the time."""

    times: ThreadTimes
    idle_s: float | None
    when: float


def read_now(threads: Callable[[], Iterable[int]]) -> Reading:
    """A reading of ``threads`` (native ids) and of the device, now."""
    return Reading(times=thread_times(threads()), idle_s=idle_cpu_seconds(), when=time.monotonic())


class ThreadGovernor:
    """Decides the thread count of each decode step, between 1 and ``limit``; call ``next_step`` before each one
    (on the thread that decodes). Disabled, it always answers ``limit``."""

    def __init__(
        self,
        limit: int,
        *,
        enabled: bool,
        read: Callable[[], Reading],
        window_s: float = 0.25,
        shed_above: float = 0.2,
        restore_idle_cores: float = 0.6,
        hold_s: float = 0.25,
        probe_s: float = 2.0,
        probe_max_s: float = 32.0,
    ) -> None:
        self.limit = max(1, limit)
        self.enabled = enabled and self.limit > 1
        self.current = self.limit
        self.changes = 0  # times the count changed (a shed or a restore)
        self.shed_steps = 0  # decode steps run with fewer than ``limit`` threads
        self._read = read
        self.window_s, self.shed_above = window_s, shed_above
        self.restore_idle_cores, self.hold_s = restore_idle_cores, hold_s
        self.probe_first_s, self.probe_max_s = probe_s, probe_max_s
        self._probe_after = probe_s  # since the last shed: take a thread back to try, even without idle CPU
        self._probing = False
        self._start: Reading | None = None  # the window's first reading
        self._last_shed = float("-inf")

    def next_step(self) -> int:
        """The thread count for the decode step about to run."""
        if not self.enabled:
            return self.current
        reading = None
        if self._start is None:  # the first step of a generation: its window starts now
            self._start = self._read()
        elif time.monotonic() - self._start.when >= self.window_s:  # however long one step took
            reading = self._read()
        if reading is not None:
            self._decide(self._start, reading)
            self._start = reading
        if self.current < self.limit:
            self.shed_steps += 1
        return self.current

    def new_generation(self) -> None:
        """A generation begins: its first window starts at its first step (the time the engine sat idle before it
        is no measure of the device's load)."""
        self._start = None

    def _decide(self, start: Reading, end: Reading) -> None:
        waited = (end.times - start.times).contention
        seconds = end.when - start.when
        idle_cores = (
            (end.idle_s - start.idle_s) / seconds
            if end.idle_s is not None and start.idle_s is not None and seconds > 0
            else 0.0
        )
        since_shed = end.when - self._last_shed
        if waited > self.shed_above and self.current > 1:
            self.current -= 1
            self.changes += 1
            self._last_shed = end.when
            if self._probing:  # the try failed: wait twice as long before the next one
                self._probe_after = min(2 * self._probe_after, self.probe_max_s)
            self._probing = False
        elif self.current < self.limit and (
            (idle_cores >= self.restore_idle_cores and since_shed >= self.hold_s) or since_shed >= self._probe_after
        ):
            self.current += 1
            self.changes += 1
            self._probing = idle_cores < self.restore_idle_cores
        elif self._probing:  # a window passed at the tried count without waiting: it stays
            self._probing = False
            self._probe_after = self.probe_first_s


def threads_text(compute: Mapping[str, Any]) -> str:
    """``2 threads``, or ``2 threads (1 running: the device is busy)`` while the engine sheds some (from the
    ``compute`` part of a daemon's status)."""
    threads = f"{compute['threads']} thread{'s' if compute['threads'] != 1 else ''}"
    running = compute.get("running_threads", compute["threads"])  # a daemon older than this: fixed
    return threads + (f" ({running} running: the device is busy)" if running < compute["threads"] else "")
