"""One verified blob download: resumable, bounded by the manifest length, retried, timed, rate-capped.

Rules (after Mender's resume logic and TUF's download checks):

- Bytes go to a claimed partial file in the cache (``store.Partial``), never past the manifest's length, and are
  hashed as they arrive; the blob only becomes visible through ``AdapterStore.install`` once its sha256 matches.
- A resume sends ``Range: bytes=N-`` plus ``If-Range`` with the server's strong ETag (or Last-Modified); only a
  206 whose Content-Range is exactly ``bytes N-(size-1)/size`` is appended, a 200 restarts from byte 0, and any
  other Content-Range empties the partial and retries from 0.
- 408, 429 and 5xx, connection errors, resets and stalls are retried with full-jitter exponential backoff
  (``Retry-After`` honoured); 401, 403 and 404 fail at once. A stall longer than the gap timeout, a rate below
  the minimum throughput after a grace period, or the overall deadline raise ``SlowRetrieval``.
- If bytes assembled from several responses do not hash right, the partial is emptied and fetched whole once;
  a whole response that does not hash right raises ``IntegrityError`` at once.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import aiohttp

from edge_runtime.distribution.http import MAX_REDIRECTS, RedirectBlocked
from edge_runtime.distribution.sink import BlobRequest, DownloadSink
from edge_runtime.distribution.store import AdapterStore, CachedAdapter
from edge_runtime.errors import (
    EdgeRtError,
    IntegrityError,
    LengthExceeded,
    RedirectRefused,
    RemoteNotFound,
    SlowRetrieval,
    TransferFailed,
)

T = TypeVar("T")
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


MANIFEST_DEADLINE_S = 120.0  # for a small file (the manifest), retries and all
MAX_RETRY_AFTER_S = 60.0  # the longest Retry-After honoured


@dataclass(frozen=True)
class TransferSettings:
    """Network limits of a device: timeouts in seconds, rates in bytes per second."""

    connect_timeout_s: float = 10.0
    gap_timeout_s: float = 30.0
    min_bytes_per_second: int = 2048
    throughput_grace_s: float = 10.0
    deadline_s: float | None = None  # None: 60 s plus the time the file takes at the minimum throughput
    max_attempts: int = 6
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_bytes_per_second: int | None = None  # the rate cap (a profile's max_download_kbps * 125)
    chunk_bytes: int = 256 * 1024

    def deadline_for(self, size: int) -> float:
        """Overall deadline in seconds for a download of ``size`` bytes."""
        return self.deadline_s if self.deadline_s is not None else 60.0 + size / self.min_rate()

    def min_rate(self) -> float:
        """The minimum throughput actually enforced: at most half the rate cap, so the cap never trips it."""
        cap = self.max_bytes_per_second
        return float(self.min_bytes_per_second if cap is None else min(self.min_bytes_per_second, cap / 2))


@dataclass(frozen=True)
class TransferProgress:
    """A snapshot of one download; rates in bytes per second, times in seconds."""

    name: str
    done_bytes: int
    total_bytes: int
    received_bytes: int  # bytes received over the network in this call (resumed bytes excluded)
    elapsed_s: float

    @property
    def rate_bytes_per_second(self) -> float:
        """Mean receive rate of this call."""
        return self.received_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current rate, or None before any byte arrived."""
        rate = self.rate_bytes_per_second
        return (self.total_bytes - self.done_bytes) / rate if rate > 0 else None


ProgressCallback = Callable[[TransferProgress], None]


class RateLimiter:
    """A token bucket shared by every download of one client (the device's cap), in bytes per second."""

    def __init__(self, bytes_per_second: int | None, *, burst_s: float = 0.05) -> None:
        self.rate = bytes_per_second
        self._capacity = (bytes_per_second or 0) * burst_s
        self._tokens = self._capacity
        self._last = time.monotonic()

    async def consume(self, count: int) -> None:
        """Take ``count`` bytes' worth of tokens, sleeping while the bucket is in debt."""
        if not self.rate:
            return
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= count
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


@dataclass(frozen=True)
class Fetched:
    """A small file fetched with ``fetch_bounded``: its body (None: 304, the caller's copy is current), its ETag."""

    body: bytes | None
    etag: str | None


