"""Request intake: what a request may cost in memory before it reaches the queue, and refusing it early.

A request body is read, decoded, parsed and (for completions) tokenized by at most ``reads`` requests at once, and
at most ``max_waiting`` more wait for a slot with their body unread (holding only what their connection buffered);
more get 503 at once. The memory plan counts both as request buffers (``runtime/budget.py``). A daemon whose
measured RSS crosses the runtime budget anyway sheds new completions (503 with ``Retry-After``) until it is back
under, and says so in its log and in /metrics.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from edge_runtime.errors import BodyTimeout, InvalidRequest, MemoryPressure, QueueFull
from edge_runtime.runtime.budget import measured_rss_bytes, release_freed_memory

log = logging.getLogger(__name__)
JSON_ON_LOOP_BYTES = 64 * 1024  # larger bodies are decoded and parsed off the event loop
SMALL_BODY_BYTES = 64 * 1024  # the cap on admin routes' bodies (names and paths, never prompts)
TRIM_INTERVAL_S = 1.0  # at most one malloc_trim per second while over budget
RETRY_AFTER_S = 1
MIN_BODY_BYTES_PER_S = 64 * 1024  # a body slower than this is cut once past the gap timeout (408)
# Parsed JSON costs 56-290 bytes per array, object or item (measured: a 1 MiB body of `[{},{},...]` became 24 MiB,
# one of tiny chat messages 8.5 MiB). At most one per 128 bytes of the body cap keeps the parsed objects within
# about twice the cap, inside the three copies the memory plan counts: 8,192 for 1 MiB, ~2,700 chat messages.
BYTES_PER_JSON_VALUE = 128
MIN_JSON_VALUES = 256
# Python stores a str at 1, 2 or 4 bytes per character, the widest character deciding: one emoji in a 1 MiB body of
# ASCII makes its text 4 MiB (and the prompt parsed from it as much again). Decoded text may take at most this many
# times the body cap; the plan's three copies of a body then still hold.
TEXT_BYTES_PER_BODY_BYTE = 1.5


class RequestIntake:
    """Bounds concurrent body reads and sheds completions while the process is over its memory budget."""

    def __init__(
        self,
        *,
        reads: int,
        max_waiting: int,
        budget_bytes: int,
        body_timeout_s: float,
        body_gap_s: float = 5.0,
        rss: Callable[[], int] = measured_rss_bytes,
    ) -> None:
        self.reads = reads
        self.max_waiting = max_waiting
        self.budget_bytes = budget_bytes
        self.body_timeout_s = body_timeout_s
        self.body_gap_s = body_gap_s  # the longest pause inside a body: a stalled client frees its slot soon
        self.shed_requests = 0
        self.over_budget = False
        self.reading = 0  # requests holding a slot
        self.waiting = 0  # requests waiting for one
        self._slots = asyncio.Semaphore(reads)
        self._rss = rss
        self._trimmed_at = 0.0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the ``reads`` slots for reading, parsing and tokenizing a body (503 when ``max_waiting``
        requests already wait, or after the body timeout)."""
        if self._slots.locked() and self.waiting >= self.max_waiting:
            raise QueueFull(queued=self.waiting, limit=self.max_waiting, retry_after_s=RETRY_AFTER_S)
        self.waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self.body_timeout_s)
        except asyncio.TimeoutError as exc:
            raise QueueFull(
                queued=self.waiting, limit=self.max_waiting, retry_after_s=RETRY_AFTER_S, waited_s=self.body_timeout_s
            ) from exc
        finally:
            self.waiting -= 1
        self.reading += 1
        try:
            yield
        finally:
            self.reading -= 1
            self._slots.release()

    async def admit(self, relieve: Callable[[], Awaitable[bool]]) -> None:
        """Raise ``MemoryPressure`` when the process is over its budget even after handing freed memory back and
        after ``relieve`` (evicting one idle adapter per call, False when none is left) brought it no lower."""
        rss = self._rss()
        if rss > self.budget_bytes and time.monotonic() - self._trimmed_at >= TRIM_INTERVAL_S:
            self._trimmed_at = time.monotonic()
            release_freed_memory()
            rss = self._rss()
            # Memory the plan did not foresee (a hostile body's parsed objects the allocator keeps) would otherwise
            # shed load for good: idle adapters make room, and reload on demand within the smaller space left.
            while rss > self.budget_bytes and await relieve():  # an eviction trims what it freed itself
                rss = self._rss()
        if rss <= self.budget_bytes:
            if self.over_budget:
                log.warning(
                    "memory back under the budget (RSS %.1f MiB of %.1f MiB): serving again",
                    rss / 2**20,
                    self.budget_bytes / 2**20,
                )
                self.over_budget = False
            return
        if not self.over_budget:
            log.warning(
                "RSS %.1f MiB is over the runtime budget of %.1f MiB: new completions get 503 until it is "
                "back under (edge_rt_shed_requests counts them)",
                rss / 2**20,
                self.budget_bytes / 2**20,
            )
            self.over_budget = True
        self.shed_requests += 1
        raise MemoryPressure(rss_bytes=rss, budget_bytes=self.budget_bytes, retry_after_s=RETRY_AFTER_S)

    async def read_json(self, request: web.Request, work: Executor, *, max_bytes: int) -> Any:
        """The body of ``request`` as JSON, read within the body timeout; call it holding a ``slot()``."""
        # A body must keep arriving (no gap over body_gap_s) and at MIN_BODY_BYTES_PER_S: a client dripping a byte
        # every few seconds would otherwise hold a read slot for the whole body timeout.
        declared = request.content_length
        deadline = (
            self.body_timeout_s
            if declared is None
            else min(self.body_timeout_s, self.body_gap_s + declared / MIN_BODY_BYTES_PER_S)
        )
        try:
            raw = await asyncio.wait_for(
                read_body(request, max_bytes=max_bytes, gap_s=self.body_gap_s), timeout=deadline
            )
        except asyncio.TimeoutError as exc:
            raise BodyTimeout(timeout_s=round(deadline, 1)) from exc  # answered with Connection: close
        parse = functools.partial(
            parse_json,
            raw,
            max_values=max(MIN_JSON_VALUES, max_bytes // BYTES_PER_JSON_VALUE),
            max_text_bytes=int(max_bytes * TEXT_BYTES_PER_BODY_BYTE),
        )
        if len(raw) < JSON_ON_LOOP_BYTES:
            return parse()
        return await asyncio.get_running_loop().run_in_executor(work, parse)


async def read_body(request: web.Request, *, max_bytes: int, gap_s: float) -> bytearray:
    """The body's bytes, refused with 413 from its Content-Length before reading when it is too large;
    ``asyncio.TimeoutError`` when nothing arrives for ``gap_s`` seconds."""
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=declared)
    body = bytearray()
    while chunk := await asyncio.wait_for(request.content.readany(), timeout=gap_s):
        if len(body) + len(chunk) > max_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=len(body) + len(chunk))
        body += chunk
    return body


