"""The thread governor's decisions, from scripted readings (no clock games: every window is a step apart)."""

from __future__ import annotations

import pytest

from edge_runtime.cores import ThreadTimes
from edge_runtime.runtime.governor import Reading, ThreadGovernor, thread_invariant, threads_text


class Script:
    """Readings one second apart: each step adds ``ran`` and ``waited`` seconds to the threads and ``idle`` CPU
    seconds to the device, as the test sets them before the step."""

    def __init__(self) -> None:
        self.ran = self.waited = self.idle = self.when = 0.0
        self.step = (1.0, 0.0, 0.0)  # ran, waited, idle per reading

    def __call__(self) -> Reading:
        ran, waited, idle = self.step
        self.ran, self.waited, self.idle, self.when = self.ran + ran, self.waited + waited, self.idle + idle, self.when + 1
        return Reading(times=ThreadTimes(ran=self.ran, waited=self.waited), idle_s=self.idle, when=self.when)


def governor(limit: int, script: Script, *, hold_s: float = 0.0, probe_s: float = float("inf")) -> ThreadGovernor:
    return ThreadGovernor(limit, enabled=True, read=script, window_s=0.0, hold_s=hold_s, probe_s=probe_s,
                          probe_max_s=8.0)


def steps(gov: ThreadGovernor, count: int) -> list[int]:
    return [gov.next_step() for _ in range(count)]


def test_sheds_one_thread_per_window_while_the_threads_wait_and_never_below_one() -> None:
    script = Script()
    gov = governor(4, script)
    script.step = (1.0, 0.5, 0.0)  # a third of the wanted time waited: above 0.2
    assert steps(gov, 6) == [4, 3, 2, 1, 1, 1]  # the first step only reads; then one thread less per window
    assert gov.changes == 3 and gov.shed_steps == 5


def test_keeps_its_threads_while_they_rarely_wait_and_takes_one_back_only_with_an_idle_core() -> None:
    script = Script()
    gov = governor(2, script)
    script.step = (1.0, 0.1, 0.0)  # 9% waited (a nice-19 neighbour): not worth shedding
    assert steps(gov, 4) == [2, 2, 2, 2]
    script.step = (1.0, 1.0, 0.0)
    assert steps(gov, 2) == [1, 1]
    script.step = (1.0, 0.0, 0.3)  # the neighbour still holds most of the other core
    assert steps(gov, 3) == [1, 1, 1]
    script.step = (1.0, 0.0, 0.9)  # a core is idle again
    assert steps(gov, 2) == [2, 2] and gov.changes == 2


def test_a_restore_waits_hold_s_after_the_last_shed() -> None:
    script = Script()
    gov = governor(2, script, hold_s=3.0)
    script.step = (1.0, 1.0, 0.0)
    assert steps(gov, 2) == [2, 1]  # shed at reading 2
    script.step = (1.0, 0.0, 2.0)
    assert steps(gov, 4) == [1, 1, 2, 2]  # readings 3 and 4 are within 3 s of the shed; reading 5 is not


def test_without_idle_cpu_it_tries_a_thread_back_and_waits_twice_as_long_after_each_failed_try() -> None:
    # A neighbour at nice 19 leaves no idle CPU yet never makes the engine wait: only a try shows the core is there.
    script = Script()
    gov = governor(2, script, probe_s=2.0)
    script.step = (1.0, 1.0, 0.0)  # a busy neighbour at nice 0: every window at 2 threads waits
    assert steps(gov, 2) == [2, 1]  # shed at reading 2
    script.step = (1.0, 0.0, 0.0)  # 1 thread never waits, and no CPU is idle
    assert steps(gov, 2) == [1, 2]  # tried 2 s after the shed (reading 4)
    script.step = (1.0, 1.0, 0.0)
    assert steps(gov, 1) == [1]  # the try waited: shed again (reading 5)
    script.step = (1.0, 0.0, 0.0)
    assert steps(gov, 4) == [1, 1, 1, 2]  # the next try waits 4 s (reading 9)
    assert steps(gov, 2) == [2, 2]  # at nice 19 the try does not wait: 2 threads stay
    script.step = (1.0, 1.0, 0.0)
    assert steps(gov, 3) == [1, 1, 2]  # a try that stuck resets the interval to 2 s


def test_disabled_or_one_thread_never_reads_or_changes() -> None:
    script = Script()
    for gov in (ThreadGovernor(2, enabled=False, read=script), ThreadGovernor(1, enabled=True, read=script)):
        assert steps(gov, 5) == [gov.limit] * 5 and gov.changes == 0 and not gov.enabled
    assert script.when == 0  # no reading taken


def test_a_new_generation_starts_a_new_window_and_a_slow_step_still_counts() -> None:
    # From the hostile review of #20: a step slower than 1 s counted as an idle pause, so a collapsed decode (the
    # case the governor is for) never shed. Only a new generation starts a window afresh now.
    script = Script()
    gov = ThreadGovernor(2, enabled=True, read=script, window_s=0.5, hold_s=0.0, probe_s=float("inf"))
    script.step = (1.0, 1.0, 0.0)  # readings a second apart: every step is slower than the window
    assert steps(gov, 2) == [2, 1] and gov.changes == 1
    gov.new_generation()
    assert steps(gov, 1) == [1] and script.when == 3  # a fresh first reading, no decision
    assert gov.changes == 1


@pytest.mark.parametrize(("kv_type", "invariant"), [("f32", False), ("f16", False), ("q8_0", True), ("q4_0", True)])
def test_only_quantised_kv_caches_are_thread_invariant(kv_type: str, invariant: bool) -> None:
    assert thread_invariant(kv_type) is invariant


def test_threads_text_names_the_running_count_only_while_shedding() -> None:
    assert threads_text({"threads": 2, "running_threads": 2}) == "2 threads"
    assert threads_text({"threads": 2, "running_threads": 1}) == "2 threads (1 running: the device is busy)"
    assert threads_text({"threads": 1}) == "1 thread"  # a daemon older than the governor
