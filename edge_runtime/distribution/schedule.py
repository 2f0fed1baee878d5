"""When a device asks its origin again: jittered refreshes, and backoff after failures.

A fleet that refreshes on a fixed period synchronises: after a power cut every device boots within seconds and,
with a fixed period, keeps hitting the origin in one burst per period forever. So:

- the **first** refresh after a start lands uniformly in ``[0, start_window_s]`` (devices that boot together spread
  over the window; a device with nothing cached does not wait, see ``start_delay``);
- each **next** one after a success comes ``interval_s`` times a factor uniform in ``[1 - jitter, 1 + jitter]``, so
  phases drift apart instead of locking together;
- after ``n`` consecutive **failures** the wait is "equal jitter" exponential backoff: uniform in
  ``[d/2, d]`` with ``d = min(backoff_max_s, backoff_base_s * 2**(n-1))``, the base being the interval unless set:
  an origin that is down is asked less and less often (never much more often than in normal service, which a
  short base would do to a fleet), and when it returns the retries arrive spread out.

Pure arithmetic on a ``random.Random``: tested without a clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["RefreshSchedule"]


@dataclass(frozen=True)
class RefreshSchedule:
    """Refresh timing of one device, in seconds."""

    interval_s: float = 300.0
    jitter: float = 0.2  # +- fraction of the interval
    start_window_s: float | None = None  # None: the interval
    backoff_base_s: float | None = None  # None: the interval
    backoff_max_s: float | None = None  # None: four intervals

    def start_delay(self, rng: random.Random, *, has_cache: bool = True) -> float:
        """Seconds before the first refresh after a start (0 when nothing is cached: the device needs it now)."""
        window = self.interval_s if self.start_window_s is None else self.start_window_s
        return rng.uniform(0.0, window) if has_cache else 0.0

    def next_delay(self, rng: random.Random, *, failures: int = 0) -> float:
        """Seconds until the next refresh, after ``failures`` consecutive failed ones (0: the last succeeded)."""
        if failures <= 0:
            return self.interval_s * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        cap = 4 * self.interval_s if self.backoff_max_s is None else self.backoff_max_s
        base = self.interval_s if self.backoff_base_s is None else self.backoff_base_s
        ceiling = min(cap, base * 2 ** min(failures - 1, 30))
        return rng.uniform(ceiling / 2, ceiling)