class _Retry(Exception):
    """An attempt failed in a way another attempt may fix."""

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        slow: bool = False,
        immediate: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after_s = retry_after_s
        self.slow = slow
        self.immediate = immediate


async def download(
    session: aiohttp.ClientSession,
    request: BlobRequest,
    *,
    store: AdapterStore,
    settings: TransferSettings,
    limiter: RateLimiter,
    progress: ProgressCallback | None = None,
) -> CachedAdapter:
    """Download, verify and install ``request`` into ``store`` under its name (resuming any partial)."""
    clock = _Clock(request, progress)
    sink = await _download_once(session, request, store, settings, limiter, clock, fresh=False)
    try:
        return await store.call(sink.finish)  # fsync and rename off the event loop
    except IntegrityError:
        if not sink.mixed:
            raise
    # The resumed bytes came from another version of the file (no validator caught it): fetch it whole, once.
    sink = await _download_once(session, request, store, settings, limiter, clock, fresh=True)
    return await store.call(sink.finish)


async def _download_once(
    session: aiohttp.ClientSession,
    request: BlobRequest,
    store: AdapterStore,
    settings: TransferSettings,
    limiter: RateLimiter,
    clock: _Clock,
    *,
    fresh: bool,
) -> DownloadSink:
    sink = await store.call(DownloadSink, store, request)
    deadline = settings.deadline_for(request.size)
    complete = False
    try:
        if fresh:
            await store.call(sink.restart)
        await asyncio.wait_for(_fetch(session, sink, settings, limiter, clock), timeout=deadline)
        complete = True
    except asyncio.TimeoutError as exc:
        if isinstance(exc, EdgeRtError):
            raise
        raise SlowRetrieval(
            request.url,
            f"not complete within the {deadline:.0f} s deadline ({sink.written} of {request.size} bytes)",
            attempts=clock.attempts,
        ) from exc
    except LengthExceeded:
        await store.call(store.discard, sink.partial)
        raise
    finally:  # queued writes may still be landing: not on the event loop; a failed download gives up its claim
        await store.call(sink.close, release_claim=not complete)
    return sink


def copy_local(
    source: Path, request: BlobRequest, *, store: AdapterStore, progress: ProgressCallback | None = None
) -> CachedAdapter:
    """Copy a local blob (``file://`` or the Hub cache) into ``store``, bounded by size and verified."""
    sink = DownloadSink(store, request)
    clock = _Clock(request, progress)
    try:
        sink.restart()
        try:
            with source.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    sink.append(chunk)
                    sink.writer.wait(keep=4)
                    clock.received += len(chunk)
                    clock.report(sink.written)
        except FileNotFoundError as exc:
            raise RemoteNotFound(request.url, "no such file") from exc
        if sink.written != request.size:
            raise TransferFailed(request.url, f"the file has {sink.written} bytes, the manifest says {request.size}")
    except BaseException:
        sink.close()
        store.discard(sink.partial)
        raise
    return sink.finish()


class _Tally:
    """Counts the attempts of one retried operation."""

    attempts = 0


class _Clock(_Tally):
    """Attempt counter and progress reports of one download."""

    def __init__(self, request: BlobRequest, progress: ProgressCallback | None) -> None:
        self.request = request
        self.progress = progress
        self.started = time.monotonic()
        self.received = 0

    def report(self, done: int) -> None:
        if self.progress is not None:
            self.progress(
                TransferProgress(
                    name=self.request.name,
                    done_bytes=done,
                    total_bytes=self.request.size,
                    received_bytes=self.received,
                    elapsed_s=time.monotonic() - self.started,
                )
            )


async def _with_retries(url: str, settings: TransferSettings, tally: _Tally, attempt: Callable[[], Awaitable[T]]) -> T:
    while True:
        tally.attempts += 1
        try:
            return await attempt()
        except _Retry as retry:
            if tally.attempts >= settings.max_attempts:
                error = SlowRetrieval if retry.slow else TransferFailed
                raise error(url, retry.reason, status=retry.status, attempts=tally.attempts) from retry
            if not retry.immediate:
                await asyncio.sleep(_backoff(settings, tally.attempts, retry.retry_after_s))


