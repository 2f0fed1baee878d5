"""The device side of adapter distribution: fetch and verify the manifest, keep verified adapters in the cache.

``CdnClient`` is what ``edge-rt sync`` runs under ``asyncio.run`` and what the daemon keeps for its lifetime::

    async with CdnClient("https://cdn.example/adapters", public_key=key, base_fingerprint=fp) as client:
        cached = await client.ensure_cached("json-extract")   # -> CachedAdapter(path, sha256, size)

Sources: ``http(s)://`` (our own resumable client), ``file://`` (a published folder), ``hf://ORG/REPO[@REV][/DIR]``
(the same HTTP client on the Hub's resolve URLs at that revision, with the Hub token when one is configured: resume,
rate cap and the sha256 check all apply, and no second copy lands in huggingface_hub's cache).
Offline (``offline=True``, ``EDGE_RT_OFFLINE`` or ``HF_HUB_OFFLINE``) makes zero network attempts: cached adapters
are served and anything else raises ``CacheMiss``.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime import hub, settings
from edge_runtime.atomic import atomic_output
from edge_runtime.errors import (
    AdapterNotFound,
    CacheMiss,
    DiskFull,
    EdgeRtError,
    IncompatibleAdapter,
    LengthExceeded,
    RemoteNotFound,
    SourceUnavailable,
    TransferFailed,
)
from edge_runtime.http_client import create_session
from edge_runtime.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest, ManifestEntry, blob_path, read_manifest
from edge_runtime.names import validate_name
from edge_runtime.profiles import MIB, DeviceProfile
from edge_runtime.store import AdapterStore, CachedAdapter
from edge_runtime.transfer import (
    BlobRequest,
    Fetched,
    ProgressCallback,
    RateLimiter,
    TransferSettings,
    copy_local,
    download,
    fetch_bounded,
)
from edge_runtime.trust import TrustStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncSettings:
    """How a device syncs: network limits, the cache's disk budget (bytes, None = unlimited), manifest reuse (s)."""

    transfer: TransferSettings = field(default_factory=TransferSettings)
    cache_budget_bytes: int | None = None
    manifest_ttl_s: float = 300.0

    @classmethod
    def for_profile(cls, profile: DeviceProfile | None, *, max_kbps: int | None = None,
                    cache_mb: int | None = None) -> SyncSettings:
        """The profile's download cap (kbit/s, 0 = none) and cache budget (MiB), each overridable."""
        kbps = max_kbps if max_kbps is not None else (profile.network.max_download_kbps if profile else 0)
        megabytes = cache_mb if cache_mb is not None else (profile.storage.adapter_cache_mb if profile else None)
        return cls(transfer=TransferSettings(max_bytes_per_second=kbps * 125 if kbps else None),
                   cache_budget_bytes=None if megabytes is None else megabytes * MIB)


@dataclass(frozen=True)
class SyncResult:
    """One adapter after a sync: where it is and whether bytes were fetched for it."""

    adapter: CachedAdapter
    downloaded: bool


@dataclass(frozen=True)
class SyncReport:
    """What ``CdnClient.sync`` did."""

    results: tuple[SyncResult, ...]
    incompatible: tuple[str, ...]  # listed, but converted for another base model: not offered
    manifest_version: int | None  # None offline


class _Source(Protocol):
    def url(self, relative: str) -> str: ...

    async def manifest_bytes(self) -> bytes: ...

    async def fetch(self, request: BlobRequest, progress: ProgressCallback | None) -> CachedAdapter: ...

    async def close(self) -> None: ...


