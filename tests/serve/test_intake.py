"""Request intake: bodies refused before they are read, a bound on requests waiting to be read, and load shedding
while the process is over its memory budget (real runtime, real aiohttp server on 127.0.0.1, real RSS)."""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.profiles import load_profile
from edge_runtime.runtime.budget import measured_rss_bytes, release_freed_memory
from edge_runtime.runtime.core import Runtime
from edge_runtime.serve.app import create_app
from edge_runtime.serve.intake import json_values
from edge_runtime.serve.state import DAEMON, ServerConfig

MIB = 1 << 20


def _rss_parts() -> str:
    """This process's resident memory by kind (anonymous, file-backed, shared), for failure messages."""
    status = Path("/proc/self/status").read_text().splitlines()
    return ", ".join(line.replace("\t", " ") for line in status if line.startswith(("RssAnon", "RssFile", "RssShmem")))


def _ballast(size: int) -> mmap.mmap:
    """``size`` bytes of resident memory that leave the process the moment they are closed: an anonymous mapping
    of its own, every page written (a heap block could stay resident after it is freed until the next trim)."""
    block, page = mmap.mmap(-1, size), b"\x01" * mmap.PAGESIZE
    for offset in range(0, size - mmap.PAGESIZE + 1, mmap.PAGESIZE):
        block[offset:offset + mmap.PAGESIZE] = page
    return block


@pytest.fixture
def runtime(in_process_profile: Callable[[str], Path]) -> Iterator[Runtime]:
    rt = Runtime(load_profile(str(in_process_profile("intake"))), ctx=512)
    yield rt
    rt.close()


