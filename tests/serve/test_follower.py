"""A daemon following a real CDN on 127.0.0.1: new versions take over only once llama.cpp has loaded them."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from cdn_server import Fault, FaultCdn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.distribution.client import CdnClient, SyncSettings
from edge_runtime.distribution.publish import publish
from edge_runtime.profiles import load_profile
from edge_runtime.runtime.core import Runtime
from edge_runtime.runtime.engine import SamplingParams
from edge_runtime.runtime.requests import AdapterRequest
from edge_runtime.serve import follower as follower_module
from edge_runtime.serve.follower import CdnFollower

pytestmark = pytest.mark.asyncio
KeyPair = tuple[Ed25519PrivateKey, Ed25519PublicKey, Path]
GREEDY = SamplingParams(max_tokens=6)


StartFollower = Callable[..., Awaitable[CdnFollower]]


@pytest_asyncio.fixture
async def make_follower(tmp_path: Path, cdn_dir: Path, key_pair: KeyPair, make_profile: Callable[..., Path],
                        aiohttp_server: Callable[..., Awaitable[TestServer]]) -> AsyncIterator[StartFollower]:
    """Start a daemon's follower (a fresh runtime, the same cache and CDN each time: a restart)."""
    cdn = FaultCdn(cdn_dir)
    server = await aiohttp_server(cdn.app())
    started: list[tuple[CdnFollower, Runtime]] = []

    async def start(*, local: dict[str, Path] | None = None, settings: SyncSettings | None = None) -> CdnFollower:
        runtime = Runtime(load_profile(str(make_profile("follower-test", budget_mb=1024))), ctx=512)
        for name, path in (local or {}).items():  # as --adapters-dir would register them
            runtime.adapters.add(name, path)
        client = CdnClient(str(server.make_url("")).rstrip("/"), cache_dir=tmp_path / "cache",
                           public_key=key_pair[1], base_fingerprint=runtime.base_fingerprint, offline=False,
                           sync_settings=settings)
        following = CdnFollower(client, runtime.adapters)
        following.log = cdn.log  # type: ignore[attr-defined]
        following.fault_cdn = cdn  # type: ignore[attr-defined]
        started.append((following, runtime))
        await following.start()
        return following

    yield start
    for following, runtime in started:
        await following.close()
        runtime.close()


@pytest_asyncio.fixture
async def follower(make_follower: StartFollower) -> CdnFollower:
    return await make_follower()


def republish(tmp_path: Path, cdn_root: Path, key: Ed25519PrivateKey, files: dict[str, bytes]) -> dict[str, str]:
    """Publish a new manifest version offering exactly ``files`` (name -> bytes); return name -> sha256."""
    source = tmp_path / "next-version"
    source.mkdir(exist_ok=True)
    for stale in source.glob("*.gguf"):
        stale.unlink()
    for name, data in files.items():
        (source / f"{name}.gguf").write_bytes(data)
    publish(source, cdn_root, key=key, allow_empty=not files, allow_renamed=True)  # new content, old name
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


async def serving(follower: CdnFollower, name: str) -> tuple[str, Path, str]:
    """Generate under ``name``: the sha256 and file of the version that ran, and the text."""
    engine = follower.manager.engine
    prompt = engine.tokenize("Write one word:")

    def run() -> tuple[str, Path, str]:
        with follower.manager.lease([AdapterRequest(name, 1.0)]) as held:
            text = engine.generate(prompt, GREEDY, adapters=[(h.handle, h.scale) for h in held]).text
            return held[0].sha256, held[0].handle.path, text

    return await asyncio.to_thread(run)


