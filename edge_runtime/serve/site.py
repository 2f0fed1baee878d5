"""Serving the app on a TCP port with a bound on open connections, until SIGINT or SIGTERM.

aiohttp accepts every connection, and each may hold up to ~384 KiB its client pushed before aiohttp paused reading
(a body sent to a route that never reads one, or a request waiting for a read slot): 300 connections from one local
process added ~100 MiB to a 300 MiB daemon. Past ``max_connections`` open ones, a new connection is answered 503
(with Retry-After) and closed before anything is read from it, so the memory plan can count every connection; an
idle connection (keep-alive, or one that never sent a request) is closed to make room first, so idle sockets cannot
lock clients out.

``run`` does what ``aiohttp.web.run_app`` does for one host and port (a runner that turns SIGINT and SIGTERM into a
graceful exit, the shutdown timeout, the loop's cleanup) with a site whose protocol factory applies the bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from aiohttp import web

from edge_runtime.serve import openai_api

__all__ = ["BoundedSite", "run"]

log = logging.getLogger(__name__)

_REFUSAL_BODY = json.dumps(
    openai_api.error_body(
        "the daemon has as many connections open as it allows (serve --max-connections): retry shortly, or reuse a "
        "connection (HTTP keep-alive)",
        "server_overloaded",
        code="too_many_connections",
    )
).encode()
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY
)


class _Refusal(asyncio.Protocol):
    """A connection over the bound: answered 503 and closed; whatever the client sends is dropped unread."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        transport.write(_REFUSAL)
        transport.close()


KEEPALIVE_TIMEOUT_S = 75.0  # an idle connection is closed after this (aiohttp's run_app default; its runner's is 3630)
IDLE_GRACE_S = 2.0  # a connection younger than this is never closed to make room: it may be about to send


class BoundedSite(web.TCPSite):
    """A TCP site that bounds open connections at ``max_connections``: at the bound, the oldest connection with no
    request in progress (idle keep-alive, or one that never sent a request) is closed to make room; when every one is
    busy, the new connection is answered 503 and closed at once."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        max_connections: int,
        on_refused: Callable[[], object] = lambda: None,
    ) -> None:
        super().__init__(runner, host, port)
        self.max_connections = max_connections
        self._on_refused = on_refused
        self.refused = 0  # connections answered 503 since start
        self._accepting = 0  # handed to asyncio, connection_made not yet called (a burst is accepted in one go)
        self._opened: dict[web.RequestHandler, float] = {}  # when each open connection was accepted (loop time)

    async def start(self) -> None:
        """Listen, as ``TCPSite.start`` does, through the bounding protocol factory."""
        await web.BaseSite.start(self)  # registers the site with its runner
        server, loop = self._runner.server, asyncio.get_running_loop()
        assert server is not None

        def accepted() -> None:
            self._accepting -= 1

        def connection() -> asyncio.BaseProtocol:
            if len(server.connections) + self._accepting >= self.max_connections and not self._close_idle(server):
                self.refused += 1
                self._on_refused()
                if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                    log.warning(
                        "refused a connection (%d so far): %d open, the most --max-connections allows",
                        self.refused,
                        self.max_connections,
                    )
                return _Refusal()
            # asyncio calls connection_made (which puts the handler in server.connections) with call_soon after
            # this: a callback queued now runs just before it, so the handler is counted in one place at a time.
            self._accepting += 1
            loop.call_soon(accepted)
            handler = server()
            self._opened[handler] = loop.time()
            return handler

        self._server = await loop.create_server(
            connection, self._host, self._port, backlog=self._backlog, reuse_address=self._reuse_address
        )

    def _close_idle(self, server: web.Server) -> bool:
        """Close the oldest connection with no request in progress, opened at least IDLE_GRACE_S ago; False when
        there is none (every connection is busy or new)."""
        open_now = server.connections  # in the order they were made
        cutoff = asyncio.get_running_loop().time() - IDLE_GRACE_S
        alive = set(open_now)  # forget closed connections, but not those still being accepted (not yet open)
        self._opened = {h: t for h, t in self._opened.items() if h in alive or t > cutoff}
        for handler in open_now:
            # aiohttp marks a request in progress only privately; without the mark, nothing counts as idle.
            opened = self._opened.get(handler)
            if opened is not None and opened <= cutoff and not getattr(handler, "_request_in_progress", True):
                handler.force_close()  # its transport closes now: the client sees the end of an idle connection
                del self._opened[handler]
                return True
        return False


def run(
    app: web.Application,
    *,
    host: str,
    port: int,
    max_connections: int,
    shutdown_timeout: float,
    on_refused: Callable[[], object] = lambda: None,
    **runner_args: Any,
) -> None:
    """Serve ``app`` on ``host``:``port`` until SIGINT or SIGTERM, then shut it down gracefully; ``on_refused`` is
    called for each connection refused over ``max_connections``."""
    loop = asyncio.new_event_loop()
    main = loop.create_task(
        _serve(
            app,
            host=host,
            port=port,
            max_connections=max_connections,
            shutdown_timeout=shutdown_timeout,
            on_refused=on_refused,
            **runner_args,
        )
    )
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)  # the graceful shutdown: running requests get their grace
        except (web.GracefulExit, KeyboardInterrupt):
            log.warning("a second signal during the graceful shutdown: stopping now, running requests are cut")
        finally:
            rest = asyncio.all_tasks(loop)
            for task in rest:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


async def _serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    max_connections: int,
    shutdown_timeout: float,
    on_refused: Callable[[], object],
    **runner_args: Any,
) -> None:
    runner = web.AppRunner(
        app,
        handle_signals=True,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        **runner_args,
    )
    await runner.setup()
    try:
        await BoundedSite(runner, host, port, max_connections=max_connections, on_refused=on_refused).start()
        while True:
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()
