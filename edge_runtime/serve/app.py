"""The daemon's aiohttp application, composed: middleware, route tables, and what starts and stops with it.

Handlers live by concern (``completions``, ``admin``, ``monitoring``) and reach the daemon's state through
``state.DAEMON``, never through this module: only the wiring (``daemon.py``), embedders and tests import it.
"""

from __future__ import annotations

from aiohttp import web

from edge_runtime.distribution.client import CdnClient
from edge_runtime.runtime.budget import READ_BUFFER_BYTES
from edge_runtime.runtime.core import Runtime
from edge_runtime.serve import admin, completions, lifecycle, monitoring
from edge_runtime.serve.middleware import MIDDLEWARES
from edge_runtime.serve.state import DAEMON, Daemon, ServerConfig

__all__ = ["create_app"]


def create_app(config: ServerConfig, runtime: Runtime, *, cdn: CdnClient | None = None) -> web.Application:
    """The aiohttp application serving ``runtime`` (and pulling adapters from ``cdn`` on demand when given)."""
    daemon = Daemon.build(config, runtime, cdn=cdn)
    app = web.Application(
        client_max_size=daemon.max_body_bytes, handler_args={"read_bufsize": READ_BUFFER_BYTES}, middlewares=MIDDLEWARES
    )
    app[DAEMON] = daemon
    for table in (completions.routes, admin.routes, monitoring.routes):
        app.add_routes(table)
    app.cleanup_ctx.extend([lifecycle.scheduler, lifecycle.request_work, lifecycle.follower])
    app.on_shutdown.append(lifecycle.drop_queued)
    app.on_startup.append(lifecycle.preload)  # after every cleanup_ctx start: CDN adapters are known by then
    app.cleanup_ctx.append(admin.rescan_on_sighup)  # always: an unhandled SIGHUP would end the daemon
    return app
