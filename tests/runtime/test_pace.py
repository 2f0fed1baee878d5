"""The decode pace over the last minute: tokens over engine time, prefill and idle time excluded, old steps gone."""

from __future__ import annotations

import threading

from edge_runtime.runtime.pace import Pace


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_is_tokens_over_engine_seconds_in_the_window_and_old_steps_leave_it() -> None:
    clock = Clock()
    pace = Pace(lambda: [threading.get_native_id()], window_s=60.0, clock=clock)
    assert pace.tokens_per_second() == 0.0 and pace.window_tokens() == 0
    for _ in range(40):  # 40 tokens at 25 ms each, then the engine sits idle
        pace.step(1, 0.025)
    clock.now += 30.0  # idle time between requests does not lower the rate
    for _ in range(10):
        pace.step(1, 0.1)
    assert pace.window_tokens() == 50
    assert round(pace.tokens_per_second(), 6) == round(50 / (40 * 0.025 + 10 * 0.1), 6) == 25.0
    clock.now += 45.0  # the first 40 steps are now more than a minute old
    assert pace.window_tokens() == 10 and round(pace.tokens_per_second(), 6) == 10.0
    clock.now += 61.0
    assert pace.window_tokens() == 0 and pace.tokens_per_second() == 0.0


def test_contention_is_read_from_the_engine_threads_schedstat() -> None:
    pace = Pace(lambda: [threading.get_native_id()])
    total = 0
    for i in range(2_000_000):  # this thread runs: its schedstat grows
        total += i
    share = pace.contention()
    assert 0.0 <= share <= 1.0
    assert pace.total.ran > 0  # the sample read this thread's own times