async def test_an_updated_adapter_switches_after_loading_and_a_withdrawn_remote_one_is_forgotten(
        tmp_path: Path, follower: CdnFollower, cdn_dir: Path, adapter_sources: Path, key_pair: KeyPair) -> None:
    manager, store = follower.manager, follower.cdn.store
    assert {a.name: a.state for a in manager.list_adapters()} == {"brand-voice": "remote", "json-extract": "remote"}
    await follower.pull(["json-extract", "brand-voice"])
    old_sha = manager.info("json-extract").sha256
    assert (await serving(follower, "json-extract"))[:2] == (old_sha, store.blob_path(old_sha))
    brand_voice_text = (await serving(follower, "brand-voice"))[2]

    new = republish(tmp_path, cdn_dir, key_pair[0],
                    {"json-extract": (adapter_sources / "brand-voice.gguf").read_bytes()})
    report = await follower.refresh()
    assert (report.version, report.updating, report.withdrawn) == (2, ("json-extract",), ())
    await follower.settle()

    info = manager.info("json-extract")
    assert (info.sha256, info.state) == (new["json-extract"], "resident")
    sha, path, text = await serving(follower, "json-extract")
    assert (sha, path, text) == (new["json-extract"], store.blob_path(new["json-extract"]), brand_voice_text)
    cached = store.lookup("json-extract")
    assert cached is not None and cached.sha256 == new["json-extract"]
    assert not store.blob_path(old_sha).exists()  # the old blob went once the new version took over
    # brand-voice was pulled, so it stays usable though the CDN stopped offering it; a never-pulled one is forgotten
    assert manager.info("brand-voice").state == "resident"
    republish(tmp_path, cdn_dir, key_pair[0], {})
    assert (await follower.refresh()).withdrawn == ()
    manager.add_remote("gone", sha256="ef" * 32, size_bytes=1)
    assert (await follower.refresh()).withdrawn == ("gone",) and "gone" not in manager.names()


async def test_a_version_llama_cpp_refuses_leaves_the_old_one_serving_and_is_not_fetched_again(
        tmp_path: Path, follower: CdnFollower, cdn_dir: Path, adapter_sources: Path, key_pair: KeyPair) -> None:
    manager, store = follower.manager, follower.cdn.store
    await follower.pull(["json-extract"])
    old_sha = manager.info("json-extract").sha256
    before = await serving(follower, "json-extract")
    assert before[:2] == (old_sha, store.blob_path(old_sha))
    good = (adapter_sources / "brand-voice.gguf").read_bytes()
    bad = republish(tmp_path, cdn_dir, key_pair[0], {"json-extract": good[:-4096]})  # sha256 right, tensors short

    assert (await follower.refresh()).updating == ("json-extract",)
    await follower.settle()

    info = manager.info("json-extract")
    assert (info.sha256, info.state) == (old_sha, "resident")
    assert await serving(follower, "json-extract") == before
    cached = store.lookup("json-extract")
    assert cached is not None and cached.sha256 == old_sha and cached.path.exists()
    assert not store.blob_path(bad["json-extract"]).exists()  # the refused blob is not kept
    blob_requests = [s for s in follower.log if s.path.startswith("blobs/")]  # type: ignore[attr-defined]
    assert (await follower.refresh()).updating == ()  # a refused version is not fetched again
    assert [s for s in follower.log if s.path.startswith("blobs/")] == blob_requests  # type: ignore[attr-defined]


async def test_a_restart_between_fetch_and_switch_serves_the_old_version_then_switches_without_refetching(
        tmp_path: Path, make_follower: StartFollower, cdn_dir: Path, adapter_sources: Path,
        key_pair: KeyPair) -> None:
    first = await make_follower()
    await first.pull(["json-extract"])
    old_sha = first.manager.info("json-extract").sha256
    new = republish(tmp_path, cdn_dir, key_pair[0],
                    {"json-extract": (adapter_sources / "brand-voice.gguf").read_bytes()})  # named brand-voice inside
    entry = (await first.cdn.fetch_manifest()).entry("json-extract")
    assert entry is not None
    staged = await first.cdn.fetch_update(entry)  # downloaded and verified, not loaded yet: the daemon stops
    await first.close()
    assert first.cdn.store.staged() == {new["json-extract"]} and staged.path.exists()

    second = await make_follower()  # recovery scan, registration, refresh: the update resumes from the staged blob
    assert "brand-voice" not in second.manager.names()  # the staged blob was not named after its inner name
    await second.settle()

    assert second.manager.info("json-extract").sha256 == new["json-extract"] != old_sha
    cached = second.cdn.store.lookup("json-extract")
    assert cached is not None and cached.sha256 == new["json-extract"] and second.cdn.store.staged() == set()
    fetched = [s for s in second.log if s.path == f"blobs/{new['json-extract']}.gguf"]  # type: ignore[attr-defined]
    assert len(fetched) == 1  # once, before the restart


