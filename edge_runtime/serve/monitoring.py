"""The daemon's observation routes: status (JSON and the HTML page), health and Prometheus metrics."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from aiohttp import web

from edge_runtime.errors import EdgeRtError, InvalidRequest
from edge_runtime.gguf import keys
from edge_runtime.gguf.header import read_header
from edge_runtime.runtime.budget import measured_rss_bytes
from edge_runtime.runtime.versions import AdapterInfo
from edge_runtime.serve import openai_api
from edge_runtime.serve.follower import CdnFollower
from edge_runtime.serve.metrics import CONTENT_TYPE
from edge_runtime.serve.scheduler import Job
from edge_runtime.serve.state import DAEMON, Daemon
from edge_runtime.serve.status import recent_json, render_page

__all__ = ["routes"]

routes = web.RouteTableDef()
STATUS_ADAPTERS = 1000  # adapters listed by one /v1/status answer (?offset= and ?limit= page through the rest)
PAGE_ADAPTERS = 100  # adapters on the HTML page, those on the device first (a 40,000-adapter catalog made it 12 MB)


@routes.get("/v1/status")
async def status(request: web.Request) -> web.Response:
    """What the device is doing: memory plan and RSS, adapters and their states (a page of them: ``?offset=N&limit=M``,
    local ones first), CDN, downloads and the requests waiting for them, the running generations, recent requests."""
    offset, limit = _int_query(request, "offset", 0, 10**9), _int_query(request, "limit", STATUS_ADAPTERS, 10_000)
    return web.json_response(await asyncio.to_thread(_status, request.app[DAEMON], offset=offset, limit=limit))


@routes.get("/")
async def status_page(request: web.Request) -> web.Response:
    """The same facts as a self-refreshing HTML page (no external assets), built and rendered off the event loop."""
    daemon = request.app[DAEMON]
    page = await asyncio.to_thread(lambda: render_page(_status(daemon, offset=0, limit=PAGE_ADAPTERS)))
    return web.Response(text=page, content_type="text/html")


def _int_query(request: web.Request, name: str, default: int, most: int) -> int:
    value = request.query.get(name)
    if value is None:
        return default
    if not value.isdigit() or int(value) > most:
        raise InvalidRequest(f"{name} must be a whole number from 0 to {most}", param=name)
    return int(value)


def _status(daemon: Daemon, *, offset: int, limit: int) -> dict[str, Any]:  # psutil, adapters: off the event loop
    runtime, follower = daemon.runtime, daemon.follower
    downloads = follower.downloads() if follower is not None else {}
    cdn = (
        None
        if follower is None
        else {
            "url": follower.cdn.cdn,
            "offline": follower.cdn.offline,
            "version": follower.version,
            "last_refresh": follower.last_refresh,
            "last_error": follower.last_error,
            "deferred": sorted(follower.deferred),
            "other_base": len(follower.other_base),
        }
    )
    every = sorted(runtime.adapters.list_adapters(), key=lambda a: (a.state == "remote", a.name))
    states = Counter("downloading" if a.name in downloads else a.state for a in every)
    adapters = [
        _adapter(openai_api.adapter_json(a, downloads), follower, _description(daemon, a))
        for a in every[offset : offset + limit]
    ]
    running = daemon.scheduler.running
    return {
        "model": daemon.base_id,
        "profile": runtime.profile.name,
        "uptime_s": time.time() - daemon.started,
        "queued": daemon.scheduler.queued,
        "plan": runtime.plan.as_dict(),
        "rss_bytes": measured_rss_bytes(),
        "parallel": runtime.engine.parallel,
        "last_batch_size": runtime.engine.last_batch_size,
        "last_batch_rows": runtime.engine.last_batch_rows,
        "resident_adapter_bytes": runtime.adapters.resident_bytes,
        "adapters_total": len(every),
        "adapter_states": dict(sorted(states.items())),
        "adapters_offset": offset,
        "adapters": adapters,
        "waiting_for_downloads": 0 if follower is None else sum(follower.waiting.values()),
        "running": [_running(job) for job in running],
        "cdn": cdn,
        "recent": recent_json(daemon.recent),
        "compute": runtime.compute_status(),
    }


def _description(daemon: Daemon, adapter: AdapterInfo) -> str | None:
    """The ``general.description`` of a file on the device (read once per sha256), None without a file."""
    if adapter.path is None:
        return None
    if adapter.sha256 not in daemon.descriptions:
        try:
            found = read_header(adapter.path).value(keys.DESCRIPTION, "")
        except (OSError, EdgeRtError):  # replaced or removed meanwhile: the next page reads it again
            return None
        daemon.descriptions[adapter.sha256] = str(found)
    return daemon.descriptions[adapter.sha256] or None


def _adapter(body: dict[str, Any], follower: CdnFollower | None, description: str | None) -> dict[str, Any]:
    """An adapter's API facts plus its description (the file's, else the manifest's), and what the follower knows:
    its last update, who waits for it."""
    if description:
        body["description"] = description
    if follower is None:
        return body
    name = body["name"]
    if "description" not in body and name in follower.descriptions:
        body["description"] = follower.descriptions[name]
    if name in follower.updated:
        when, replaced, _ = follower.updated[name]
        body |= {"updated_at": when, "replaced_sha256": replaced or None}
    if body["state"] == "downloading":
        progress = follower.downloads().get(name)
        body |= {
            "waiting_requests": follower.waiting.get(name, 0),
            "download_bytes_per_second": None if progress is None else round(progress.rate_bytes_per_second),
            "download_eta_s": None if progress is None or progress.eta_s is None else round(progress.eta_s, 1),
        }
    return body


def _running(job: Job) -> dict[str, Any]:
    """A generation running now: what it runs under, its tokens so far and their rate."""
    elapsed = time.monotonic() - job.started if job.started is not None else 0.0
    return {
        "adapters": "+".join(a.name for a in job.adapters) or "base",
        "prompt_tokens": len(job.prompt),
        "generated_tokens": job.generated,
        "seconds": round(elapsed, 2),
        "tokens_per_second": round(job.generated / elapsed, 2) if elapsed > 0 else None,
    }


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Liveness: the model is loaded; how many requests wait for the engine, are being read or wait to be read, and
    whether completions are shed for memory (a load balancer may send elsewhere meanwhile)."""
    daemon = request.app[DAEMON]
    intake = daemon.intake
    return web.json_response(
        {
            "status": "ok",
            "model": daemon.base_id,
            "queued": daemon.scheduler.queued,
            "reading": intake.reading,
            "waiting_to_read": intake.waiting,
            "shedding": intake.over_budget,
            "profile": daemon.runtime.profile.name,
        }
    )


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    return web.Response(body=request.app[DAEMON].metrics.render(), headers={"Content-Type": CONTENT_TYPE})
