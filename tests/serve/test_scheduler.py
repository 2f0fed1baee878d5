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
    queue(scheduler, [A, B, A])  # the first takes the engine's free sequence slot, two wait
    with pytest.raises(QueueFull) as raised:
        queue(scheduler, [A])
    assert raised.value.limit == 2 and raised.value.http_status == 503
    assert "2 requests are already queued (limit 2)" in str(raised.value)


def test_a_burst_is_refused_only_beyond_the_free_slots_and_the_queue(make_profile: Callable[..., Path]) -> None:
    # Hostile review of issue 19: with --parallel 4 --max-queue 4, eight requests at once got two 503s ("4 requests
    # are already queued") because the worker had not yet moved the first ones into their free slots.
    runtime = Runtime(load_profile(str(make_profile("scheduler-parallel", budget_mb=1024, ctx=512, parallel=4))))
    try:
        scheduler = Scheduler(runtime, max_queue=1)
        queue(scheduler, [A, B, A, B, A])  # four for the free slots, one waiting
        assert scheduler.queued == 5
        with pytest.raises(QueueFull) as raised:
            queue(scheduler, [B])
        assert "1 requests are already queued (limit 1)" in str(raised.value)
    finally:
        runtime.close()


def test_queued_grammars_are_bounded_in_bytes_not_only_in_count(runtime: Runtime) -> None:
    # Issue 18 item 10: 16 queued requests with 970 KB grammars each took RSS 73 MiB over a 330 MiB budget.
    scheduler = Scheduler(runtime, max_queue=16, max_grammar_bytes=3_000_000)
    grammar = 'root ::= "x"' + " " * 999_988  # a 1 MB grammar, as a 6.4 KB schema can become
    assert len(grammar) == 1_000_000
    for _ in range(3):
        scheduler.submit([1, 2], SamplingParams(max_tokens=1, grammar=grammar), ())
    assert scheduler.queued_grammar_bytes == 3_000_000
    with pytest.raises(QueueFull) as full:
        scheduler.submit([1, 2], SamplingParams(max_tokens=1, grammar=grammar), ())
    assert "hold 3000000 bytes of response_format grammars (limit 3000000)" in str(full.value)
    assert full.value.http_status == 503 and scheduler.queued == 3
    scheduler.submit([1, 2], SamplingParams(max_tokens=1), ())  # a request without a grammar still queues
    assert scheduler.queued == 4