async def fetch_bounded(
    session: aiohttp.ClientSession, url: str, *, limit_bytes: int, settings: TransferSettings, etag: str | None = None
) -> Fetched:
    """GET a small file (the manifest) with retries, reading at most ``limit_bytes`` (else ``LengthExceeded``).

    With ``etag`` (from an earlier fetch) the request is conditional: a 304 answer carries no body.
    """

    async def attempt() -> Fetched:
        try:
            async with session.get(url, headers={"If-None-Match": etag} if etag else None) as response:
                _check_failure(response, url)
                if response.status == 304 and etag:
                    return Fetched(body=None, etag=etag)
                if response.status != 200:
                    raise TransferFailed(url, f"unexpected HTTP {response.status}", status=response.status)
                if response.content_length is not None and response.content_length > limit_bytes:
                    raise LengthExceeded(url, limit_bytes=limit_bytes, received_bytes=response.content_length)
                body = bytearray()
                async for piece in response.content.iter_chunked(settings.chunk_bytes):  # to the end of the body
                    body += piece
                    if len(body) > limit_bytes:
                        raise LengthExceeded(url, limit_bytes=limit_bytes, received_bytes=len(body))
                return Fetched(body=bytes(body), etag=response.headers.get("ETag"))
        except UNUSABLE_ANSWERS as exc:
            raise unusable_answer(url, exc) from exc
        except _NETWORK_ERRORS as exc:
            raise _network_retry(exc, "fetching") from exc

    tally = _Tally()
    deadline = settings.deadline_s or MANIFEST_DEADLINE_S  # a trickling or Retry-After-looping CDN gives up here
    try:
        return await asyncio.wait_for(_with_retries(url, settings, tally, attempt), timeout=deadline)
    except asyncio.TimeoutError as exc:
        if isinstance(exc, EdgeRtError):
            raise
        raise SlowRetrieval(url, f"not complete within the {deadline:.0f} s deadline", attempts=tally.attempts) from exc


def _fetch(
    session: aiohttp.ClientSession, sink: DownloadSink, settings: TransferSettings, limiter: RateLimiter, clock: _Clock
) -> Awaitable[None]:
    return _with_retries(sink.request.url, settings, clock, lambda: _attempt(session, sink, settings, limiter, clock))


async def _attempt(
    session: aiohttp.ClientSession, sink: DownloadSink, settings: TransferSettings, limiter: RateLimiter, clock: _Clock
) -> None:
    request = sink.request
    if sink.written == request.size:
        return
    offset = sink.written
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    if offset and sink.partial.validator:
        headers["If-Range"] = sink.partial.validator
    try:
        async with session.get(request.url, headers=headers) as response:
            await _check_status(response, request, offset, sink)
            # The validator lands on disk before the first byte of this response does (the writer thread saves it
            # first), so a resume always has it; the event loop goes straight on reading, since awaiting the disk
            # here would let a cut connection discard bytes aiohttp had already buffered.
            validator = _validator(response)
            saving = (
                None
                if validator == sink.partial.validator
                else sink.writer.before_next_write(
                    functools.partial(sink.store.save_validator, sink.partial, validator)
                )
            )
            try:
                await _receive(response, sink, settings, limiter, clock)
            finally:
                if saving is not None:
                    sink.partial = await asyncio.wrap_future(saving)
    except UNUSABLE_ANSWERS as exc:
        raise unusable_answer(request.url, exc) from exc
    except _NETWORK_ERRORS as exc:
        raise _network_retry(exc, f"at byte {sink.written} of {request.size}") from exc
    if sink.written < request.size:
        raise _Retry(f"the response ended at byte {sink.written} of {request.size}")


_NETWORK_ERRORS = (
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    ConnectionResetError,
    asyncio.TimeoutError,
)


# What aiohttp raises for an answer it cannot take, none of them retried (the server would answer the same again):
# a redirect edge-rt refuses (RedirectBlocked), a redirect loop (TooManyRedirects) or one to a URL aiohttp cannot
# follow (file://, a malformed Location: InvalidURL), a header line past aiohttp's 8 KiB limit (ClientResponseError).
UNUSABLE_ANSWERS = (RedirectBlocked, aiohttp.ClientResponseError, aiohttp.InvalidURL)


