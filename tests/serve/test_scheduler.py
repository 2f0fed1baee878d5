"""Scheduling policy: same adapter set first (fewer switches), but no request waits past the bound."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_runtime.errors import QueueFull
from edge_runtime.profiles import load_profile
from edge_runtime.runtime.core import Runtime
from edge_runtime.runtime.engine import SamplingParams
from edge_runtime.runtime.requests import AdapterRequest
from edge_runtime.serve.scheduler import Scheduler


@pytest.fixture(scope="module")
def runtime(make_profile: Callable[..., Path]) -> Iterator[Runtime]:
    rt = Runtime(load_profile(str(make_profile("scheduler", budget_mb=1024, ctx=512))))
    yield rt
    rt.close()


def queue(scheduler: Scheduler, specs: list[tuple[AdapterRequest, ...]]) -> None:
    for spec in specs:
        scheduler.submit([1, 2, 3], SamplingParams(max_tokens=1), spec)


def order(scheduler: Scheduler, now: float) -> list[tuple[AdapterRequest, ...]]:
    served = []
    while scheduler.queued:
        job = scheduler.next_job(now)
        scheduler._pending.remove(job)
        scheduler._current_key = job.adapter_key
        served.append(job.adapter_key)
    return served


A, B = (AdapterRequest("a"),), (AdapterRequest("b"),)


def test_jobs_of_the_current_adapter_set_go_first(runtime: Runtime) -> None:
    scheduler = Scheduler(runtime, max_wait_s=60)
    queue(scheduler, [A, B, A, B, A])
    first = scheduler._pending[0].enqueued
    assert order(scheduler, now=first) == [A, A, A, B, B]  # two switches instead of four


def test_a_job_waiting_past_the_bound_is_served_before_grouping(runtime: Runtime) -> None:
    scheduler = Scheduler(runtime, max_wait_s=0.5)
    queue(scheduler, [A, B, A, A])
    first = scheduler._pending[0].enqueued
    scheduler._current_key = A
    # Everything has waited too long: strict arrival order, so B is not starved behind the stream of A jobs.
    assert order(scheduler, now=first + 10) == [A, B, A, A]


def test_the_queue_is_bounded(runtime: Runtime) -> None:
    scheduler = Scheduler(runtime, max_queue=2)
    queue(scheduler, [A, B])
    with pytest.raises(QueueFull) as raised:
        queue(scheduler, [A])
    assert raised.value.limit == 2 and raised.value.http_status == 503
