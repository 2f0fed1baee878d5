"""The daemon's admin routes: models, adapters (list, load, evict, vLLM's load/unload), CDN sync, and the rescan
of ``--adapters-dir`` (SIGHUP). Observation routes are in ``monitoring.py``, completions in ``completions.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from edge_runtime.errors import InvalidRequest
from edge_runtime.names import validate_name
from edge_runtime.runtime.adapters import AdapterInfo
from edge_runtime.serve.intake import SMALL_BODY_BYTES
from edge_runtime.serve.openai_api import adapter_json
from edge_runtime.serve.state import DAEMON, Daemon

__all__ = ["rescan", "rescan_on_sighup", "routes"]

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


async def rescan(daemon: Daemon) -> tuple[list[str], dict[str, str]]:
    """Register the files added to ``--adapters-dir`` since start (a changed file becomes its adapter's next
    version) and forget idle adapters whose file was deleted from it; return the names added and, by file,
    refusals."""
    folder, manager = daemon.config.adapters_dir, daemon.runtime.adapters
    if folder is None:
        log.info("nothing to rescan: the daemon has no --adapters-dir")
        return [], {}
    known = {a.name: a.sha256 for a in manager.list_adapters()}
    added, refused = await asyncio.to_thread(manager.add_directory, folder)
    new = [a.name for a in added if a.name not in known]
    for info in added:
        if info.name in known and known[info.name] != info.sha256:
            log.info("adapter %s: now serving version %s from %s", info.name, info.sha256[:12], info.path)
    if daemon.follower is not None:  # the operator's files win: a name now served from --adapters-dir stops
        for info in added:  # following the CDN
            daemon.follower.unfollow(info.name)
    gone = [
        a.name
        for a in manager.list_adapters()
        if a.path is not None and a.path.parent == folder and not a.path.exists() and manager.forget(a.name)
    ]
    if gone:
        log.info("forgot %s: deleted from %s", ", ".join(gone), folder)
    for file_name, error in refused.items():
        log.warning("not serving %s: %s", folder / file_name, error)
    log.info("rescanned %s: %d new adapters%s", folder, len(new), f" ({', '.join(new)})" if new else "")
    return new, {name: str(error) for name, error in refused.items()}


async def rescan_on_sighup(app: web.Application) -> AsyncIterator[None]:
    """Rescan ``--adapters-dir`` on SIGHUP for the app's lifetime (``systemctl reload``)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[tuple[list[str], dict[str, str]]]] = set()

    def on_hangup() -> None:
        task = asyncio.ensure_future(rescan(app[DAEMON]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        yield
        return
    yield
    loop.remove_signal_handler(signal.SIGHUP)


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    """The base model and every known adapter, as OpenAI model objects."""
    daemon = request.app[DAEMON]
    base = daemon.base_id
    data = [{"id": base, "object": "model", "created": 0, "owned_by": "edge-rt"}]
    data += [
        {"id": name, "object": "model", "created": 0, "owned_by": "edge-rt", "parent": base}
        for name in daemon.runtime.adapters.names()
    ]
    return web.json_response({"object": "list", "data": data})


@routes.get("/v1/adapters")
async def adapters(request: web.Request) -> web.Response:
    """Every known adapter with its size, digest, state, pin and last use."""
    daemon = request.app[DAEMON]
    downloads = daemon.follower.downloads() if daemon.follower is not None else {}
    return web.json_response(
        {"object": "list", "data": [adapter_json(a, downloads) for a in daemon.runtime.adapters.list_adapters()]}
    )


@routes.post("/v1/adapters/{name}/load")
async def load_adapter(request: web.Request) -> web.Response:
    """Make an adapter resident now (it may evict others); a file new in ``--adapters-dir`` is registered first."""
    return web.json_response(adapter_json(await _load(request.app[DAEMON], validate_name(request.match_info["name"]))))


async def _load(daemon: Daemon, name: str) -> AdapterInfo:
    if not daemon.runtime.adapters.is_known(name):
        await rescan(daemon)
    await daemon.pull_remote([name])
    return await asyncio.to_thread(daemon.runtime.adapters.ensure_resident, name)


@routes.post("/v1/load_lora_adapter")
async def vllm_load(request: web.Request) -> web.Response:
    """vLLM's route: ``{"lora_name": ..., "lora_path": ...}``; the path must be the adapter's file in
    ``--adapters-dir`` (no other file of the device is ever opened on a client's word)."""
    daemon = request.app[DAEMON]
    body = await read_json(request)
    name = validate_name(_field(body, "lora_name"))
    path = body.get("lora_path") if isinstance(body, dict) else None
    folder = daemon.config.adapters_dir
    if path is not None and folder is None:
        raise InvalidRequest("this daemon has no --adapters-dir: load adapters by lora_name", param="lora_path")
    try:
        inside = folder is not None and (folder / str(path)).resolve() == (folder / f"{name}.gguf").resolve()
    except (ValueError, OSError):  # a NUL byte, a path too long
        inside = False
    if path is not None and not inside:  # a relative lora_path is taken in --adapters-dir
        raise InvalidRequest(
            "lora_path must be NAME.gguf in the daemon's --adapters-dir (edge-rt loads adapters by name)",
            param="lora_path",
        )
    info = await _load(daemon, name)
    return web.json_response({"message": f"Success: LoRA adapter '{name}' added successfully."} | adapter_json(info))


@routes.post("/v1/unload_lora_adapter")
async def vllm_unload(request: web.Request) -> web.Response:
    """vLLM's route: ``{"lora_name": ...}`` frees the adapter's memory (it stays known, on disk)."""
    name = validate_name(_field(await read_json(request), "lora_name"))
    manager = request.app[DAEMON].runtime.adapters
    evicted = await asyncio.to_thread(manager.evict, name)
    return web.json_response(
        {"message": f"Success: LoRA adapter '{name}' removed successfully.", "evicted": evicted}
        | adapter_json(manager.info(name))
    )


def _field(body: Any, key: str) -> str:
    value = body.get(key) if isinstance(body, dict) else None
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a string", param=key)
    return value


@routes.delete("/v1/adapters/{name}")
async def evict_adapter(request: web.Request) -> web.Response:
    """Evict an adapter from memory (it stays cached on disk); in-use adapters stay until their requests end."""
    name = validate_name(request.match_info["name"])
    manager = request.app[DAEMON].runtime.adapters
    evicted = await asyncio.to_thread(manager.evict, name)
    return web.json_response(adapter_json(manager.info(name)) | {"evicted": evicted})


@routes.post("/v1/sync")
async def sync(request: web.Request) -> web.Response:
    """Refresh the CDN manifest now; with ``?wait=true`` answer once the updates it started are done."""
    daemon = request.app[DAEMON]
    follower = daemon.follower
    if follower is None:
        raise InvalidRequest("this daemon has no CDN: start it with --cdn URL")
    report = await follower.refresh()
    if request.query.get("wait", "").lower() in ("1", "true", "yes"):
        await follower.settle()
    body = dataclasses.asdict(report)
    body["adapters"] = {a.name: a.sha256 for a in daemon.runtime.adapters.list_adapters()}
    return web.json_response(body)


async def read_json(request: web.Request) -> Any:
    """An admin route's JSON body (at most 64 KiB: names and paths), read in an intake slot within the timeout."""
    daemon = request.app[DAEMON]
    async with daemon.intake.slot():
        return await daemon.intake.read_json(request, daemon.request_work, max_bytes=SMALL_BODY_BYTES)