def parse_json(raw: bytearray, *, max_values: int, max_text_bytes: int | None = None) -> Any:
    """Decode and parse ``raw``, emptying it first so that at most two copies of the body live at once; refused
    before parsing when it holds more than ``max_values`` arrays, objects and items, or when its text takes more than
    ``max_text_bytes`` in memory (characters beyond U+FFFF widen every character of a Python str to 4 bytes)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the body is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if max_text_bytes is not None and sys.getsizeof(text) > max_text_bytes:
        width = (sys.getsizeof(text) - sys.getsizeof("")) // max(1, len(text))
        raise InvalidRequest(
            f"the body's {len(raw)} bytes decode to {sys.getsizeof(text)} bytes of text ({width} "
            f"bytes per character: it holds characters beyond U+FFFF such as emoji), over the "
            f"{max_text_bytes} a body may take: send a shorter prompt"
        )
    raw.clear()
    values = json_values(text, stop_after=max_values)
    if values > max_values:
        raise InvalidRequest(
            f"the body holds more than the {max_values} JSON arrays, objects and items a body may "
            "(each becomes a Python object of up to 25 times its bytes): send fewer messages or list "
            "items"
        )
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge integers, absurd nesting
        raise InvalidRequest(f"the body is not valid JSON ({str(exc)[:200]})") from exc
    del text
    if max_text_bytes is not None:  # "\ud83d\ude00" escapes keep the body narrow and widen the parsed string
        _check_string_bytes(parsed, max_text_bytes)
    return parsed


def _check_string_bytes(value: Any, limit: int) -> None:
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += sys.getsizeof(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    if total > limit:
        raise InvalidRequest(
            f"the body's strings take {total} bytes in memory (4 bytes per character once one holds "
            f"a character beyond U+FFFF, such as an emoji), over the {limit} a body may take: send a "
            "shorter prompt"
        )


def json_values(text: str, *, stop_after: int | None = None) -> int:
    """Arrays, objects and items after the first in each (commas) outside the strings of ``text``: how many Python
    objects parsing it can make besides its strings, which cost about their size. Counting ends once past
    ``stop_after``, or once the strings alone are more than valid JSON with that many values can hold.

    ``str.replace``, ``str.find`` and ``str.count`` from string to string, in time linear in the text: a regex took
    quadratic time on an unclosed string of escaped quotes (a 64 KiB body held the event loop for 12 s).
    """
    plain = text.replace("\\\\", "").replace('\\"', "")  # escapes gone: a string runs from a quote to the next
    count, strings, position, end = 0, 0, 0, len(plain)
    most_strings = None if stop_after is None else 2 * stop_after + 2  # keys and values: two per comma, and ends
    while position < end:
        opening = plain.find('"', position)
        stop = end if opening < 0 else opening
        count += plain.count(",", position, stop) + plain.count("[", position, stop) + plain.count("{", position, stop)
        if opening < 0 or (stop_after is not None and count > stop_after):
            break
        strings += 1
        if most_strings is not None and strings > most_strings:
            return max(count, most_strings)
        closing = plain.find('"', opening + 1)
        position = end if closing < 0 else closing + 1
    return count
