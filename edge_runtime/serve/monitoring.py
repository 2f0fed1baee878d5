"""The daemon's observation routes: status (JSON and the HTML page), health and Prometheus metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from edge_runtime.runtime.budget import measured_rss_bytes
from edge_runtime.serve import openai_api
from edge_runtime.serve.metrics import CONTENT_TYPE
from edge_runtime.serve.state import DAEMON, Daemon
from edge_runtime.serve.status import recent_json, render_page

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.get("/v1/status")
async def status(request: web.Request) -> web.Response:
    """What the device is doing: memory plan and RSS, adapters and their states, CDN, recent requests."""
    return web.json_response(await asyncio.to_thread(_status, request.app[DAEMON]))


@routes.get("/")
async def status_page(request: web.Request) -> web.Response:
    """The same facts as a self-refreshing HTML page (no external assets)."""
    page = render_page(await asyncio.to_thread(_status, request.app[DAEMON]))
    return web.Response(text=page, content_type="text/html")


def _status(daemon: Daemon) -> dict[str, Any]:  # psutil and the adapter list: off the event loop
    runtime, follower = daemon.runtime, daemon.follower
    downloads = follower.downloads() if follower is not None else {}
    cdn = None if follower is None else {"url": follower.cdn.cdn, "offline": follower.cdn.offline,
                                         "version": follower.version, "last_refresh": follower.last_refresh,
                                         "last_error": follower.last_error, "deferred": sorted(follower.deferred)}
    return {"model": daemon.base_id, "profile": runtime.profile.name, "uptime_s": time.time() - daemon.started,
            "queued": daemon.scheduler.queued, "plan": runtime.plan.as_dict(), "rss_bytes": measured_rss_bytes(),
            "parallel": runtime.engine.parallel, "running": daemon.scheduler.running_json(time.monotonic()),
            "last_batch_size": runtime.engine.last_batch_size,
            "resident_adapter_bytes": runtime.adapters.resident_bytes,
            "adapters": [openai_api.adapter_json(a, downloads) for a in runtime.adapters.list_adapters()], "cdn": cdn,
            "recent": recent_json(daemon.recent)}


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Liveness: the model is loaded; how many requests wait for the engine, are being read or wait to be read, and
    whether completions are shed for memory (a load balancer may send elsewhere meanwhile)."""
    daemon = request.app[DAEMON]
    intake = daemon.intake
    return web.json_response({"status": "ok", "model": daemon.base_id, "queued": daemon.scheduler.queued,
                              "reading": intake.reading, "waiting_to_read": intake.waiting,
                              "shedding": intake.over_budget, "profile": daemon.runtime.profile.name})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    return web.Response(body=request.app[DAEMON].metrics.render(), headers={"Content-Type": CONTENT_TYPE})