class CdnClient:
    """Verified, cached access to the adapters a CDN publishes."""

    def __init__(self, cdn: str, *, cache_dir: Path | None = None, public_key: Ed25519PublicKey | None = None,
                 base_fingerprint: str | None = None, sync_settings: SyncSettings | None = None,
                 offline: bool | None = None, protected: Callable[[], Iterable[str]] | None = None) -> None:
        self.cdn = cdn.rstrip("/")
        self.settings = sync_settings or SyncSettings()
        self.store = AdapterStore(cache_dir or settings.adapter_cache_dir(),
                                  budget_bytes=self.settings.cache_budget_bytes)
        self.public_key = public_key
        self.base_fingerprint = base_fingerprint
        self.offline = settings.offline() if offline is None else offline
        self._protected = protected or (lambda: ())
        self._trust = TrustStore(self.store.root)
        self._limiter = RateLimiter(self.settings.transfer.max_bytes_per_second)
        self._source = _open_source(self.cdn, self.store, self.settings.transfer, self._limiter)
        self._manifest: Manifest | None = None
        self._manifest_at = 0.0
        self._last_document: bytes | None = None  # what last_manifest() reads back, as last written
        self._manifest_lock = asyncio.Lock()
        self._inflight: dict[str, asyncio.Task[CachedAdapter]] = {}
        self._syncing: frozenset[str] = frozenset()

    async def __aenter__(self) -> CdnClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the network session (in-flight downloads keep their partial files for a later resume)."""
        for task in list(self._inflight.values()):
            task.cancel()
        await self._source.close()

    async def fetch_manifest(self) -> Manifest:
        """Fetch, verify (signature, version floor, expiry) and remember the CDN's manifest."""
        if self.offline:
            raise TransferFailed(f"{self.cdn}/{MANIFEST_FILE}", "offline: no network attempt made", attempts=0,
                                 fix="Unset --offline, EDGE_RT_OFFLINE and HF_HUB_OFFLINE to reach the CDN")
        async with self._manifest_lock:
            document = await self._source.manifest_bytes()
            manifest = read_manifest(document, source=self.cdn, public_key=self.public_key)
            if self.public_key is None:
                log.warning("no public key configured: the manifest of %s is not signature-checked", self.cdn)
            self._trust.accept(self.cdn, manifest)
            self._manifest, self._manifest_at = manifest, time.monotonic()
            if document != self._last_document:  # a 304 brings the same bytes: no rewrite (flash wear)
                with atomic_output(self._last_manifest_path()) as temp:
                    temp.write_bytes(document)
                self._last_document = document
            return manifest

    def last_manifest(self) -> Manifest | None:
        """The last manifest this cache verified from this CDN, read from disk (no network): for offline listings.

        Its signature is checked again; its expiry is not (it only names adapters, nothing is fetched from it).
        """
        path = self._last_manifest_path()
        try:
            return read_manifest(_read_bounded(path), source=str(path), public_key=self.public_key)
        except (EdgeRtError, OSError) as exc:
            if path.exists():
                log.warning("the last manifest of %s is not usable: %s", self.cdn, exc)
            return None

    def _last_manifest_path(self) -> Path:
        return self.store.root / "manifests" / f"{hashlib.sha256(self.cdn.encode()).hexdigest()[:16]}.json"

    def offered(self, manifest: Manifest) -> tuple[ManifestEntry, ...]:
        """The manifest's adapters made for this device's base model (all when no base fingerprint is set)."""
        return tuple(a for a in manifest.adapters
                     if self.base_fingerprint is None or a.base_fingerprint == self.base_fingerprint)

    async def ensure_cached(self, name: str, *, progress: ProgressCallback | None = None) -> CachedAdapter:
        """The verified local copy of adapter ``name``, downloading it (once, however many callers) when needed."""
        validate_name(name)
        cached = self.store.lookup(name)
        if self.offline:
            if cached is None:
                raise CacheMiss(name, cached=self.store.names())
            return self._used(cached)
        try:
            manifest = await self._current_manifest()
        except TransferFailed:
            if cached is None:
                raise
            log.warning("%s unreachable: serving the cached %s", self.cdn, name)
            return self._used(cached)
        entry = self._entry(manifest, name)
        if cached is not None and cached.sha256 == entry.sha256:
            return self._used(cached)
        if self.store.blob_path(entry.sha256).is_file():
            return self.store.link(name, entry.sha256)
        result = await self._shared_download(entry, progress, link=True)
        return result if result.name == name else self.store.link(name, entry.sha256)

    async def fetch_update(self, entry: ManifestEntry, *,
                           progress: ProgressCallback | None = None) -> CachedAdapter:
        """The verified blob of ``entry`` on disk, its name still pointing at the version in service.

        The daemon loads it, then calls ``switch``. Until then the blob is staged in the store: cache eviction
        leaves it alone and a restart's index rebuild does not name it after the adapter name inside the file.
        """
        self.store.stage(entry.sha256)
        path = self.store.blob_path(entry.sha256)
        if path.is_file():
            return CachedAdapter(name=entry.name, path=path, sha256=entry.sha256, size=path.stat().st_size,
                                 last_used=time.time())
        return await self._shared_download(entry, progress, link=False)

    def switch(self, name: str, sha256: str) -> CachedAdapter:
        """Point ``name`` at the update ``fetch_update`` fetched; the blob it replaces goes unless shared."""
        cached = self.store.link(name, sha256)
        self.store.unstage(sha256)
        return cached

    def abandon(self, sha256: str) -> None:
        """Give up an update ``fetch_update`` fetched (it did not load): its blob goes unless a name uses it."""
        self.store.unstage(sha256)
        self.store.drop_if_unnamed(sha256)

    def prune_staged(self, manifest: Manifest, *, busy: Iterable[str] = ()) -> None:
        """Unstage updates ``manifest`` no longer lists (superseded or withdrawn) and no update is still working on
        (``busy``): eviction may take them."""
        for sha256 in self.store.staged() - {a.sha256 for a in manifest.adapters} - set(busy):
            self.store.unstage(sha256)

    async def sync(self, names: Sequence[str] | None = None, *,
                   progress: ProgressCallback | None = None) -> SyncReport:
        """Make ``names`` (every offered adapter when None) cached and current; they are protected from eviction."""
        if self.offline:
            chosen = list(names) if names is not None else list(self.store.names())
            results = [SyncResult(await self.ensure_cached(n), downloaded=False) for n in chosen]
            return SyncReport(results=tuple(results), incompatible=(), manifest_version=None)
        manifest = await self.fetch_manifest()
        offered = self.offered(manifest)
        chosen = list(names) if names is not None else [a.name for a in offered]
        incompatible = tuple(a.name for a in manifest.adapters if a not in offered)
        self._syncing = frozenset(chosen)
        try:
            results = []
            for name in chosen:
                before = self.store.lookup(name)
                adapter = await self.ensure_cached(name, progress=progress)
                results.append(SyncResult(adapter, downloaded=before is None or before.sha256 != adapter.sha256))
        finally:
            self._syncing = frozenset()
        return SyncReport(results=tuple(results), incompatible=incompatible, manifest_version=manifest.version)

    async def _current_manifest(self) -> Manifest:
        if self._manifest is not None and time.monotonic() - self._manifest_at < self.settings.manifest_ttl_s:
            return self._manifest
        return await self.fetch_manifest()

    def _entry(self, manifest: Manifest, name: str) -> ManifestEntry:
        entry = manifest.entry(name)
        if entry is None:
            raise AdapterNotFound(name, tuple(a.name for a in self.offered(manifest)))
        if self.base_fingerprint is not None and entry.base_fingerprint != self.base_fingerprint:
            raise IncompatibleAdapter(
                f"adapter {name!r} on {self.cdn} was converted for base {entry.base_fingerprint[:12]}, this device "
                f"runs base {self.base_fingerprint[:12]}",
                fix="Publish a conversion for this device's base model (`edge-rt convert --base`)")
        return entry

    async def _shared_download(self, entry: ManifestEntry, progress: ProgressCallback | None, *,
                               link: bool) -> CachedAdapter:
        task = self._inflight.get(entry.sha256)
        if task is None:
            task = asyncio.create_task(self._download(entry, progress, link=link))
            self._inflight[entry.sha256] = task
            task.add_done_callback(lambda _: self._inflight.pop(entry.sha256, None))
        return await asyncio.shield(task)

    def _used(self, cached: CachedAdapter) -> CachedAdapter:
        self.store.touch(cached.name)
        return self.store.lookup(cached.name) or cached

    async def _download(self, entry: ManifestEntry, progress: ProgressCallback | None, *,
                        link: bool) -> CachedAdapter:
        protected = set(self._protected()) | self._syncing
        self.store.make_room(entry.name, entry.size, protected=protected)
        request = BlobRequest(name=entry.name, url=self._source.url(blob_path(entry.sha256)), sha256=entry.sha256,
                              size=entry.size, link=link)
        try:
            return await self._source.fetch(request, progress)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise DiskFull(entry.name, needed_bytes=entry.size, available_bytes=shutil.disk_usage(self.store.root).free,
                           limit="free disk space") from exc


