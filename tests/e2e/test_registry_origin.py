"""A fleet whose origin is an OCI registry (the real CNCF distribution registry): publish, sync, serve, republish."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import TestServer
from daemons import run_daemon
from registry import Registry, run_registry

from edge_runtime.distribution.keys import generate_key, load_private_key
from edge_runtime.distribution.oci import MANIFEST_LAYER_TYPE, parse_reference, release_artifact
from edge_runtime.distribution.oci import Descriptor as OciDescriptor
from edge_runtime.distribution.oci_publish import publish_oci
from edge_runtime.distribution.registry import Registry as RegistryClient
from edge_runtime.distribution.transfer import TransferSettings

CHAT = [{"role": "user", "content": "Name a colour."}]
RELEASE = "/v2/edge/adapters/manifests/edge-rt-manifest"


def edge_rt(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_runtime.cli", *args], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "0", **(env or {})}, cwd=cwd)


def publish_cli(source: Path, registry: Registry, key: Path, *, env: dict[str, str] | None = None,
                repository: str = "edge/adapters") -> subprocess.CompletedProcess[str]:
    done = edge_rt("publish", str(source), "--out", registry.reference(repository), "--key", str(key),
                   "--allow-renamed", env=env)  # the served adapters a, b, c are renamed copies
    assert done.returncode == 0, done.stderr
    return done


def sync_cli(registry: Registry, public: Path, cache: Path, *names: str, env: dict[str, str] | None = None,
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    chosen = ("--adapters", ",".join(names)) if names else ("--all",)
    return edge_rt("sync", "--cdn", registry.reference(), "--public-key", str(public), *chosen, "--cache-dir",
                   str(cache), *extra, env=env)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_publish_sync_serve_and_republish_reach_a_running_daemon_through_the_registry(
        tmp_path: Path, serve_profile: Path, adapters_dir: Path) -> None:
    key, public = generate_key(tmp_path / "signing.key")
    with run_registry() as registry:
        pushed = publish_cli(adapters_dir, registry, key)
        assert f"pushed {registry.reference()}:edge-rt-manifest" in pushed.stdout and "3 new blobs" in pushed.stdout
        synced = sync_cli(registry, public, tmp_path / "cli-cache", "a")
        assert synced.returncode == 0, synced.stderr
        sha_a = sha256_of(adapters_dir / "a.gguf")
        assert sha256_of(tmp_path / "cli-cache" / "blobs" / f"{sha_a}.gguf") == sha_a
        with run_daemon("--profile", str(serve_profile), "--cdn", registry.reference(), "--public-key", str(public),
                        "--cache-dir", str(tmp_path / "device-cache"), log=tmp_path / "log",
                        env={"HF_HUB_OFFLINE": "0"}) as daemon:
            chat = {"model": "b", "messages": CHAT, "max_tokens": 4, "temperature": 0}
            old = requests.post(f"{daemon.url}/v1/chat/completions", timeout=60, json=chat)
            assert old.status_code == 200, old.text
            assert requests.post(f"{daemon.url}/v1/sync", timeout=30).json()["version"] == 1
            releases = [entry for entry in registry.log() if entry.path == RELEASE and entry.method == "GET"]
            assert releases[-1].status == 304  # the refresh: one conditional GET, If-None-Match on the digest ETag

            next_version = tmp_path / "v2"
            next_version.mkdir()
            shutil.copy(adapters_dir / "a.gguf", next_version / "a.gguf")
            shutil.copy(adapters_dir / "c.gguf", next_version / "b.gguf")  # new content for b
            publish_cli(next_version, registry, key)
            report = requests.post(f"{daemon.url}/v1/sync?wait=true", timeout=120).json()
            new_sha = sha256_of(adapters_dir / "c.gguf")
            assert (report["version"], report["updating"], report["adapters"]["b"]) == (2, ["b"], new_sha)
            new = requests.post(f"{daemon.url}/v1/chat/completions", timeout=60, json=chat)
            assert new.headers["X-Edge-Adapters"] == f"b@{new_sha[:16]}:1"
            assert new.json()["choices"][0]["message"]["content"] != old.json()["choices"][0]["message"]["content"]


def test_an_unchanged_republish_uploads_no_adapter_blob(tmp_path: Path, adapters_dir: Path) -> None:
    key, _ = generate_key(tmp_path / "signing.key")
    with run_registry() as registry:
        publish_cli(adapters_dir, registry, key)
        before = len(registry.log())
        again = publish_cli(adapters_dir, registry, key)
        requests_made = registry.log()[before:]
    assert "0 new blobs" in again.stdout and "version 2" in again.stdout
    uploads = [entry for entry in requests_made if "/blobs/uploads/" in entry.path]
    # One new blob: the signed document of version 2 (POST, then one PUT with its digest); no PATCH at all.
    assert [entry.method for entry in uploads] == ["POST", "PUT"]
    document_digest = uploads[1].query.rpartition("digest=")[2].replace("%3A", ":")
    adapter_digests = {f"sha256:{sha256_of(path)}" for path in adapters_dir.glob("*.gguf")}
    assert document_digest.startswith("sha256:") and document_digest not in adapter_digests
    heads = {(entry.path.rpartition("/")[2], entry.status) for entry in requests_made if entry.method == "HEAD"}
    assert {(digest, 200) for digest in adapter_digests} <= heads  # each adapter blob: one HEAD, found


def test_a_sync_killed_halfway_resumes_from_the_registry_with_a_206(tmp_path: Path, adapters_dir: Path) -> None:
    key, public = generate_key(tmp_path / "signing.key")
    size = (adapters_dir / "a.gguf").stat().st_size
    cache = tmp_path / "cache"
    with run_registry() as registry:
        publish_cli(adapters_dir, registry, key)
        first = subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.cli", "sync", "--cdn", registry.reference(), "--public-key",
             str(public), "--adapters", "a", "--cache-dir", str(cache), "--max-kbps", "16000"],  # ~10 s for 19.5 MB
            env={**os.environ, "HF_HUB_OFFLINE": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while not any(p.stat().st_size >= size // 3 for p in (cache / "partial").glob("*.part")) \
                if (cache / "partial").exists() else True:
            assert time.monotonic() < deadline and first.poll() is None, "the first sync never got a third in"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        kept = sum(p.stat().st_size for p in (cache / "partial").glob("*.part"))
        second = sync_cli(registry, public, cache, "a")
        assert second.returncode == 0, second.stderr
        blob = f"/v2/edge/adapters/blobs/sha256:{sha256_of(adapters_dir / 'a.gguf')}"
        cut, resumed = [entry for entry in registry.log() if entry.path == blob and entry.method == "GET"][-2:]
    assert (cut.status, resumed.status) == (200, 206)
    assert size // 3 <= kept < size and resumed.bytes == size - kept  # the resume fetched exactly the rest
    sha_a = sha256_of(adapters_dir / "a.gguf")
    assert sha256_of(cache / "blobs" / f"{sha_a}.gguf") == sha_a


def _push_release(registry: Registry, document: bytes, blobs: list[Path], version: int) -> None:
    """Push a release whose signed document is ``document`` (as someone with push rights but no signing key could)."""
    async def push() -> None:
        client = RegistryClient(parse_reference(registry.reference()), transfer=TransferSettings())
        try:
            uploaded = await client.upload_bytes(document)
            layer = OciDescriptor(MANIFEST_LAYER_TYPE, uploaded.digest, uploaded.size)
            layers = [OciDescriptor("application/vnd.docker.ai.gguf.v3.lora", f"sha256:{sha256_of(path)}",
                                    path.stat().st_size) for path in blobs]
            release = release_artifact(document=layer, blobs=layers, version=version, created="2026-01-01T00:00:00Z")
            await client.put_manifest("edge-rt-manifest", release)
        finally:
            await client.close()
    asyncio.run(push())


def _release_document(registry: Registry) -> tuple[bytes, bytes]:
    """The release manifest under the tag and its signed document, read over plain HTTP."""
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    release = requests.get(f"{registry.url}{RELEASE}", headers=accept, timeout=10).content
    digest = json.loads(release)["layers"][0]["digest"]
    return release, requests.get(f"{registry.url}/v2/edge/adapters/blobs/{digest}", timeout=10).content


def test_a_tampered_layer_manifest_or_rollback_is_refused_with_the_errors_of_the_http_origin(
        tmp_path: Path, adapters_dir: Path) -> None:
    key, public = generate_key(tmp_path / "signing.key")
    with run_registry() as registry:
        publish_cli(adapters_dir, registry, key)
        sha_a = sha256_of(adapters_dir / "a.gguf")
        stored = registry.blob_file(sha_a)
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0x01  # one flipped bit in the registry's storage
        stored.write_bytes(bytes(data))
        flipped = sync_cli(registry, public, tmp_path / "cache", "a")
        assert flipped.returncode == 9, flipped.stderr  # IntegrityError, as over HTTP
        assert f"differs from the manifest's {sha_a[:16]}" in flipped.stderr
        assert not (tmp_path / "cache" / "blobs" / f"{sha_a}.gguf").exists()
        stored.write_bytes((adapters_dir / "a.gguf").read_bytes())

        release_v1, document = _release_document(registry)
        signed = json.loads(document)
        signed["signed"]["adapters"][0]["description"] = "rewritten by someone without the key"
        _push_release(registry, json.dumps(signed).encode(), sorted(adapters_dir.glob("*.gguf")), version=1)
        forged = sync_cli(registry, public, tmp_path / "cache", "b")
        assert forged.returncode == 9 and "manifest signature" in forged.stderr, forged.stderr  # SignatureInvalid

        publish_cli(adapters_dir, registry, key)  # version 2, signed
        assert sync_cli(registry, public, tmp_path / "cache", "b").returncode == 0
        requests.put(f"{registry.url}{RELEASE}", data=release_v1, timeout=10,
                     headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}).raise_for_status()
        rolled_back = sync_cli(registry, public, tmp_path / "cache", "b")
        assert rolled_back.returncode == 9 and "older than version 2" in rolled_back.stderr, rolled_back.stderr


def test_a_registry_gets_the_refusals_of_a_folder_renamed_files_and_unsigned_over_signed(
        tmp_path: Path, adapters_dir: Path) -> None:
    key = tmp_path / "cdn.key"
    generate_key(key)
    with run_registry() as registry:
        out = registry.reference("edge/adapters")
        renamed = edge_rt("publish", str(adapters_dir), "--out", out, "--key", str(key))
        assert renamed.returncode == 2 and "the adapter inside is named" in renamed.stderr
        assert "--allow-renamed" in renamed.stderr
        publish_cli(adapters_dir, registry, key)
        unsigned = edge_rt("publish", str(adapters_dir), "--out", out, "--allow-renamed")
        assert unsigned.returncode == 2 and "its manifest is signed" in unsigned.stderr
        assert "--unsigned" in unsigned.stderr
        release = requests.get(f"{registry.url}{RELEASE}", timeout=10,
                               headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        assert release.status_code == 200 and release.json()["annotations"]["dev.edge-rt.manifest.version"] == "1"
        forced = edge_rt("publish", str(adapters_dir), "--out", out, "--allow-renamed", "--unsigned")
        assert forced.returncode == 0, forced.stderr


def test_publish_refuses_an_out_with_a_scheme_it_does_not_publish_to(tmp_path: Path, adapters_dir: Path) -> None:
    key, _ = generate_key(tmp_path / "signing.key")
    for out in ("s3://bucket/adapters", "https://cdn.example/adapters"):
        done = edge_rt("publish", str(adapters_dir), "--out", out, "--key", str(key), cwd=tmp_path)
        scheme = out.split(":", 1)[0]
        assert done.returncode == 2 and f"does not publish to {scheme}://" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing.key", "signing.key.pub"]  # no "s3:" folder


@pytest.mark.asyncio
@pytest.mark.parametrize("forwarded", [0.0, 0.5])
async def test_an_upload_cut_mid_chunk_goes_on_where_the_registry_can(
        tmp_path: Path, large_adapter: Path, aiohttp_server: Callable[..., Awaitable[TestServer]],
        forwarded: float) -> None:
    """A proxy forwards part of the third PATCH to the registry (none, or half), then drops the connection. The
    publisher asks the registry how far the upload got (GET on the upload: Range 0-N): with nothing written it goes
    on from there, sending no byte twice; with half written, distribution 2.8 refuses the stale upload state
    (BLOB_UPLOAD_INVALID) and the publisher starts that blob over. Either way the registry ends with the exact file."""
    key, public = generate_key(tmp_path / "signing.key")
    patches: list[str] = []  # Content-Range of every PATCH the registry received
    cuts: list[str] = []
    with run_registry() as registry:
        async with aiohttp.ClientSession(auto_decompress=False) as upstream:
            async def front(request: web.Request) -> web.StreamResponse:
                body = await request.read()
                headers = {k: v for k, v in request.headers.items()
                           if k.lower() not in ("content-length", "transfer-encoding")}
                cut = request.method == "PATCH" and len(patches) == 2 and not cuts
                if cut:
                    cuts.append(request.headers["Content-Range"])
                    body = body[:int(len(body) * forwarded)]
                    if not body:
                        assert request.transport is not None
                        request.transport.close()  # dropped before anything reached the registry
                        return web.Response()
                if request.method == "PATCH":
                    start = int(request.headers["Content-Range"].partition("-")[0])
                    headers["Content-Range"] = f"{start}-{start + len(body) - 1}"
                    patches.append(headers["Content-Range"])
                async with upstream.request(request.method, f"{registry.url}{request.path_qs}", headers=headers,
                                            data=body) as answer:
                    kept = {k: v for k, v in answer.headers.items()
                            if k in ("Content-Type", "Docker-Content-Digest", "Etag", "Location", "Range")}
                    reply = web.Response(status=answer.status, body=await answer.read(), headers=kept)
                if cut:
                    assert request.transport is not None
                    request.transport.close()  # the connection drops before the answer
                return reply

            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", front)
            proxy = await aiohttp_server(app)
            reference = parse_reference(f"oci://127.0.0.1:{proxy.port}/edge/adapters")
            fast = TransferSettings(backoff_base_s=0.01, backoff_max_s=0.05)
            result = await publish_oci(large_adapter, reference, key=load_private_key(key), transfer=fast,
                                       upload_chunk_bytes=64 << 10)
        size = (large_adapter / "wide.gguf").stat().st_size
        synced = await asyncio.to_thread(sync_cli, registry, public, tmp_path / "cache", "wide")
    assert synced.returncode == 0, synced.stderr  # the registry holds exactly the file (the sync checks its sha256)
    assert result.new_blobs == (sha256_of(large_adapter / "wide.gguf"),)
    chunk = 64 << 10
    sent = sum(int(r.split("-")[1]) - int(r.split("-")[0]) + 1 for r in patches)
    if forwarded == 0.0:  # resumed at the registry's offset: the third chunk again, then on
        assert patches[:3] == [f"0-{chunk - 1}", f"{chunk}-{2 * chunk - 1}", f"{2 * chunk}-{3 * chunk - 1}"]
        assert sent == size  # no byte sent twice
    else:  # the half-written upload is invalid on 2.8: a new upload from byte 0
        assert patches[:4] == [f"0-{chunk - 1}", f"{chunk}-{2 * chunk - 1}",
                               f"{2 * chunk}-{2 * chunk + chunk // 2 - 1}", f"0-{chunk - 1}"]
        assert sent == size + 2 * chunk + chunk // 2
