"""Redirects from a CDN: loops, other schemes and addresses a device must not be sent to end in typed errors."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from edge_runtime.distribution.client import CdnClient, SyncSettings
from edge_runtime.distribution.http import RedirectBlocked, _check_redirect, address_kinds
from edge_runtime.distribution.transfer import TransferSettings
from edge_runtime.errors import RedirectRefused

pytestmark = pytest.mark.asyncio
FAST = SyncSettings(transfer=TransferSettings(connect_timeout_s=2.0, gap_timeout_s=2.0, backoff_base_s=0.01,
                                              backoff_max_s=0.05, max_attempts=2))


async def _redirecting(aiohttp_server: Callable[..., Awaitable[TestServer]], location: str) -> tuple[TestServer,
                                                                                                      list[str]]:
    """A server on 127.0.0.1 that answers every path with a 302 to ``location`` (``{self}`` is its own path)."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path)
        raise web.HTTPFound(location.replace("{self}", request.path))

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    return await aiohttp_server(app), seen


@pytest.mark.parametrize("location, words", [
    ("{self}", "more than 10 redirects"),  # a loop: was a traceback from `sync` and a 500 from the daemon
    ("file:///etc/passwd", "only http and https"),
    ("http://169.254.169.254/latest/meta-data/manifest.json", "link-local"),  # was followed
])
async def test_a_redirect_edge_rt_does_not_follow_is_a_typed_refusal(
        tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]], location: str, words: str) -> None:
    server, seen = await _redirecting(aiohttp_server, location)
    async with CdnClient(str(server.make_url("/cdn")), cache_dir=tmp_path / "cache", offline=False,
                         sync_settings=FAST) as client:
        with pytest.raises(RedirectRefused) as refused:
            await client.fetch_manifest()
    assert words in str(refused.value) and refused.value.exit_code == 8 and refused.value.attempts == 1
    assert seen[0] == "/cdn/manifest.json"
    assert len(seen) == (10 if location == "{self}" else 1)  # nothing retried; nothing sent past the refusal


async def test_a_public_origin_may_not_redirect_to_a_loopback_or_private_address() -> None:
    def redirect(origin: str, location: str) -> SimpleNamespace:
        return SimpleNamespace(url=URL(origin), response=SimpleNamespace(headers={"Location": location}))

    assert await address_kinds("8.8.8.8") == {"public"} and await address_kinds("::ffff:10.1.2.3") == {"private"}
    for location in ("http://127.0.0.1:8080/x", "http://192.168.1.1/x", "http://[::1]/x", "https://10.0.0.7/x"):
        with pytest.raises(RedirectBlocked) as blocked:
            await _check_redirect(None, None, redirect("https://93.184.215.14/cdn/manifest.json", location))  # type: ignore[arg-type]
        assert "public origin may not send a device to a loopback or private address" in str(blocked.value.error)
    # A CDN on the device's own LAN (or loopback) may redirect within it, and anything may redirect to public hosts.
    await _check_redirect(None, None, redirect("http://192.168.1.5/cdn/x", "http://192.168.1.6/x"))  # type: ignore[arg-type]
    await _check_redirect(None, None, redirect("http://127.0.0.1:9/x", "https://93.184.215.15/x"))  # type: ignore[arg-type]


async def test_sync_through_a_redirect_loop_exits_8_without_a_traceback(
        tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]) -> None:
    server, _ = await _redirecting(aiohttp_server, "{self}")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge_runtime.cli", "sync", "--cdn", str(server.make_url("/cdn")), "--all", "--cache-dir",
        str(tmp_path / "cache"), stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        env=os.environ | {"HF_HUB_OFFLINE": "0", "EDGE_RT_HOME": str(tmp_path / "home")})
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 8, stderr
    assert b"more than 10 redirects" in stderr and b"Traceback" not in stderr