async def _raw_request(port: int, head: str, body: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


async def _half_bodies(app: Any, port: int, count: int, *, waiting: int = 0) -> list[
        tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` connections that send half a body and then nothing; returns once ``count - waiting`` of them hold
    read slots and ``waiting`` wait for one."""
    clients = [await _raw_request(port, _head(1000), b'{"prompt": "') for _ in range(count)]
    for _ in range(200):
        if (app[DAEMON].intake.reading, app[DAEMON].intake.waiting) == (count - waiting, waiting):
            break
        await asyncio.sleep(0.01)
    assert (app[DAEMON].intake.reading, app[DAEMON].intake.waiting) == (count - waiting, waiting)
    return clients


def _head(length: int) -> str:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n")


@pytest.mark.asyncio
async def test_a_body_over_the_cap_is_refused_from_its_content_length_before_it_is_sent(
        aiohttp_client: Any, runtime_with: Callable[..., Runtime]) -> None:
    runtime = runtime_with(max_body_bytes=64 * 1024)
    client = await aiohttp_client(create_app(ServerConfig(body_timeout_s=30), runtime))
    reader, writer = await _raw_request(client.port, _head(10 * MIB))  # headers only: the body never comes
    status_line = await asyncio.wait_for(reader.readline(), timeout=5)  # not the 30 s body timeout
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 413")


@pytest.mark.asyncio
async def test_requests_beyond_the_waiting_bound_get_503_at_once(
        aiohttp_client: Any, runtime_with: Callable[..., Runtime]) -> None:
    runtime = runtime_with(max_queue=1)
    app = create_app(ServerConfig(body_timeout_s=30), runtime)
    client = await aiohttp_client(app)
    intake = app[DAEMON].intake
    assert intake.reads == 2  # the profile's two threads
    stalled = await _half_bodies(app, client.port, 3, waiting=1)  # two hold the read slots, one waits

    refused = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    assert (await refused.json())["error"]["type"] == "server_overloaded"
    assert (await client.get("/health")).status == 200  # other routes are not held up

    for _, writer in stalled:
        writer.close()
    for _ in range(200):
        if (intake.reading, intake.waiting) == (0, 0):
            break
        await asyncio.sleep(0.01)
    served = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert served.status == 200


@pytest.mark.asyncio
async def test_completions_are_shed_while_rss_is_over_the_budget_and_served_again_once_under(
        aiohttp_client: Any, make_profile: Callable[..., Path], caplog: pytest.LogCaptureFixture) -> None:
    # A budget 300 MiB above what this test process holds now: room for the runtime, then real memory (a filled
    # buffer) pushes the process over it, as a leak or another part of the process would.
    budget_mb = measured_rss_bytes() // MIB + 300
    runtime = Runtime(load_profile(str(make_profile("shedding", budget_mb=budget_mb, ram_mb=32768))), ctx=512)
    try:
        app = create_app(ServerConfig(), runtime)
        client = await aiohttp_client(app)
        prompt = {"prompt": "Name a colour.", "max_tokens": 2}
        assert (await client.post("/v1/completions", json=prompt)).status == 200
        release_freed_memory()  # what the daemon's first trim would free (much, in a long pytest process)
        over = budget_mb * MIB - measured_rss_bytes() + 32 * MIB
        assert over > 32 * MIB  # the runtime left the process under its budget
        ballast = _ballast(over)
        with caplog.at_level(logging.WARNING, logger="edge_runtime.serve.intake"):
            for _ in range(2):
                shed = await client.post("/v1/completions", json=prompt)
                assert shed.status == 503 and shed.headers["Retry-After"] == "1"
                error = (await shed.json())["error"]
                assert error["type"] == "server_overloaded" and "over its runtime budget" in error["message"]
            assert (await client.get("/health")).status == 200
            metrics = await (await client.get("/metrics")).text()
            assert "edge_rt_shed_requests_total 2.0" in metrics and "edge_rt_over_budget 1.0" in metrics
            ballast.close()
            served = await client.post("/v1/completions", json=prompt)
            assert served.status == 200, f"budget {budget_mb} MiB; {_rss_parts()}"
        metrics = await (await client.get("/metrics")).text()
        assert "edge_rt_shed_requests_total 2.0" in metrics and "edge_rt_over_budget 0.0" in metrics
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 2  # one when shedding starts, one when it ends: not one per request
        assert "over the runtime budget" in warnings[0] and "back under the budget" in warnings[1]
    finally:
        runtime.close()


@pytest.mark.asyncio
async def test_idle_adapters_are_evicted_least_recent_first_to_get_back_under_the_budget_instead_of_shedding(
        aiohttp_client: Any, make_profile: Callable[..., Path], adapter_files: list[Path]) -> None:
    budget_mb = measured_rss_bytes() // MIB + 300
    runtime = Runtime(load_profile(str(make_profile("relief", budget_mb=budget_mb, ram_mb=32768))), ctx=512)
    names = ["legal-review", "brand-voice", "json-extract"]  # used in this order: legal-review is the coldest
    try:
        client = await aiohttp_client(create_app(ServerConfig(), runtime))
        for name, path in zip(names, adapter_files):
            runtime.adapters.add(name, path)
            prompt = {"model": name, "prompt": "Name a colour.", "max_tokens": 2}
            assert (await client.post("/v1/completions", json=prompt)).status == 200  # now resident, idle
        adapter = runtime.adapters.resident_bytes // len(names)
        # Over the budget by half an adapter (after what trimming frees): evicting the coldest serves again. Other
        # memory of a long test process may grow meanwhile (CI saw +18 MiB once): the relief then evicts the next.
        release_freed_memory()
        ballast = _ballast(budget_mb * MIB - measured_rss_bytes() + adapter // 2)
        assert measured_rss_bytes() > budget_mb * MIB
        before = _rss_parts()
        served = await client.post("/v1/completions", json={"prompt": "Name a colour.", "max_tokens": 2})
        assert served.status == 200, f"budget {budget_mb} MiB, adapters of {adapter / MIB:.1f} MiB; before the " \
                                     f"request {before}; after {_rss_parts()}"
        states = [runtime.adapters.info(name).state for name in names]
        evicted = runtime.adapters.stats.evictions
        assert 1 <= evicted < len(names) and states == ["cached"] * evicted + ["resident"] * (3 - evicted), states
        assert measured_rss_bytes() <= budget_mb * MIB
        ballast.close()
    finally:
        runtime.close()


@pytest.mark.asyncio
async def test_clients_that_stall_their_bodies_hold_the_read_slots_only_for_the_gap_timeout(
        aiohttp_client: Any, runtime: Runtime) -> None:
    app = create_app(ServerConfig(body_timeout_s=30, body_gap_s=0.5), runtime)
    client = await aiohttp_client(app)
    stalled = await _half_bodies(app, client.port, 3, waiting=1)  # both read slots, and one waiting for them
    health = await (await client.get("/health")).json()  # an operator sees the stalled reads
    assert (health["reading"], health["waiting_to_read"], health["queued"], health["shedding"]) == (2, 1, 0, False)
    metrics = await (await client.get("/metrics")).text()
    assert "edge_rt_reading_requests 2.0" in metrics and "edge_rt_waiting_to_read_requests 1.0" in metrics
    # Served once the stallers time out (0.5 s without a byte), not after the 30 s body timeout.
    served = await asyncio.wait_for(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}), 10)
    assert served.status == 200
    for reader, writer in stalled:
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 408")
        writer.close()


@pytest.mark.asyncio
async def test_a_client_dripping_its_body_is_cut_at_the_minimum_rate_not_after_the_body_timeout(
        aiohttp_client: Any, runtime: Runtime) -> None:
    app = create_app(ServerConfig(body_timeout_s=30, body_gap_s=0.5), runtime)
    client = await aiohttp_client(app)
    drippers = await _half_bodies(app, client.port, 2)  # both read slots

    async def drip() -> None:  # a byte every 0.3 s: never a 0.5 s gap
        for _ in range(20):
            await asyncio.sleep(0.3)
            for _, writer in drippers:
                if not writer.is_closing():
                    writer.write(b"x")

    dripping = asyncio.ensure_future(drip())
    served = await asyncio.wait_for(client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}), 10)
    assert served.status == 200  # 1,000 bytes are due within 0.5 s + 1000 / 64 KiB/s, not 30 s
    for reader, writer in drippers:
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 408")
        writer.close()
    dripping.cancel()


@pytest.mark.asyncio
async def test_a_body_of_many_tiny_json_values_is_refused_before_it_is_parsed_into_objects(
        aiohttp_client: Any, runtime: Runtime) -> None:
    # 1 MB of `[{},{},...]` parsed to ~24 MB of Python objects (8x what the plan counts for two reads); at most one
    # array, object or item per 128 bytes of the body cap is parsed: 8,192 under the default 1 MiB cap.
    client = await aiohttp_client(create_app(ServerConfig(), runtime))
    hostile = '{"prompt": "Hi", "stop": [' + ",".join(["{}"] * 300_000) + "]}"
    refused = await client.post("/v1/completions", data=hostile, headers={"Content-Type": "application/json"})
    assert refused.status == 400
    error = (await refused.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert "holds more than the 8192 JSON arrays, objects and items a body may" in error["message"]
    # Commas and brackets inside strings are text, not values; a long conversation of short messages is read.
    messages = [{"role": "user", "content": "a, [b] {c}"}, {"role": "assistant", "content": "d"}] * 1_300
    chat = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert chat.status == 400 and (await chat.json())["error"]["type"] == "context_length_exceeded"
    served = await client.post("/v1/chat/completions", json={"messages": messages[:20], "max_tokens": 1})
    assert served.status == 200


@pytest.mark.parametrize(("text", "values"), [
    ('{"a": "x\\\\", "b": ["c", "d\\"e,", 1]}', 5),  # an escaped backslash ends a string, an escaped quote not
    ('["\\\\\\"", 1, 2]', 3),
    ('{"k\\u005c": [1,2]}', 3),  # a \u escape of a backslash escapes nothing
    ('{"prompt": "a, [b] {c}"}', 1),
    ('{"prompt": "never closed, [', 1),
])
def test_json_values_counts_only_outside_strings(text: str, values: int) -> None:
    assert json_values(text) == values


def test_counting_hostile_bodies_takes_linear_time_and_no_memory() -> None:
    # Regression: a regex scanned an unclosed string of escaped quotes from every quote to the end: 64 KiB held the
    # event loop 12 s. Work is measured in what it allocates and in the strings visited, not in seconds.
    unclosed = '{"prompt": "' + '\\"' * (1 << 19)  # 1 MiB
    quotes = '""ab' * (1 << 18)  # 1 MiB of empty strings: more than valid JSON with 8,192 values can hold
    tracemalloc.start()
    try:
        assert json_values(unclosed, stop_after=8192) == 1
        assert json_values(quotes, stop_after=8192) == 2 * 8192 + 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * (1 << 20) + 4096  # at most the escape-free copy of the text, never a list of pieces


@pytest.mark.asyncio
async def test_a_body_whose_text_widens_past_what_the_plan_counts_is_refused(aiohttp_client: Any,
                                                                           runtime: Runtime) -> None:
    # Issue 18 item 12: one emoji per 1 MiB body made Python store every character in 4 bytes (11.5 MiB over
    # twenty bodies), which no part of the memory plan counted.
    app = create_app(ServerConfig(), runtime)
    client = await aiohttp_client(app)
    half = app[DAEMON].max_body_bytes // 2
    wide = {"prompt": "a" * half + "\U0001F600", "max_tokens": 1}  # half the body cap: twice the cap as a str
    refused = await client.post("/v1/completions", json=wide)
    assert refused.status == 400
    message = (await refused.json())["error"]["message"]
    assert "4 bytes per character" in message and "beyond U+FFFF" in message  # "\ud83d\ude00": wide once parsed
    raw = await client.post("/v1/completions", data=json.dumps(wide, ensure_ascii=False).encode(),
                            headers={"Content-Type": "application/json"})  # the emoji as UTF-8: wide once decoded
    assert raw.status == 400 and "4 bytes per character" in (await raw.json())["error"]["message"]
    ascii_only = await client.post("/v1/completions", json={"prompt": "a" * half, "max_tokens": 1})
    assert (await ascii_only.json())["error"]["type"] == "context_length_exceeded"  # read and tokenized
    short = await client.post("/v1/completions", json={"prompt": "Hi \U0001F600", "max_tokens": 1})
    assert short.status == 200
