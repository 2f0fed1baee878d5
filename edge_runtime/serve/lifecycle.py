"""What starts and stops with the daemon, in order: the scheduler, the request pool, the CDN follower, the adapters
preloaded before serving; and what a shutdown does to queued and running requests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from edge_runtime.names import validate_name
from edge_runtime.serve.state import DAEMON, SHUTDOWN_GRACE_S

__all__ = ["drop_queued", "follower", "preload", "request_work", "scheduler"]

log = logging.getLogger("edge_runtime.serve.app")  # the daemon's start/stop lines keep their logger name


async def scheduler(app: web.Application) -> AsyncIterator[None]:
    """Serve the queue for the app's lifetime."""
    app[DAEMON].scheduler.start()
    yield
    await app[DAEMON].scheduler.stop()


async def request_work(app: web.Application) -> AsyncIterator[None]:
    """Shut the request pool down at the end: requests still tokenizing finish before the runtime (and the
    vocabulary they read) is freed."""
    yield
    await asyncio.to_thread(app[DAEMON].request_work.shutdown, wait=True, cancel_futures=True)


async def follower(app: web.Application) -> AsyncIterator[None]:
    """Follow the CDN for the app's lifetime (when the daemon has one)."""
    cdn_follower = app[DAEMON].follower
    if cdn_follower is None:
        yield
        return
    await cdn_follower.start()
    yield
    await cdn_follower.close()


async def preload(app: web.Application) -> None:
    """Make ``--preload`` adapters resident (pulled first when only remote); runs after every cleanup context
    started, so the CDN's adapters are known by then."""
    daemon = app[DAEMON]
    for name in daemon.config.preload:
        await daemon.pull_remote([validate_name(name)])
        await asyncio.to_thread(daemon.runtime.adapters.ensure_resident, name)


async def drop_queued(app: web.Application) -> None:
    """On shutdown, before aiohttp waits for handlers: queued requests get a 503 now, not a dropped connection.

    The running generations (up to ``parallel``) get SHUTDOWN_GRACE_S to finish, then stop at their next step and
    their answers end cleanly (finish_reason "cancelled"), before aiohttp's own timeout would cut the connections
    mid-response.
    """
    daemon = app[DAEMON]
    queue = daemon.scheduler
    daemon.stopping = True
    running = len(queue.running)
    log.info(
        "shutting down: %d queued requests answered 503; %s %g s to finish",
        queue.queued,
        "1 running generation gets" if running == 1 else f"{running} running generations get",
        SHUTDOWN_GRACE_S,
    )
    queue.drop_pending()
    if daemon.follower is not None:  # requests waiting for a download get a 503 now; the partial stays
        daemon.follower.stop_pulls()
    asyncio.get_running_loop().call_later(SHUTDOWN_GRACE_S, queue.cancel_running)