def unusable_answer(url: str, exc: BaseException) -> TransferFailed:
    """The typed error for one of ``UNUSABLE_ANSWERS``: ``RedirectRefused`` for redirects, else ``TransferFailed``."""
    if isinstance(exc, RedirectBlocked):
        return exc.error
    if isinstance(exc, aiohttp.TooManyRedirects):
        return RedirectRefused(url, str(exc.request_info.real_url), f"more than {MAX_REDIRECTS} redirects (a loop?)")
    if isinstance(exc, aiohttp.InvalidURL):
        return RedirectRefused(url, str(exc), "only http and https are followed")
    message = exc.message if isinstance(exc, aiohttp.ClientResponseError) else exc
    return TransferFailed(url, f"the server's answer is not usable HTTP ({str(message)[:120]})")


def _network_retry(exc: BaseException, where: str) -> _Retry:
    slow = isinstance(exc, asyncio.TimeoutError)
    return _Retry(f"{'stalled' if slow else 'connection lost'} {where} ({type(exc).__name__}: {exc})", slow=slow)


def _check_failure(response: aiohttp.ClientResponse, url: str) -> None:
    """Raise for the statuses every request treats alike: fail fast on 401/403/404, retry 408/429/5xx."""
    status = response.status
    if status in (401, 403):
        raise TransferFailed(
            url,
            f"HTTP {status}: access refused",
            status=status,
            fix="The CDN wants credentials edge-rt does not send; make the CDN folder public",
        )
    if status == 404:
        raise RemoteNotFound(
            url,
            "HTTP 404: the CDN does not have this file",
            status=404,
            fix="Republish the CDN folder with `edge-rt publish`",
        )
    if status in RETRYABLE_STATUSES:
        raise _Retry(f"HTTP {status}", status=status, retry_after_s=_retry_after(response.headers.get("Retry-After")))


async def _check_status(
    response: aiohttp.ClientResponse, request: BlobRequest, offset: int, sink: DownloadSink
) -> None:
    _check_failure(response, request.url)
    status = response.status
    if status == 416 or (
        status == 206 and response.headers.get("Content-Range") != f"bytes {offset}-{request.size - 1}/{request.size}"
    ):
        await sink.store.call(sink.restart)
        raise _Retry(
            f"HTTP {status} with Content-Range {response.headers.get('Content-Range')!r} for a resume from "
            f"byte {offset}",
            status=status,
            immediate=True,
        )
    if status not in (200, 206):
        raise TransferFailed(request.url, f"unexpected HTTP {status}", status=status)
    if status == 200 and offset:
        await sink.store.call(sink.restart)  # the server ignored the Range or the file changed (If-Range): start over
    length = response.content_length
    if length is not None and sink.written + length > request.size:
        raise LengthExceeded(request.url, limit_bytes=request.size, received_bytes=sink.written + length)
    if status == 206:
        sink.mixed = True


async def _receive(
    response: aiohttp.ClientResponse,
    sink: DownloadSink,
    settings: TransferSettings,
    limiter: RateLimiter,
    clock: _Clock,
) -> None:
    started = time.monotonic()
    received = 0
    min_rate = settings.min_rate()
    async for chunk in response.content.iter_chunked(settings.chunk_bytes):
        sink.append(chunk)
        received += len(chunk)
        clock.received += len(chunk)
        clock.report(sink.written)
        await sink.writer.drain()
        elapsed = time.monotonic() - started
        if elapsed > settings.throughput_grace_s and received / elapsed < min_rate:
            raise _Retry(f"{received / elapsed:.0f} B/s is below the minimum {min_rate:.0f} B/s", slow=True)
        await limiter.consume(len(chunk))


def _validator(response: aiohttp.ClientResponse) -> str | None:
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):  # If-Range needs a strong validator
        return etag
    return response.headers.get("Last-Modified")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - datetime.now(timezone.utc)).total_seconds())


def _backoff(settings: TransferSettings, attempt: int, retry_after_s: float | None) -> float:
    if retry_after_s is not None:  # a hostile or broken CDN's "Retry-After: 86400" must not park the device
        return min(retry_after_s, MAX_RETRY_AFTER_S)
    return random.uniform(0, min(settings.backoff_max_s, settings.backoff_base_s * 2 ** (attempt - 1)))
