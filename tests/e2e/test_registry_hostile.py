"""A hostile registry on 127.0.0.1 (an aiohttp server playing one): every answer edge-rt cannot use is a typed error
naming the URL, never a Python traceback, and nothing lands in the cache."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from edge_runtime.distribution.client import CdnClient
from edge_runtime.distribution.oci import parse_reference
from edge_runtime.distribution.registry import Registry
from edge_runtime.distribution.transfer import TransferSettings
from edge_runtime.errors import EdgeRtError, InvalidManifest, RedirectRefused, TransferFailed

Server = Callable[..., Awaitable[TestServer]]
NESTED = b"[" * 100_000  # json.loads raises RecursionError on it
HUGE_INT = b'{"schemaVersion": ' + b"9" * 5000 + b"}"  # json.loads raises a plain ValueError (int digit limit)


def _app(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def _sync(tmp_path: Path, port: int) -> EdgeRtError:
    async with CdnClient(f"oci://127.0.0.1:{port}/fleet/adapters", cache_dir=tmp_path / "cache",
                         offline=False) as client:
        with pytest.raises(EdgeRtError) as caught:
            await client.sync(["a"])
    assert not (tmp_path / "cache" / "blobs").exists() or not any((tmp_path / "cache" / "blobs").iterdir())
    return caught.value


@pytest.mark.asyncio
@pytest.mark.parametrize("body", [NESTED, HUGE_INT], ids=["nested", "huge-int"])
async def test_a_tag_manifest_that_breaks_the_json_parser_is_an_invalid_manifest(
        tmp_path: Path, aiohttp_server: Server, body: bytes) -> None:
    async def registry(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/vnd.oci.image.manifest.v1+json")

    server = await aiohttp_server(_app(registry))
    error = await _sync(tmp_path, server.port)
    assert isinstance(error, InvalidManifest) and error.exit_code == 9
    assert "/v2/fleet/adapters/manifests/edge-rt-manifest" in str(error) and "not JSON" in str(error)


@pytest.mark.asyncio
@pytest.mark.parametrize("body", [NESTED[:60_000], b'{"token": ' + b"9" * 5000 + b"}"], ids=["nested", "huge-int"])
async def test_a_token_that_breaks_the_json_parser_is_a_typed_error(
        tmp_path: Path, aiohttp_server: Server, body: bytes) -> None:
    seen: list[str] = []

    async def registry(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        if request.path == "/token":
            return web.Response(body=body)
        realm = f"http://127.0.0.1:{request.url.port}/token"
        return web.Response(status=401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="r"'})

    server = await aiohttp_server(_app(registry))
    error = await _sync(tmp_path, server.port)
    assert isinstance(error, TransferFailed) and "holds no token" in error.reason
    assert seen == ["/v2/fleet/adapters/manifests/edge-rt-manifest", "/token"]


@pytest.mark.asyncio
async def test_a_redirect_loop_is_one_typed_error_not_retried(tmp_path: Path, aiohttp_server: Server) -> None:
    hits: list[str] = []

    async def registry(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        raise web.HTTPFound(request.path)

    server = await aiohttp_server(_app(registry))
    error = await _sync(tmp_path, server.port)
    assert isinstance(error, RedirectRefused) and error.exit_code == 8 and "more than 10 redirects" in error.reason
    assert len(hits) == 10  # aiohttp gives up at its 10-redirect limit: one attempt, not six (60 requests)


@pytest.mark.asyncio
async def test_a_registry_error_body_that_breaks_the_json_parser_still_gives_the_status(
        aiohttp_server: Server) -> None:
    async def registry(request: web.Request) -> web.StreamResponse:
        return web.Response(status=400, body=NESTED[:4096], content_type="application/json")

    server = await aiohttp_server(_app(registry))
    target = Registry(parse_reference(f"oci://127.0.0.1:{server.port}/fleet/adapters"), transfer=TransferSettings())
    try:
        with pytest.raises(TransferFailed) as caught:
            await target.put_manifest("v1", b"{}")
    finally:
        await target.close()
    assert caught.value.status == 400 and caught.value.reason == "cannot store the manifest v1: HTTP 400"


@pytest.mark.asyncio
@pytest.mark.parametrize("token", ["a\x00b", "t\u00f6k", "a b"], ids=["nul", "non-ascii", "space"])
async def test_a_token_that_cannot_be_a_header_is_a_typed_error(
        tmp_path: Path, aiohttp_server: Server, token: str) -> None:
    async def registry(request: web.Request) -> web.StreamResponse:
        if request.path == "/token":
            return web.json_response({"token": token})
        if request.headers.get("Authorization"):
            return web.Response(status=404)
        realm = f"http://127.0.0.1:{request.url.port}/token"
        return web.Response(status=401, headers={"WWW-Authenticate": f'Bearer realm="{realm}"'})

    server = await aiohttp_server(_app(registry))
    error = await _sync(tmp_path, server.port)
    assert isinstance(error, TransferFailed) and error.exit_code == 8
    assert error.reason == "the token service's token holds spaces, control or non-ASCII characters"


@pytest.mark.asyncio
async def test_an_oversized_header_is_a_typed_error(tmp_path: Path, aiohttp_server: Server) -> None:
    async def registry(request: web.Request) -> web.StreamResponse:
        return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer realm="' + "x" * 20_000 + '"'})

    server = await aiohttp_server(_app(registry))
    error = await _sync(tmp_path, server.port)
    assert isinstance(error, TransferFailed) and error.exit_code == 8
    assert error.reason.startswith("the server's answer is not usable HTTP (Got more than 8190 bytes")


@pytest.mark.asyncio
@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/upload", "http://[::1"])
async def test_an_upload_location_that_is_not_http_is_a_typed_error(aiohttp_server: Server, location: str) -> None:
    requests: list[str] = []

    async def registry(request: web.Request) -> web.StreamResponse:
        requests.append(request.method)
        if request.method == "HEAD":
            return web.Response(status=404)
        return web.Response(status=202, headers={"Location": location})

    server = await aiohttp_server(_app(registry))
    target = Registry(parse_reference(f"oci://127.0.0.1:{server.port}/fleet/adapters"), transfer=TransferSettings())
    try:
        with pytest.raises(TransferFailed) as caught:
            await target.upload_bytes(b"adapter bytes")
    finally:
        await target.close()
    assert caught.value.reason == f"the registry sent an unusable upload Location {location!r}"
    assert requests == ["HEAD", "POST"]  # nothing sent to the Location, no retry