async def run_sync(cdn: str, names: Sequence[str] | None, *, progress: ProgressCallback | None = None,
                   **client_options: Any) -> SyncReport:
    """Recover the cache (start-up scan), then sync ``names`` (all offered when None): what ``edge-rt sync`` runs."""
    async with CdnClient(cdn, **client_options) as client:
        await asyncio.to_thread(client.store.recover)
        return await client.sync(names, progress=progress)


def _open_source(cdn: str, store: AdapterStore, transfer: TransferSettings, limiter: RateLimiter) -> _Source:
    scheme = urlparse(cdn).scheme
    if scheme in ("http", "https"):
        return _HttpSource(cdn, store=store, transfer=transfer, limiter=limiter)
    if scheme == "file":
        return _FileSource(Path(unquote(urlparse(cdn).path)), store)
    if hub.is_hub_source(cdn):
        return _HubSource(hub.parse_hub_source(cdn), store=store, transfer=transfer, limiter=limiter)
    raise SourceUnavailable(cdn, "unsupported CDN address",
                            fix="Use http(s)://HOST/PATH, file:///PATH or hf://ORG/REPO[@REVISION]")


class _HttpSource:
    """A CDN folder served over HTTP(S) by any static server."""

    def __init__(self, base_url: str, *, store: AdapterStore, transfer: TransferSettings,
                 limiter: RateLimiter) -> None:
        self.base_url = base_url
        self.store = store
        self.transfer = transfer
        self.limiter = limiter
        self._session: aiohttp.ClientSession | None = None
        self._manifest: Fetched | None = None  # the last manifest body and its ETag, for If-None-Match

    def url(self, relative: str) -> str:
        """The address of a file of the published folder."""
        return f"{self.base_url}/{relative}"

    def headers(self) -> dict[str, str]:
        """Extra headers every request of this source sends."""
        return {}

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = create_session(connect_timeout_s=self.transfer.connect_timeout_s,
                                           gap_timeout_s=self.transfer.gap_timeout_s, headers=self.headers())
        return self._session

    async def manifest_bytes(self) -> bytes:
        """The manifest; a 304 to If-None-Match re-uses the last body (it is verified again, expiry included)."""
        last = self._manifest
        fetched = await fetch_bounded(self.session(), self.url(MANIFEST_FILE),
                                      limit_bytes=MAX_MANIFEST_BYTES, settings=self.transfer,
                                      etag=last.etag if last is not None else None)
        if fetched.body is None:  # 304 Not Modified: only possible when an ETag (and so a body) was kept
            assert last is not None and last.body is not None
            return last.body
        self._manifest = fetched
        return fetched.body

    async def fetch(self, request: BlobRequest, progress: ProgressCallback | None) -> CachedAdapter:
        return await download(self.session(), request, store=self.store, settings=self.transfer,
                              limiter=self.limiter, progress=progress)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _FileSource:
    """A published CDN folder on a local or mounted file system."""

    def __init__(self, root: Path, store: AdapterStore) -> None:
        self.root = root
        self.store = store

    def url(self, relative: str) -> str:
        return str(self.root / relative)

    async def manifest_bytes(self) -> bytes:
        return _read_bounded(self.root / MANIFEST_FILE)

    async def fetch(self, request: BlobRequest, progress: ProgressCallback | None) -> CachedAdapter:
        return await asyncio.to_thread(copy_local, self.root / blob_path(request.sha256), request, store=self.store,
                                       progress=progress)

    async def close(self) -> None:
        return None


class _HubSource(_HttpSource):
    """A CDN folder uploaded to a Hugging Face Hub repository, read over HTTP at a pinned revision."""

    def __init__(self, source: hub.HubSource, *, store: AdapterStore, transfer: TransferSettings,
                 limiter: RateLimiter) -> None:
        super().__init__(str(source), store=store, transfer=transfer, limiter=limiter)
        self.source = source

    def url(self, relative: str) -> str:
        return hub.file_url(self.source, relative)

    def headers(self) -> dict[str, str]:
        return hub.auth_headers()


def _read_bounded(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            document = handle.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError as exc:
        raise RemoteNotFound(str(path), "no manifest.json there",
                             fix="Point --cdn at a folder written by `edge-rt publish`") from exc
    if len(document) > MAX_MANIFEST_BYTES:
        raise LengthExceeded(str(path), limit_bytes=MAX_MANIFEST_BYTES, received_bytes=len(document))
    return document
