"""One cache, several processes: real `edge-rt sync` processes against one throttled CDN, as devices run them."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from cdn_server import Fault, FaultCdn

from edge_runtime.distribution.publish import publish
from edge_runtime.distribution.store import AdapterStore
from edge_runtime.files import file_sha256

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def wide_cdn(tmp_path: Path, large_adapter: Path,
                   aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FaultCdn:
    """The ~650 KB adapter `wide`, published unsigned on a local HTTP CDN whose answers the tests can slow down."""
    publish(large_adapter, tmp_path / "cdn")
    cdn = FaultCdn(tmp_path / "cdn")
    cdn.server = await aiohttp_server(cdn.app())  # type: ignore[attr-defined]
    return cdn


async def start_sync(cdn: FaultCdn, cache: Path, base_model: Path, *extra: str) -> asyncio.subprocess.Process:
    env = os.environ | {"EDGE_RT_HOME": str(cache.parent / "home")}
    env.pop("HF_HUB_OFFLINE", None)
    url = str(cdn.server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge_runtime.cli", "sync", "--cdn", url, "--adapters", "wide", "--cache-dir",
        str(cache), "--model", str(base_model), *extra, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)


async def halfway(cache: Path, size: int) -> None:
    """Return once a partial download in ``cache`` holds half of ``size`` bytes (fail after ~5 s)."""
    for _ in range(500):
        parts = list((cache / "partial").glob("*.part")) if (cache / "partial").exists() else []
        if any(p.stat().st_size >= size // 2 for p in parts):
            return
        await asyncio.sleep(0.01)
    pytest.fail("the first sync never got halfway")


def assert_every_blob_hashes_to_its_name(cache: Path) -> None:
    for blob in (cache / "blobs").iterdir():
        assert blob.name == f"{file_sha256(blob).hexdigest()}.gguf", f"{blob.name} holds other bytes"


async def test_two_syncs_of_one_adapter_on_one_cache_never_share_a_partial(
        tmp_path: Path, wide_cdn: FaultCdn, large_adapter: Path, base_model: Path) -> None:
    # Regression: the second process renamed the first one's open partial and both appended to it; the blob was
    # installed under the manifest's sha256 with 11.9 MB where 9.8 MB were listed.
    cache, size = tmp_path / "cache", (large_adapter / "wide.gguf").stat().st_size
    wide_cdn.faults = [Fault(hold_at=0.5), None]  # the first download stalls halfway for a few seconds
    first = await start_sync(wide_cdn, cache, base_model)
    await halfway(cache, size)
    second = await start_sync(wide_cdn, cache, base_model)  # starts while the first one writes its partial
    outputs = [(await p.communicate())[0].decode() for p in (second, first)]
    assert (second.returncode, first.returncode) == (0, 0), outputs
    assert [s.range for s in wide_cdn.blob_requests] == [None, None]  # two whole downloads, no shared resume
    blobs = list((cache / "blobs").iterdir())
    assert len(blobs) == 1 and blobs[0].read_bytes() == (large_adapter / "wide.gguf").read_bytes()
    assert_every_blob_hashes_to_its_name(cache)
    assert list((cache / "partial").glob("*.part")) == []  # the slower writer dropped its own copy


async def test_a_sync_killed_mid_download_is_resumed_by_the_next_process(
        tmp_path: Path, wide_cdn: FaultCdn, large_adapter: Path, base_model: Path) -> None:
    # The claim on a partial dies with its writer: a later process resumes the bytes instead of starting over.
    cache, size = tmp_path / "cache", (large_adapter / "wide.gguf").stat().st_size
    wide_cdn.faults = [Fault(hold_at=0.5)]
    first = await start_sync(wide_cdn, cache, base_model)
    await halfway(cache, size)
    first.kill()
    await first.wait()
    second = await start_sync(wide_cdn, cache, base_model)
    output = (await second.communicate())[0].decode()
    assert second.returncode == 0, output
    resumed = wide_cdn.blob_requests[-1]
    assert resumed.status == 206 and resumed.range is not None and resumed.if_range is not None
    assert AdapterStore(cache).lookup("wide") is not None
    assert_every_blob_hashes_to_its_name(cache)
