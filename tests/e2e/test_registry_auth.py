"""Registry auth as docker users have it: htpasswd basic auth and the bearer-token flow, on the real registry."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from registry import PASSWORD, USER, run_registry
from test_registry_origin import publish_cli, sha256_of, sync_cli

from edge_runtime.distribution.client import CdnClient
from edge_runtime.distribution.keys import generate_key, load_public_key
from edge_runtime.errors import RegistryAuthFailed

PUBLISHER = {"EDGE_RT_REGISTRY_USERNAME": USER, "EDGE_RT_REGISTRY_PASSWORD": PASSWORD}


def write_docker_config(host: str, entry: dict[str, str] | None = None, **extra: object) -> None:
    """A ``config.json`` in ``$DOCKER_CONFIG`` (the autouse fixture points it into tmp_path), as `docker login`
    writes it."""
    folder = Path(os.environ["DOCKER_CONFIG"])
    folder.mkdir(parents=True, exist_ok=True)
    auths = {} if entry is None else {host: entry}
    (folder / "config.json").write_text(json.dumps({"auths": auths, **extra}))


def login_entry(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize("auth", ["basic", "token"])
def test_credentials_from_the_environment_or_docker_config_publish_and_sync(tmp_path: Path, adapters_dir: Path,
                                                                           auth: str) -> None:
    key, public = generate_key(tmp_path / "signing.key")
    with run_registry(auth=auth) as registry:
        publish_cli(adapters_dir, registry, key, env=PUBLISHER)  # credentials from EDGE_RT_REGISTRY_*
        write_docker_config(registry.host, login_entry())  # the device: ~/.docker/config.json auths
        synced = sync_cli(registry, public, tmp_path / "cache", "a", "c")
        assert synced.returncode == 0, synced.stderr
        for name in "ac":
            sha = sha256_of(adapters_dir / f"{name}.gguf")
            assert sha256_of(tmp_path / "cache" / "blobs" / f"{sha}.gguf") == sha
        statuses = [entry.status for entry in registry.log() if entry.path != "/v2/"]
        if auth == "token":
            granted = [scope for scope, user in registry.tokens.requests if user == USER]  # type: ignore[union-attr]
            scopes = {(scope.rpartition(":")[0], frozenset(scope.rpartition(":")[2].split(","))) for scope in granted}
            # the registry names the actions in either order ("pull,push" or "push,pull")
            assert scopes == {("repository:edge/adapters", frozenset({"pull", "push"})),
                              ("repository:edge/adapters", frozenset({"pull"}))}
    assert 401 in statuses and statuses.count(401) <= 4  # challenged once per client (and per scope), not per request


@pytest.mark.parametrize("auth", ["basic", "token"])
def test_a_wrong_password_is_a_typed_error_with_its_exit_code(tmp_path: Path, adapters_dir: Path, auth: str) -> None:
    key, public = generate_key(tmp_path / "signing.key")
    with run_registry(auth=auth) as registry:
        publish_cli(adapters_dir, registry, key, env=PUBLISHER)
        wrong = sync_cli(registry, public, tmp_path / "cache", "a",
                         env={"EDGE_RT_REGISTRY_USERNAME": USER, "EDGE_RT_REGISTRY_PASSWORD": "not-the-password"})
        assert wrong.returncode == 11, wrong.stderr  # RegistryAuthFailed
        refused = "token service of" if auth == "token" else "refused the credentials of"
        assert refused in wrong.stderr and f"'{USER}'" in wrong.stderr and "not-the-password" not in wrong.stderr

        write_docker_config(registry.host, login_entry(password="stale"))  # a stale `docker login`
        stale = sync_cli(registry, public, tmp_path / "cache", "a")
        assert stale.returncode == 11 and str(Path(os.environ["DOCKER_CONFIG"]) / "config.json") in stale.stderr

        write_docker_config(registry.host)  # no entry: anonymous
        if auth == "basic":
            anonymous = sync_cli(registry, public, tmp_path / "cache", "a")
            assert anonymous.returncode == 11 and "none are configured" in anonymous.stderr, anonymous.stderr

        write_docker_config(registry.host, credsStore="desktop")
        helper = sync_cli(registry, public, tmp_path / "cache", "a")
        assert helper.returncode == 11 and "credential helper 'desktop'" in helper.stderr, helper.stderr
        assert "not supported" in helper.stderr
    assert not (tmp_path / "cache" / "blobs").exists() or not any((tmp_path / "cache" / "blobs").iterdir())


@pytest.mark.asyncio
async def test_a_blob_redirected_to_object_storage_gets_no_registry_credentials(
        tmp_path: Path, adapters_dir: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]) -> None:
    """A registry backed by object storage answers blob GETs with a redirect to a presigned URL on another origin:
    the registry's Authorization must not follow (it would leak a credential to the storage provider)."""
    key, public = generate_key(tmp_path / "signing.key")
    seen: list[tuple[str, str | None]] = []  # (path, Authorization) per request the object store got
    with run_registry(auth="basic") as registry:
        publish_cli(adapters_dir, registry, key, env=PUBLISHER)

        async def storage(request: web.Request) -> web.StreamResponse:
            seen.append((request.path, request.headers.get("Authorization")))
            return web.FileResponse(registry.blob_file(request.path.rpartition("sha256:")[2]))

        store = await aiohttp_server(_app(storage))
        async with aiohttp.ClientSession(auto_decompress=False) as upstream:
            async def front(request: web.Request) -> web.StreamResponse:
                if "/blobs/sha256:" in request.path and request.headers.get("Authorization"):
                    return web.Response(status=307, headers={"Location": str(store.make_url(request.path))})
                async with upstream.request(request.method, f"{registry.url}{request.path_qs}",
                                            headers={k: v for k, v in request.headers.items() if k != "Host"},
                                            data=await request.read()) as answer:
                    kept = {k: v for k, v in answer.headers.items()
                            if k in ("Content-Type", "Docker-Content-Digest", "Etag", "WWW-Authenticate")}
                    return web.Response(status=answer.status, body=await answer.read(), headers=kept)

            proxy = await aiohttp_server(_app(front))
            write_docker_config(f"127.0.0.1:{proxy.port}", login_entry())
            async with CdnClient(f"oci://127.0.0.1:{proxy.port}/edge/adapters", cache_dir=tmp_path / "cache",
                                 public_key=load_public_key(public), offline=False) as client:
                report = await client.sync(["a"])
    sha_a = sha256_of(adapters_dir / "a.gguf")
    assert report.results[0].adapter.sha256 == sha_a
    assert [path for path, _ in seen] == [f"/v2/edge/adapters/blobs/sha256:{path}" for path in
                                          [_document_sha(seen), sha_a]]
    assert all(authorization is None for _, authorization in seen)


def _document_sha(seen: list[tuple[str, str | None]]) -> str:
    return seen[0][0].rpartition("sha256:")[2]


def _app(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@pytest.mark.asyncio
async def test_a_running_client_picks_up_a_fixed_login_after_a_refusal(tmp_path: Path, adapters_dir: Path) -> None:
    """A daemon outlives a `docker login`: after a refused password the next refresh reads the credentials again."""
    key, public = generate_key(tmp_path / "signing.key")
    with run_registry(auth="basic") as registry:
        await asyncio.to_thread(publish_cli, adapters_dir, registry, key, env=PUBLISHER)
        write_docker_config(registry.host, login_entry(password="stale"))
        async with CdnClient(registry.reference(), cache_dir=tmp_path / "cache", public_key=load_public_key(public),
                             offline=False) as client:
            with pytest.raises(RegistryAuthFailed) as refused:
                await client.sync(["a"])
            write_docker_config(registry.host, login_entry())  # the operator logs in again
            report = await client.sync(["a"])
    assert refused.value.exit_code == 11 and "'fleet-publisher'" in str(refused.value)
    assert report.results[0].adapter.sha256 == sha256_of(adapters_dir / "a.gguf")
