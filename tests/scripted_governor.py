"""A thread governor driven by scripted readings, for tests that want the thread count to change at every step."""

from __future__ import annotations

from edge_runtime.cores import ThreadTimes
from edge_runtime.runtime.engine import Engine
from edge_runtime.runtime.governor import Reading, ThreadGovernor


class Alternating:
    """Readings that make a governor (window 0, no hold) shed and restore a thread at every step: the threads always
    waited half the time they wanted a CPU, and the device always left ten cores idle."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> Reading:
        self.count += 1
        return Reading(times=ThreadTimes(ran=self.count, waited=self.count), idle_s=10.0 * self.count,
                       when=float(self.count))


def alternating_governor(engine: Engine) -> ThreadGovernor:
    return ThreadGovernor(engine.threads, enabled=True, read=Alternating(), window_s=0.0, hold_s=0.0,
                          probe_s=float("inf"))