async def test_cancelling_a_waiting_sync_does_not_stop_the_update(
        tmp_path: Path, follower: CdnFollower, cdn_dir: Path, adapter_sources: Path, key_pair: KeyPair) -> None:
    await follower.pull(["json-extract"])
    new = republish(tmp_path, cdn_dir, key_pair[0],
                    {"json-extract": (adapter_sources / "brand-voice.gguf").read_bytes()})
    follower.fault_cdn.faults = [Fault(hold_at=0.5)]  # type: ignore[attr-defined]  # the new blob stalls midway
    assert (await follower.refresh()).updating == ("json-extract",)
    waiting = asyncio.ensure_future(follower.settle())  # POST /v1/sync?wait=true ...
    await asyncio.sleep(0.2)
    assert not waiting.done()  # still downloading
    waiting.cancel()  # ... whose client goes away
    deadline = asyncio.get_running_loop().time() + 20
    while follower.manager.info("json-extract").sha256 != new["json-extract"]:
        assert asyncio.get_running_loop().time() < deadline, "the update stopped with its waiter"
        await asyncio.sleep(0.05)
    await follower.settle()
    cached = follower.cdn.store.lookup("json-extract")
    assert cached is not None and cached.sha256 == new["json-extract"]


async def test_an_adapter_from_the_adapters_dir_is_not_replaced_by_the_cdn(
        tmp_path: Path, make_follower: StartFollower, adapter_sources: Path) -> None:
    local = adapter_sources / "brand-voice.gguf"  # the operator's own json-extract
    follower = await make_follower(local={"json-extract": local})
    report = await follower.refresh()
    assert report.updating == () and "json-extract" not in report.new_remote
    assert follower.manager.info("json-extract").sha256 == hashlib.sha256(local.read_bytes()).hexdigest()


async def test_a_local_adapter_wins_over_a_cached_copy_of_the_same_name_at_restart(
        make_follower: StartFollower, adapter_sources: Path) -> None:
    first = await make_follower()
    await first.pull(["json-extract"])  # cached from the CDN
    await first.close()
    local = adapter_sources / "brand-voice.gguf"  # later the operator serves their own json-extract
    second = await make_follower(local={"json-extract": local})
    assert second.manager.info("json-extract").sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
    assert (await second.refresh()).updating == ()


async def test_on_a_metered_link_updates_wait_but_a_requested_adapter_is_still_pulled(
        tmp_path: Path, make_follower: StartFollower, cdn_dir: Path, adapter_sources: Path, key_pair: KeyPair) -> None:
    metered = SyncSettings.for_profile(load_profile("phone"))  # phones are metered
    assert metered.defer_updates and not SyncSettings.for_profile(load_profile("phone"),
                                                                  allow_metered_updates=True).defer_updates
    follower = await make_follower(settings=metered)
    await follower.pull(["json-extract"])  # on demand: pulled even on a metered link
    old_sha = follower.manager.info("json-extract").sha256
    republish(tmp_path, cdn_dir, key_pair[0], {"json-extract": (adapter_sources / "brand-voice.gguf").read_bytes()})
    requests_before = len(follower.fault_cdn.blob_requests)  # type: ignore[attr-defined]
    report = await follower.refresh()
    await follower.settle()
    assert (report.updating, report.deferred) == ((), ("json-extract",))
    assert follower.manager.info("json-extract").sha256 == old_sha
    assert len(follower.fault_cdn.blob_requests) == requests_before  # type: ignore[attr-defined]  (no download)
    unmetered = await make_follower(settings=SyncSettings())  # a restart with --allow-metered-updates
    assert (await unmetered.refresh()).updating == ("json-extract",)


