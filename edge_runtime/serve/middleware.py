"""What every request passes through, outermost first: the access log, errors as JSON, the browser guard (CSRF and
DNS rebinding) and the API key."""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from edge_runtime.errors import AdapterNotFound, BodyTimeout, EdgeRtError, Forbidden, Unauthorized
from edge_runtime.names import printable
from edge_runtime.serve.responses import error_response, public_message
from edge_runtime.serve.state import APPLIED, DAEMON, ENDED_WITH, LOOPBACK_NAMES, REQUESTED, TOKENS
from edge_runtime.serve.status import RecentRequest

__all__ = ["MIDDLEWARES"]

log = logging.getLogger("edge_runtime.serve.app")  # the daemon's access log keeps its logger name
CLIENT_CLOSED_REQUEST = 499  # the status nginx logs for a client that left before the answer (metrics and log only)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_COMPLETIONS = ("/v1/completions", "/v1/chat/completions")
_QUIET = ("/", "/v1/status", "/health", "/metrics", "/favicon.ico")  # polled: kept out of the recent-requests table
_LOOPBACK_HOSTS = LOOPBACK_NAMES | {"[::1]"}  # as a URL spells an IPv6 host
_ASKED_FOR = web.RequestKey("asked_for", str)  # an unknown adapter's name: in the log line, never a metric label


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log line per request, rejected ones included; completions are counted by adapter and status."""
    started, status = time.monotonic(), CLIENT_CLOSED_REQUEST
    try:
        response = await handler(request)
        status = request.get(ENDED_WITH, response.status)  # a stream that ended in an error counts as that error
        return response
    finally:
        daemon, requested = request.app[DAEMON], request.get(REQUESTED, "-")
        if request.path in _COMPLETIONS:
            daemon.metrics.requests.labels(requested if requested != "-" else "unparsed", str(status)).inc()
        prompt, completion = request.get(TOKENS, (0, 0))
        path = printable(request.path)  # %0a in a path would forge a log line
        requested = printable(request.get(_ASKED_FOR, requested))
        if request.path not in _QUIET and status != Unauthorized.http_status:  # no stranger pushes real requests out
            daemon.recent.append(
                RecentRequest(
                    at=time.time(),
                    method=printable(request.method),
                    path=path,
                    status=status,
                    requested=requested,
                    ran=request.get(APPLIED, "-"),
                    ms=(time.monotonic() - started) * 1000,
                )
            )
        log.log(
            logging.DEBUG if request.path == "/health" else logging.INFO,
            "%s %s status=%d requested=%s ran=%s prompt=%d completion=%d %.0fms",
            printable(request.method),
            path,
            status,
            requested,
            request.get(APPLIED, "-"),
            prompt,
            completion,
            (time.monotonic() - started) * 1000,
        )


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as OpenAI-shaped JSON with the status its class declares."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:
        if isinstance(exc, AdapterNotFound):  # the access line names what was asked for
            request[_ASKED_FOR] = exc.name
        if not isinstance(exc, EdgeRtError):
            log.exception("unexpected error serving %s %s", printable(request.method), printable(request.path))
        elif public_message(str(exc)) != str(exc):  # the client gets the file names only: the log keeps the paths
            log.info(
                "%s %s answered %d: %s",
                printable(request.method),
                printable(request.path),
                exc.http_status,
                printable(str(exc)),
            )
        response = error_response(exc)
        if isinstance(exc, BodyTimeout) and request.transport is not None:  # the rest of a stalled body is never
            await response.prepare(request)  # read: answer, then close (aiohttp would linger reading it)
            await response.write_eof()
            request.transport.close()
        return response


@web.middleware
async def browser_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse what a web page can make a browser send: a state-changing request from another site's origin (CSRF
    with a 'simple' text/plain POST needs no preflight), or any request under a host name that only resolves here
    by DNS rebinding."""
    origin = request.headers.get("Origin")
    if origin is not None and request.method not in ("GET", "HEAD") and urlsplit(origin).netloc != request.host:
        raise Forbidden(f"a request from the origin {origin!r} (not this daemon's page)")
    if request.app[DAEMON].config.loopback_only and (request.url.host or "") not in _LOOPBACK_HOSTS:
        raise Forbidden(f"the host name {request.host!r}: the daemon listens on loopback only")
    return await handler(request)


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With an API key, every route but /health needs it: as a Bearer token, or as a browser's Basic password."""
    key = request.app[DAEMON].config.api_key
    if key and request.path != "/health":
        given = request.headers.get("Authorization", "")  # bytes that are not UTF-8 arrive as surrogate escapes
        password = _basic_password(given)  # a browser on the status page: any user, the key as password
        if not (
            hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {key}".encode())
            or (password is not None and hmac.compare_digest(password.encode("utf-8", "surrogateescape"), key.encode()))
        ):
            raise Unauthorized()
    return await handler(request)


def _basic_password(header: str) -> str | None:
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")[2]
    except (ValueError, UnicodeDecodeError):
        return None


MIDDLEWARES = [access_log, errors, browser_guard, auth]
