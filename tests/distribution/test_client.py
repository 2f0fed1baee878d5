"""Devices pulling adapters from a real CDN on 127.0.0.1 that drops, stalls and lies.

After every test the cache holds only blobs whose sha256 matches the manifest (the autouse check below).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from cdn_server import Fault, FaultCdn, count_connections
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hub_server import LocalHub

from edge_runtime.distribution.client import CdnClient, SyncSettings
from edge_runtime.distribution.manifest import Manifest, read_manifest, sign_manifest
from edge_runtime.distribution.publish import publish
from edge_runtime.distribution.recovery import recover
from edge_runtime.distribution.store import AdapterStore, release
from edge_runtime.distribution.transfer import TransferProgress, TransferSettings
from edge_runtime.distribution.trust import publisher_id
from edge_runtime.errors import (
    AdapterNotFound,
    CacheMiss,
    DiskFull,
    IncompatibleAdapter,
    IntegrityError,
    InvalidManifest,
    InvalidName,
    LengthExceeded,
    ManifestExpired,
    RemoteNotFound,
    RollbackRefused,
    SignatureInvalid,
    SlowRetrieval,
    TransferFailed,
)
from edge_runtime.files import file_sha256
from edge_runtime.gguf.info import read_info

pytestmark = pytest.mark.asyncio
KeyPair = tuple[Ed25519PrivateKey, Ed25519PublicKey, Path]
FAST = {"connect_timeout_s": 2.0, "gap_timeout_s": 2.0, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
        "max_attempts": 4, "throughput_grace_s": 0.5, "min_bytes_per_second": 1024}
MakeClient = Callable[..., CdnClient]


@pytest.fixture(autouse=True)
def _cache_holds_only_verified_blobs(tmp_path: Path) -> Iterator[None]:
    yield
    manifest_path, blobs = tmp_path / "cdn" / "manifest.json", tmp_path / "cache" / "blobs"
    if not manifest_path.exists() or not blobs.exists():
        return
    listed = {a.sha256 for a in read_manifest(manifest_path.read_bytes(), source="check", public_key=None).adapters}
    for blob in blobs.iterdir():
        sha256 = file_sha256(blob).hexdigest()
        assert blob.name == f"{sha256}.gguf" and sha256 in listed, f"unverified blob left in the cache: {blob.name}"


@pytest.fixture
def manifest(cdn_dir: Path) -> Manifest:
    return read_manifest((cdn_dir / "manifest.json").read_bytes(), source="test", public_key=None)


@pytest_asyncio.fixture
async def cdn(cdn_dir: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FaultCdn:
    fault_cdn = FaultCdn(cdn_dir)
    fault_cdn.server = await aiohttp_server(fault_cdn.app())  # type: ignore[attr-defined]
    return fault_cdn


@pytest_asyncio.fixture
async def make_client(tmp_path: Path, cdn: FaultCdn, key_pair: KeyPair,
                      base_model: Path) -> AsyncIterator[MakeClient]:
    clients: list[CdnClient] = []
    fingerprint = read_info(base_model).fingerprint

    def build(*, budget: int | None = None, public_key: Ed25519PublicKey | None = key_pair[1],
              url: str | None = None, **transfer: Any) -> CdnClient:
        client = CdnClient(url or str(cdn.server.make_url("")).rstrip("/"),  # type: ignore[attr-defined]
                           cache_dir=tmp_path / "cache", public_key=public_key, base_fingerprint=fingerprint,
                           offline=False, sync_settings=SyncSettings(transfer=TransferSettings(**(FAST | transfer)),
                                                                     cache_budget_bytes=budget))
        clients.append(client)
        return client

    yield build
    for client in clients:
        await client.close()


def _source(adapter_sources: Path, name: str) -> bytes:
    return (adapter_sources / f"{name}.gguf").read_bytes()


async def test_sync_downloads_verifies_and_serves_from_cache_after(make_client: MakeClient, cdn: FaultCdn,
                                                                   adapter_sources: Path) -> None:
    client = make_client()
    report = await client.sync(["json-extract"])
    cached = report.results[0].adapter
    assert report.results[0].downloaded and report.manifest_version == 1
    assert cached.path.read_bytes() == _source(adapter_sources, "json-extract")
    assert cached.path.parent == client.store.blobs_dir and cached.sha256 in cached.path.name
    requests = len(cdn.log)
    again = await client.ensure_cached("json-extract")
    assert again == client.store.lookup("json-extract") and len(cdn.log) == requests  # manifest reused, no blob


async def test_an_adapter_updated_on_the_cdn_is_fetched_again_and_the_old_blob_goes(
        tmp_path: Path, make_client: MakeClient, cdn: FaultCdn, adapter_sources: Path, key_pair: KeyPair) -> None:
    client = make_client()
    old = await client.ensure_cached("json-extract")
    source = tmp_path / "v2"
    source.mkdir()
    (source / "json-extract.gguf").write_bytes(_source(adapter_sources, "brand-voice"))  # new content, same name
    publish(source, cdn.root, key=key_pair[0], allow_renamed=True)
    report = await client.sync(["json-extract"])
    assert report.manifest_version == 2 and report.results[0].downloaded
    assert report.results[0].adapter.sha256 != old.sha256 and not old.path.exists()


async def test_an_unchanged_manifest_costs_a_304_and_a_changed_one_is_read(
        tmp_path: Path, make_client: MakeClient, cdn: FaultCdn, adapter_sources: Path, key_pair: KeyPair) -> None:
    client = make_client()
    first = await client.fetch_manifest()
    again = await client.fetch_manifest()
    reads = [s for s in cdn.log if s.path == "manifest.json"]
    assert [(s.status, s.body_bytes > 0) for s in reads] == [(200, True), (304, False)]
    assert reads[1].if_none_match is not None and again == first
    publish(adapter_sources, cdn.root, key=key_pair[0])  # version 2: new bytes, new ETag
    assert (await client.fetch_manifest()).version == 2
    assert cdn.log[-1].status == 200 and cdn.log[-1].if_none_match == reads[1].if_none_match


async def test_sync_all_fetches_every_offered_adapter(make_client: MakeClient, manifest: Manifest) -> None:
    report = await make_client().sync()
    assert sorted(r.adapter.name for r in report.results) == sorted(manifest.names) and report.incompatible == ()


@pytest.mark.parametrize("cut", [0.0, 1, 0.5, 0.99, -1], ids=["0%", "1-byte", "50%", "99%", "one-byte-short"])
async def test_truncated_transfers_resume_from_where_they_stopped(make_client: MakeClient, cdn: FaultCdn,
                                                                  manifest: Manifest, cut: float) -> None:
    cdn.faults = [Fault(truncate_at=cut)]
    size = manifest.entry("brand-voice").size  # type: ignore[union-attr]
    cached = await make_client().ensure_cached("brand-voice")
    first, second = cdn.blob_requests
    assert first.body_bytes < size and second.status == (206 if first.body_bytes else 200)
    assert second.range == (f"bytes={first.body_bytes}-" if first.body_bytes else None)
    assert cdn.body_bytes() == size and cached.size == size


async def test_truncation_on_every_attempt_fails_and_keeps_the_partial_for_later(
        make_client: MakeClient, cdn: FaultCdn, manifest: Manifest) -> None:
    cdn.faults = [Fault(truncate_at=0.3)] * 4
    client = make_client()
    with pytest.raises(TransferFailed, match="after 4 attempts"):
        await client.ensure_cached("brand-voice")
    assert client.store.lookup("brand-voice") is None and len(list(client.store.partial_dir.glob("*.part"))) == 1
    await client.ensure_cached("brand-voice")  # the next call resumes: only the missing bytes travel
    assert cdn.blob_requests[-1].status == 206


@pytest.mark.parametrize("where", ["start", "middle", "end"])
async def test_one_flipped_bit_is_caught_before_the_blob_becomes_visible(make_client: MakeClient, cdn: FaultCdn,
                                                                        manifest: Manifest, where: str) -> None:
    size = manifest.entry("brand-voice").size  # type: ignore[union-attr]
    cdn.faults = [Fault(flip_bit_at={"start": 0, "middle": size // 2, "end": size - 1}[where])]
    client = make_client()
    with pytest.raises(IntegrityError) as caught:
        await client.ensure_cached("brand-voice")
    assert caught.value.expected_sha256 == manifest.entry("brand-voice").sha256  # type: ignore[union-attr]
    assert list(client.store.blobs_dir.iterdir()) == list(client.store.partial_dir.iterdir()) == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_longer_than_the_manifest_says_is_cut_at_the_limit(make_client: MakeClient, cdn: FaultCdn,
                                                                       manifest: Manifest, chunked: bool) -> None:
    cdn.faults = [Fault(extra_bytes=1 << 20, chunked=chunked)]
    client = make_client()
    with pytest.raises(LengthExceeded) as caught:
        await client.ensure_cached("json-extract")
    entry = manifest.entry("json-extract")
    assert entry is not None and caught.value.limit_bytes == entry.size
    assert list(client.store.partial_dir.iterdir()) == [] and client.store.lookup("json-extract") is None


async def test_500_on_every_other_request_is_retried(make_client: MakeClient, cdn: FaultCdn) -> None:
    cdn.faults = [Fault(status=500), None, Fault(status=500), None]
    client = make_client()
    await client.ensure_cached("json-extract")
    await client.ensure_cached("brand-voice")
    assert [r.status for r in cdn.blob_requests] == [500, 200, 500, 200]


async def test_a_burst_of_503_is_retried_with_backoff(make_client: MakeClient, cdn: FaultCdn) -> None:
    cdn.faults = [Fault(status=503)] * 3
    await make_client().ensure_cached("json-extract")
    assert [r.status for r in cdn.blob_requests] == [503, 503, 503, 200]
    cdn.faults = [Fault(status=503)] * 4
    with pytest.raises(TransferFailed, match="HTTP 503 .after 4 attempts") as caught:
        await make_client().ensure_cached("brand-voice")
    assert caught.value.status == 503


async def test_429_waits_for_retry_after(make_client: MakeClient, cdn: FaultCdn) -> None:
    cdn.faults = [Fault(status=429, retry_after="1")]
    started = time.monotonic()
    await make_client().ensure_cached("json-extract")
    assert time.monotonic() - started >= 0.95 and [r.status for r in cdn.blob_requests] == [429, 200]


@pytest.mark.parametrize(("status", "error"), [(404, RemoteNotFound), (403, TransferFailed), (401, TransferFailed)])
async def test_404_and_refusals_fail_fast(make_client: MakeClient, cdn: FaultCdn, status: int,
                                          error: type[Exception]) -> None:
    cdn.faults = [Fault(status=status)]
    with pytest.raises(error, match=f"HTTP {status}"):
        await make_client().ensure_cached("json-extract")
    assert len(cdn.blob_requests) == 1


async def test_a_range_answered_with_200_restarts_from_zero(make_client: MakeClient, cdn: FaultCdn,
                                                            adapter_sources: Path) -> None:
    cdn.faults = [Fault(truncate_at=0.5), Fault(ignore_range=True)]
    cached = await make_client().ensure_cached("brand-voice")
    assert [r.status for r in cdn.blob_requests] == [200, 200] and cdn.blob_requests[1].range is not None
    assert cached.path.read_bytes() == _source(adapter_sources, "brand-voice")


async def test_a_wrong_content_range_empties_the_partial_and_starts_over(make_client: MakeClient, cdn: FaultCdn,
                                                                         manifest: Manifest) -> None:
    size = manifest.entry("brand-voice").size  # type: ignore[union-attr]
    cdn.faults = [Fault(truncate_at=0.5), Fault(content_range=f"bytes 0-{size - 1}/{size}")]
    await make_client().ensure_cached("brand-voice")
    assert [(r.status, r.range) for r in cdn.blob_requests][1:] == [(206, f"bytes={size // 2}-"), (200, None)]


async def test_a_blob_changed_between_attempts_is_refetched_whole(make_client: MakeClient, cdn: FaultCdn,
                                                                 adapter_sources: Path) -> None:
    data = _source(adapter_sources, "brand-voice")
    cdn.faults = [Fault(body=data[::-1], truncate_at=0.5)]  # another version of the file (same length), cut
    cached = await make_client().ensure_cached("brand-voice")
    first, second = cdn.blob_requests
    assert second.if_range is not None and second.status == 200  # If-Range saw a new ETag: whole file
    assert cached.path.read_bytes() == data


async def test_mixed_bytes_without_a_validator_are_caught_and_refetched_once(make_client: MakeClient, cdn: FaultCdn,
                                                                            adapter_sources: Path) -> None:
    data = _source(adapter_sources, "brand-voice")
    client = make_client()
    partial = client.store.open_partial(file_sha256(adapter_sources / "brand-voice.gguf").hexdigest())
    partial.path.write_bytes(data[::-1][: len(data) // 2])  # a leftover of other bytes, no validator saved
    release(partial)  # left by a writer that died
    cached = await client.ensure_cached("brand-voice")
    assert [(r.status, r.range is not None) for r in cdn.blob_requests] == [(206, True), (200, False)]
    assert cached.path.read_bytes() == data


async def test_headers_then_a_stall_is_slow_retrieval(make_client: MakeClient, cdn: FaultCdn) -> None:
    cdn.faults = [Fault(stall_s=5)] * 2
    started = time.monotonic()
    with pytest.raises(SlowRetrieval, match="stalled"):
        await make_client(gap_timeout_s=0.3, max_attempts=2).ensure_cached("json-extract")
    assert time.monotonic() - started < 2.0


async def test_one_byte_per_second_is_below_the_minimum_throughput(make_client: MakeClient, cdn: FaultCdn) -> None:
    cdn.faults = [Fault(bytes_per_second=1)]
    started = time.monotonic()
    with pytest.raises(SlowRetrieval, match="below the minimum"):
        await make_client(max_attempts=1).ensure_cached("json-extract")
    assert time.monotonic() - started < 3.0


async def test_the_overall_deadline_bounds_a_download(make_client: MakeClient, cdn: FaultCdn) -> None:
    cdn.faults = [Fault(bytes_per_second=200)] * 5
    with pytest.raises(SlowRetrieval, match="deadline"):
        await make_client(deadline_s=0.5, min_bytes_per_second=1).ensure_cached("json-extract")


async def test_a_reset_mid_transfer_resends_only_the_missing_bytes(tmp_path: Path, large_adapter: Path,
                                                                   make_client: MakeClient, cdn: FaultCdn) -> None:
    publish(large_adapter, cdn.root, unsigned=True)  # over the signed fixture manifest
    size = (large_adapter / "wide.gguf").stat().st_size
    cdn.faults = [Fault(truncate_at=0.6)]
    await make_client(public_key=None).ensure_cached("wide")
    first, second = cdn.blob_requests
    assert second.status == 206 and second.body_bytes == size - first.body_bytes < 0.5 * size


async def test_a_disk_budget_smaller_than_one_adapter_fails_before_any_download(make_client: MakeClient,
                                                                                cdn: FaultCdn) -> None:
    with pytest.raises(DiskFull, match="adapter_cache_mb"):
        await make_client(budget=100).ensure_cached("json-extract")
    assert cdn.blob_requests == []


async def test_the_budget_evicts_the_least_recently_used_but_not_protected(
        make_client: MakeClient, manifest: Manifest) -> None:
    sizes = {a.name: a.size for a in manifest.adapters}
    client = make_client(budget=max(sizes.values()) + 1)
    await client.ensure_cached("json-extract")
    await client.ensure_cached("brand-voice")
    assert client.store.names() == ("brand-voice",)
    with pytest.raises(DiskFull):
        await client.sync(["json-extract", "brand-voice"])  # both wanted at once: neither evicts the other


async def test_concurrent_requests_for_one_adapter_share_one_download(make_client: MakeClient,
                                                                      cdn: FaultCdn) -> None:
    client = make_client()
    results = await asyncio.gather(*(client.ensure_cached("brand-voice") for _ in range(4)))
    assert len({r.path for r in results}) == 1 and len(cdn.blob_requests) == 1


async def test_a_rolled_back_manifest_is_refused(make_client: MakeClient, cdn: FaultCdn, adapter_sources: Path,
                                                 key_pair: KeyPair) -> None:
    old = (cdn.root / "manifest.json").read_bytes()
    publish(adapter_sources, cdn.root, key=key_pair[0])
    assert (await make_client().fetch_manifest()).version == 2
    cdn.manifest = old
    with pytest.raises(RollbackRefused, match="version 1 is older than version 2"):
        await make_client().fetch_manifest()


@pytest.mark.parametrize("spelling", ["http://localhost:{port}", "HTTP://127.0.0.1:{port}", "http://127.0.0.1:{port}/.",
                                      "http://127.0.0.1:{port}//", "http://[::ffff:127.0.0.1]:{port}"])
async def test_a_rollback_is_refused_whichever_spelling_of_the_cdn_serves_it(
        make_client: MakeClient, cdn: FaultCdn, adapter_sources: Path, key_pair: KeyPair, spelling: str) -> None:
    # Regression: floors were keyed by the URL string, so another spelling of the same CDN accepted version 1 again.
    old = (cdn.root / "manifest.json").read_bytes()
    publish(adapter_sources, cdn.root, key=key_pair[0])
    assert (await make_client().fetch_manifest()).version == 2
    cdn.manifest = old
    url = spelling.format(port=cdn.server.port)  # type: ignore[attr-defined]
    with pytest.raises(RollbackRefused, match="version 1 is older than version 2"):
        await make_client(url=url).fetch_manifest()


async def test_floors_recorded_by_url_before_the_upgrade_still_apply(make_client: MakeClient, cdn: FaultCdn,
                                                                      adapter_sources: Path, key_pair: KeyPair,
                                                                      tmp_path: Path) -> None:
    old = (cdn.root / "manifest.json").read_bytes()
    publish(adapter_sources, cdn.root, key=key_pair[0])
    client = make_client()
    assert (await client.fetch_manifest()).version == 2
    trust = tmp_path / "cache" / "trust.json"
    floors = json.loads(trust.read_text())
    trust.write_text(json.dumps({client.cdn: floors[publisher_id(client.cdn, key_pair[1])]}))  # as written before
    cdn.manifest = old
    with pytest.raises(RollbackRefused):
        await make_client().fetch_manifest()


async def test_an_expired_manifest_is_refused(make_client: MakeClient, cdn: FaultCdn, adapter_sources: Path,
                                              key_pair: KeyPair) -> None:
    publish(adapter_sources, cdn.root, key=key_pair[0], now=datetime.now(timezone.utc) - timedelta(days=31))
    with pytest.raises(ManifestExpired):
        await make_client().sync(["json-extract"])
    assert cdn.blob_requests == []


async def test_a_manifest_signed_by_another_key_is_refused(make_client: MakeClient, cdn: FaultCdn,
                                                           adapter_sources: Path) -> None:
    publish(adapter_sources, cdn.root, key=Ed25519PrivateKey.generate())
    with pytest.raises(SignatureInvalid, match="no signature by the trusted key"):
        await make_client().ensure_cached("json-extract")
    assert cdn.blob_requests == []


async def test_a_manifest_over_sixteen_mebibytes_is_not_read_past_the_limit(make_client: MakeClient,
                                                                            cdn: FaultCdn) -> None:
    cdn.manifest = b" " * (17 << 20)
    with pytest.raises(LengthExceeded, match="16777216 are allowed"):
        await make_client().fetch_manifest()


async def test_a_catalog_of_ten_thousand_adapters_sent_in_4_kib_pieces_is_read_whole(
        make_client: MakeClient, cdn: FaultCdn, manifest: Manifest, key_pair: KeyPair) -> None:
    # Regression: the body was read with one content.read(n), which returns what is buffered (~64 KB), not all.
    template = manifest.adapters[0]
    catalog = dataclasses.replace(manifest, version=2, adapters=tuple(
        dataclasses.replace(template, name=f"task-{i:05d}", sha256=f"{i:064x}") for i in range(10_000)))
    cdn.manifest, cdn.manifest_piece_bytes = sign_manifest(catalog, key_pair[0]), 4096
    assert len(cdn.manifest) > 3_000_000
    fetched = await make_client().fetch_manifest()
    assert fetched == catalog and fetched.entry("task-09999") == catalog.adapters[-1]
    assert cdn.log[-1].body_bytes == len(cdn.manifest)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a%2fb", "a/../../b", "..", ""])
async def test_hostile_names_never_reach_the_network_or_the_disk(make_client: MakeClient, cdn: FaultCdn,
                                                                 name: str) -> None:
    with pytest.raises(InvalidName):
        await make_client().ensure_cached(name)
    assert cdn.log == []


async def test_a_signed_manifest_with_hostile_entries_is_refused(make_client: MakeClient, cdn: FaultCdn,
                                                                 key_pair: KeyPair) -> None:
    from test_manifest import _signed

    document = json.loads((cdn.root / "manifest.json").read_bytes())
    document["signed"]["adapters"][0]["name"] = "../../etc/cron.d/x"
    cdn.manifest = _signed(document["signed"], key_pair[0])
    with pytest.raises(InvalidManifest, match="not a safe adapter name"):
        await make_client().sync()
    assert cdn.blob_requests == []


async def test_unknown_and_incompatible_adapters_are_not_offered(make_client: MakeClient,
                                                                 manifest: Manifest) -> None:
    client = make_client()
    with pytest.raises(AdapterNotFound, match="brand-voice, json-extract"):
        await client.ensure_cached("missing")
    client.base_fingerprint = "0" * 64  # a device running another base model
    report = await client.sync()
    assert report.results == () and sorted(report.incompatible) == sorted(manifest.names)
    with pytest.raises(IncompatibleAdapter, match="converted for base"):
        await client.ensure_cached("json-extract")


@pytest.mark.parametrize("how", ["flag", "EDGE_RT_OFFLINE", "HF_HUB_OFFLINE"])
async def test_offline_mode_makes_zero_connections(tmp_path: Path, make_client: MakeClient, key_pair: KeyPair,
                                                   monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    await make_client().ensure_cached("json-extract")  # cached while online
    counter = count_connections()
    listener = await asyncio.start_server(counter, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if how != "flag":
        monkeypatch.setenv(how, "1")
    client = CdnClient(f"http://127.0.0.1:{port}", cache_dir=tmp_path / "cache", public_key=key_pair[1],
                       offline=True if how == "flag" else None)
    try:
        assert (await client.ensure_cached("json-extract")).name == "json-extract"
        assert [r.adapter.name for r in (await client.sync()).results] == ["json-extract"]
        with pytest.raises(CacheMiss, match="cached adapters: json-extract"):
            await client.ensure_cached("brand-voice")
        with pytest.raises(TransferFailed, match="offline"):
            await client.fetch_manifest()
    finally:
        await client.close()
        listener.close()
        await listener.wait_closed()
    assert counter.count == 0  # type: ignore[attr-defined]


async def test_an_unreachable_cdn_still_serves_what_is_cached(make_client: MakeClient, tmp_path: Path) -> None:
    await make_client().ensure_cached("json-extract")
    counter = count_connections()  # accepts, then hangs up: every request fails
    listener = await asyncio.start_server(counter, "127.0.0.1", 0)
    client = make_client(url=f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}", max_attempts=2)
    try:
        assert (await client.ensure_cached("json-extract")).name == "json-extract"
        with pytest.raises(TransferFailed):
            await client.ensure_cached("brand-voice")
    finally:
        listener.close()
        await listener.wait_closed()


async def test_the_rate_cap_holds_within_20_percent(large_adapter: Path, make_client: MakeClient,
                                                    cdn: FaultCdn) -> None:
    publish(large_adapter, cdn.root, unsigned=True)  # over the signed fixture manifest
    size = (large_adapter / "wide.gguf").stat().st_size
    kbps = 4000  # 500 000 B/s
    progress: list[TransferProgress] = []
    started = time.monotonic()
    await make_client(public_key=None, max_bytes_per_second=kbps * 125, chunk_bytes=16 * 1024).ensure_cached(
        "wide", progress=progress.append)
    rate = size / (time.monotonic() - started)
    assert 0.8 * kbps * 125 <= rate <= 1.2 * kbps * 125, rate
    assert progress[-1].done_bytes == size and progress[-1].eta_s == 0


async def test_a_process_killed_mid_write_leaves_a_partial_the_recovery_scan_resumes(
        tmp_path: Path, large_adapter: Path, make_client: MakeClient, cdn: FaultCdn, base_model: Path) -> None:
    import os
    import signal
    import sys

    publish(large_adapter, cdn.root, unsigned=True)  # over the signed fixture manifest
    size = (large_adapter / "wide.gguf").stat().st_size
    cdn.faults = [Fault(hold_at=0.5)]
    env = os.environ | {"EDGE_RT_HOME": str(tmp_path / "home")}
    env.pop("HF_HUB_OFFLINE", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge_runtime.cli", "sync", "--cdn", str(cdn.server.make_url("")).rstrip("/"),  # type: ignore[attr-defined]
        "--adapters", "wide", "--cache-dir", str(tmp_path / "cache"), "--profile", "auto", "--model", str(base_model),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    partial_dir = tmp_path / "cache" / "partial"
    for _ in range(300):
        parts = list(partial_dir.glob("*.part")) if partial_dir.exists() else []
        if parts and parts[0].stat().st_size >= size // 2:
            break
        await asyncio.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    await process.wait()

    report = recover(AdapterStore(tmp_path / "cache"))
    assert len(report.resumable) == 1 and report.completed == ()
    cached = await make_client(public_key=None).ensure_cached("wide")
    resumed = cdn.blob_requests[-1]
    assert resumed.status == 206 and resumed.if_range is not None and resumed.body_bytes <= size - size // 2
    assert cached.path.read_bytes() == (large_adapter / "wide.gguf").read_bytes()


async def test_file_urls_are_copied_in_under_the_same_checks(tmp_path: Path, cdn_dir: Path, key_pair: KeyPair,
                                                             manifest: Manifest) -> None:
    async with CdnClient(cdn_dir.as_uri(), cache_dir=tmp_path / "cache", public_key=key_pair[1],
                         offline=False) as client:
        assert (await client.ensure_cached("json-extract")).size == manifest.entry("json-extract").size  # type: ignore[union-attr]
        blob = cdn_dir / manifest.entry("brand-voice").path  # type: ignore[union-attr]
        blob.write_bytes(blob.read_bytes()[:-1] + b"!")
        with pytest.raises(IntegrityError):
            await client.ensure_cached("brand-voice")


async def test_hf_sources_read_the_pinned_revision_with_the_token_and_still_check_sha256(
        tmp_path: Path, cdn_dir: Path, key_pair: KeyPair, manifest: Manifest, monkeypatch: pytest.MonkeyPatch,
        aiohttp_server: Callable[..., Awaitable[TestServer]]) -> None:
    hub_server = LocalHub(cdn_dir.parent, "acme/adapters", token="hf_device_token")  # cdn/ inside a private repo
    server = await aiohttp_server(hub_server.app())
    monkeypatch.setenv("HF_ENDPOINT", str(server.make_url("")).rstrip("/"))
    monkeypatch.setenv("HF_TOKEN", "hf_device_token")
    async with CdnClient("hf://acme/adapters@v3/cdn", cache_dir=tmp_path / "cache", public_key=key_pair[1],
                         offline=False) as client:
        cached = await client.ensure_cached("json-extract")
        entry = manifest.entry("json-extract")
        assert entry is not None and cached.sha256 == entry.sha256
        assert cached.path.read_bytes() == (cdn_dir / entry.path).read_bytes()
        assert hub_server.log == [("GET", "cdn/manifest.json"), ("GET", f"cdn/{entry.path}")]
        blob = cdn_dir / manifest.entry("brand-voice").path  # type: ignore[union-attr]
        blob.write_bytes(blob.read_bytes()[::-1])  # the Hub now serves other bytes under the listed name
        with pytest.raises(IntegrityError):
            await client.ensure_cached("brand-voice")
    assert client.store.lookup("brand-voice") is None
    assert not (tmp_path / "hf-cache").exists()  # no second copy in huggingface_hub's cache


async def test_a_private_hub_repository_without_a_token_fails_fast(
        tmp_path: Path, cdn_dir: Path, key_pair: KeyPair, monkeypatch: pytest.MonkeyPatch,
        aiohttp_server: Callable[..., Awaitable[TestServer]]) -> None:
    hub_server = LocalHub(cdn_dir.parent, "acme/adapters", token="hf_device_token")
    server = await aiohttp_server(hub_server.app())
    monkeypatch.setenv("HF_ENDPOINT", str(server.make_url("")).rstrip("/"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
    async with CdnClient("hf://acme/adapters/cdn", cache_dir=tmp_path / "cache", public_key=key_pair[1],
                         offline=False) as client:
        with pytest.raises(TransferFailed, match="HTTP 401"):
            await client.fetch_manifest()
    assert hub_server.log == [("GET", "cdn/manifest.json")]  # refused once, not retried
