"""How fast the engine decodes now, and how much CPU time its threads were denied: over the last minute.

A busy device (a flight stack, a perception pipeline, another process) slows a decode without any error; these two
numbers make that visible. The decode rate counts generated tokens after each generation's first (which includes
the prompt's evaluation) over the time the engine spent producing them, so idle time between requests does not
lower it. Contention is the share of the time the engine's threads (its worker and llama.cpp's threads) wanted a
CPU that they spent waiting for one, from ``/proc/self/task/<tid>/schedstat``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from edge_runtime.cores import ThreadTimes, thread_times

__all__ = ["Pace"]

WINDOW_S = 60.0
SAMPLE_EVERY_S = 1.0


class Pace:
    """Decode steps and thread times over the last ``window_s`` seconds; safe to call from any thread."""

    def __init__(
        self,
        threads: Callable[[], Iterable[int]],
        *,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threads = threads  # the native ids of the engine's threads, read at each sample
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._steps: deque[tuple[float, int, float]] = deque()  # (when, tokens, seconds), one per second at most
        self._samples: deque[tuple[float, ThreadTimes]] = deque()
        self.total = ThreadTimes(0.0, 0.0)  # the engine's threads since start (live threads only)

    def step(self, tokens: int, seconds: float) -> None:
        """Count ``tokens`` decoded in ``seconds`` of engine time (prefill excluded)."""
        now = self._clock()
        with self._lock:
            if self._steps and now - self._steps[-1][0] < SAMPLE_EVERY_S:
                when, count, spent = self._steps[-1]
                self._steps[-1] = (when, count + tokens, spent + seconds)
            else:
                self._steps.append((now, tokens, seconds))
            due = not self._samples or now - self._samples[-1][0] >= SAMPLE_EVERY_S
        if due:
            self.sample()

    def sample(self) -> ThreadTimes:
        """Read the engine's threads' times now and remember them for the window; return them."""
        times = thread_times(self._threads())
        now = self._clock()
        with self._lock:
            self._samples.append((now, times))
            self.total = times
            self._trim(now)
        return times

    def _trim(self, now: float) -> None:
        while self._steps and now - self._steps[0][0] > self.window_s:
            self._steps.popleft()
        while len(self._samples) > 1 and now - self._samples[1][0] > self.window_s:
            self._samples.popleft()  # the oldest kept is the last one at or before the window's start

    def window_tokens(self) -> int:
        """Tokens counted in the window."""
        with self._lock:
            self._trim(self._clock())
            return sum(tokens for _, tokens, _ in self._steps)

    def tokens_per_second(self) -> float:
        """Decode speed over the window: tokens / engine seconds spent on them (0.0 when nothing was decoded)."""
        with self._lock:
            self._trim(self._clock())
            tokens = sum(count for _, count, _ in self._steps)
            seconds = sum(spent for _, _, spent in self._steps)
        return tokens / seconds if seconds > 0 else 0.0

    def contention(self) -> float:
        """The share (0..1) of the window's CPU-wanted time the engine's threads spent waiting for a CPU."""
        now = self.sample()
        with self._lock:
            oldest = self._samples[0][1]
        return (now - oldest).contention