async def test_a_refresh_reports_as_new_only_what_the_device_had_not_seen(follower: CdnFollower) -> None:
    # Regression: every not-yet-pulled adapter was reported as new_remote on every refresh.
    assert (await follower.refresh()).new_remote == ()  # start() already listed both
    follower.manager.forget_remote(keep=["json-extract"])
    assert (await follower.refresh()).new_remote == ("brand-voice",)


async def test_a_pull_is_visible_while_it_runs_logged_and_observed(follower: CdnFollower, adapter_sources: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    manifest_size = (adapter_sources / "json-extract.gguf").stat().st_size
    observed: list[tuple[str, int, float, bool]] = []
    follower.on_pull = lambda *args: observed.append(args)
    follower.fault_cdn.faults = [Fault(hold_at=0.5)]  # type: ignore[attr-defined]  (stalls halfway a few seconds)
    with caplog.at_level("INFO", logger="edge_runtime.serve.follower"):
        pulling = asyncio.create_task(follower.pull(["json-extract"]))
        for _ in range(500):
            progress = follower.downloads().get("json-extract")
            if progress is not None and progress.done_bytes > 0:
                break
            await asyncio.sleep(0.01)
        assert progress is not None and 0 < progress.done_bytes < progress.total_bytes == manifest_size
        await pulling
    assert follower.downloads() == {} and follower.manager.info("json-extract").state == "cached"
    assert [(name, received, ok) for name, received, _, ok in observed] == [("json-extract", manifest_size, True)]
    assert "pulling adapter json-extract" in caplog.text and "pulled adapter json-extract" in caplog.text


async def test_a_pull_of_an_adapter_a_cli_sync_already_cached_does_not_wait_for_the_cdn(
        follower: CdnFollower, tmp_path: Path, key_pair: KeyPair, cdn_dir: Path) -> None:
    # Regression: a first request waited 61 s for a slow CDN's manifest while the blob sat in the cache.
    async with CdnClient(cdn_dir.as_uri(), cache_dir=tmp_path / "cache", public_key=key_pair[1],
                         offline=False) as cli:  # another process's sync, from another copy of the folder
        await cli.ensure_cached("brand-voice")
    follower.cdn._manifest_at = -1e9  # the kept manifest is stale: a sync would fetch it again first
    before = len(follower.log)  # type: ignore[attr-defined]
    await asyncio.wait_for(follower.pull(["brand-voice"]), timeout=5)
    assert follower.manager.info("brand-voice").state == "cached"
    assert follower.log[before:] == []  # type: ignore[attr-defined]  (no manifest, no blob request)


async def test_a_stalling_cdn_does_not_keep_a_starting_daemon_from_serving_its_cache(
        make_follower: StartFollower, monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression: a manifest answered after 45 s kept the daemon (and its cached adapters) down for 3 minutes.
    first = await make_follower()
    await first.pull(["json-extract"])  # cached from an earlier run
    monkeypatch.setattr(follower_module, "START_REFRESH_S", 0.3)
    first.fault_cdn.manifest_delay_s = 3.0  # type: ignore[attr-defined]
    started = asyncio.get_running_loop().time()
    restarted = await make_follower()  # a restart against the stalling CDN
    assert asyncio.get_running_loop().time() - started < 2.5  # served after ~0.3 s, not after the manifest
    assert restarted.manager.info("json-extract").state == "cached" and restarted.version is None
    for _ in range(100):  # the manifest read went on in the background
        if restarted.version is not None:
            break
        await asyncio.sleep(0.1)
    assert restarted.version == 1 and "brand-voice" in restarted.manager.names()


async def test_offered_adapters_for_another_base_are_counted_and_named_as_such(
        tmp_path: Path, follower: CdnFollower, cdn_dir: Path, adapter_sources: Path, key_pair: KeyPair,
        gemma_adapter_files: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    # Issue 18 item 17: a daemon following a CDN did not say it skipped adapters made for another base, and a request
    # for one was "unknown adapter".
    from edge_runtime.errors import AdapterNotFound

    republish(tmp_path, cdn_dir, key_pair[0], {"json-extract": (adapter_sources / "json-extract.gguf").read_bytes(),
                                               "gemma-legal": gemma_adapter_files[0].read_bytes()})
    with caplog.at_level("WARNING", logger="edge_runtime.serve.follower"):
        report = await follower.refresh()
        await follower.refresh()  # said once, not at every refresh
    assert report.offered == ("json-extract",) and follower.other_base == ("gemma-legal",)
    assert [r.message for r in caplog.records].count(
        f"skipped 1 adapters {follower.cdn.cdn} offers for another base model: gemma-legal") == 1
    with pytest.raises(AdapterNotFound, match="adapter 'gemma-legal' is not served: .* converted for another base"):
        follower.manager.ensure_resident("gemma-legal")


async def test_a_shared_pull_is_counted_once_and_an_update_download_is_counted_like_a_pull(
        tmp_path: Path, follower: CdnFollower, cdn_dir: Path, adapter_sources: Path, key_pair: KeyPair,
        caplog: pytest.LogCaptureFixture) -> None:
    # Issue 18 item 19: pull metrics counted every waiter of one shared download; update downloads were neither
    # logged nor counted.
    observed: list[tuple[str, int, bool]] = []
    follower.on_pull = lambda name, received, seconds, ok: observed.append((name, received, ok))
    size = (adapter_sources / "json-extract.gguf").stat().st_size
    await asyncio.gather(*(follower.pull(["json-extract"]) for _ in range(3)))
    assert observed == [("json-extract", size, True)]
    new = republish(tmp_path, cdn_dir, key_pair[0],
                    {"json-extract": (adapter_sources / "brand-voice.gguf").read_bytes()})
    with caplog.at_level("INFO", logger="edge_runtime.serve.follower"):
        await follower.refresh()
        await follower.settle()
    new_size = (adapter_sources / "brand-voice.gguf").stat().st_size
    assert observed[1:] == [("json-extract", new_size, True)]
    messages = [r.message for r in caplog.records]
    assert any(m.startswith(f"fetching update of json-extract: {new['json-extract'][:12]}") for m in messages)
    assert any(m.startswith("adapter json-extract updated: ") and f"-> {new['json-extract'][:12]}" in m
               for m in messages)


async def test_metrics_show_the_manifest_version_its_last_refresh_and_refresh_failures(
        follower: CdnFollower) -> None:
    # Issue 18 item 20 (/metrics): a device stuck on an old manifest could not be alerted on.
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from edge_runtime.errors import InvalidManifest
    from edge_runtime.serve.metrics import _FollowerCollector

    registry = CollectorRegistry()
    registry.register(_FollowerCollector(follower))  # what Metrics.follow registers for a daemon with --cdn

    def samples() -> dict[str, float]:
        text = generate_latest(registry).decode()
        return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}

    first = samples()
    assert first["edge_rt_manifest_version"] == follower.version == 1
    assert first["edge_rt_manifest_last_refresh_timestamp_seconds"] == follower.last_refresh
    assert first["edge_rt_manifest_refresh_failures_total"] == 0
    follower.fault_cdn.manifest = b"not a manifest"  # type: ignore[attr-defined]
    with pytest.raises(InvalidManifest):
        await follower.refresh()
    after = samples()
    assert after["edge_rt_manifest_refresh_failures_total"] == 1 and after["edge_rt_manifest_version"] == 1
    assert after["edge_rt_manifest_last_refresh_timestamp_seconds"] == first[
        "edge_rt_manifest_last_refresh_timestamp_seconds"]
