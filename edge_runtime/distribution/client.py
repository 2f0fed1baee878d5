"""The device's CDN client: fetch and verify the manifest, keep verified adapters in the cache.

``CdnClient`` is what ``edge-rt sync`` runs under ``asyncio.run`` and what the daemon keeps for its lifetime::

    async with CdnClient("https://cdn.example/adapters", public_key=key, base_fingerprint=fp) as client:
        cached = await client.ensure_cached("json-extract")   # -> CachedAdapter(path, sha256, size)

Sources (``sources.py``): ``http(s)://`` (our own resumable client), ``file://`` (a published folder),
``hf://ORG/REPO[@REV][/DIR]`` (the same HTTP client on the Hub's resolve URLs at that revision, with the Hub token
when one is configured: resume, rate cap and the sha256 check all apply, and no second copy lands in
huggingface_hub's cache), ``oci://HOST[:PORT]/REPO[:TAG]`` (a release pushed to an OCI registry: the same client on
the registry's blob URLs, with its auth).
Offline (``offline=True``, ``EDGE_RT_OFFLINE`` or ``HF_HUB_OFFLINE``) makes zero network attempts: cached adapters
are served and anything else raises ``CacheMiss``.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime import settings
from edge_runtime.distribution.manifest import MANIFEST_FILE, Manifest, ManifestEntry, blob_path, read_manifest
from edge_runtime.distribution.recovery import recover
from edge_runtime.distribution.sink import BlobRequest
from edge_runtime.distribution.sources import open_source, read_manifest_file
from edge_runtime.distribution.store import AdapterStore, CachedAdapter
from edge_runtime.distribution.transfer import ProgressCallback, RateLimiter, TransferSettings
from edge_runtime.distribution.trust import TrustStore, publisher_id
from edge_runtime.errors import (
    AdapterNotFound,
    CacheMiss,
    DiskFull,
    EdgeRtError,
    IncompatibleAdapter,
    InvalidSettings,
    TransferFailed,
)
from edge_runtime.files import atomic_output
from edge_runtime.profiles import DeviceProfile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncSettings:
    """How a device syncs: network limits, the cache's disk budget (bytes, None = unlimited), manifest reuse (s).

    ``defer_updates``: the link is metered, so new versions of cached adapters are not fetched in the background
    (adapters a request needs are still pulled on demand).
    """

    transfer: TransferSettings = field(default_factory=TransferSettings)
    cache_budget_bytes: int | None = None
    manifest_ttl_s: float = 300.0
    defer_updates: bool = False

    @classmethod
    def for_profile(
        cls,
        profile: DeviceProfile | None,
        *,
        max_kbps: int | None = None,
        cache_mb: int | None = None,
        allow_metered_updates: bool = False,
    ) -> SyncSettings:
        """The profile's download cap (kbit/s, 0 = none), cache budget (MiB) and metered flag, each overridable."""
        rate = profile.max_download_bytes_per_second if profile else None
        if max_kbps is not None:
            rate = max_kbps * 125 or None
        cache = profile.adapter_cache_bytes if profile else None
        if cache_mb is not None:
            cache = cache_mb << 20
        metered = profile is not None and profile.network.metered
        return cls(
            transfer=TransferSettings(max_bytes_per_second=rate),
            cache_budget_bytes=cache,
            defer_updates=metered and not allow_metered_updates,
        )


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


class CdnClient:
    """Verified, cached access to the adapters a CDN publishes."""

    def __init__(
        self,
        cdn: str,
        *,
        cache_dir: Path | None = None,
        public_key: Ed25519PublicKey | None = None,
        base_fingerprint: str | None = None,
        sync_settings: SyncSettings | None = None,
        offline: bool | None = None,
        protected: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.cdn = cdn.rstrip("/")
        self.settings = sync_settings or SyncSettings()
        self.store = AdapterStore(
            cache_dir or settings.adapter_cache_dir(), budget_bytes=self.settings.cache_budget_bytes
        )
        self.public_key = public_key
        self.base_fingerprint = base_fingerprint
        self.offline = settings.offline() if offline is None else offline
        self._protected = protected or (lambda: ())
        self._trust = TrustStore(self.store.root)
        self._publisher = publisher_id(self.cdn, public_key)
        self._limiter = RateLimiter(self.settings.transfer.max_bytes_per_second)
        self._source = open_source(self.cdn, self.store, self.settings.transfer, self._limiter)
        self._manifest: Manifest | None = None
        self._manifest_at = 0.0
        self._last_document: bytes | None = None  # what last_manifest() reads back, as last written
        self._manifest_lock = asyncio.Lock()
        self._inflight: dict[str, asyncio.Task[CachedAdapter]] = {}
        self._syncing: frozenset[str] = frozenset()

    async def __aenter__(self) -> CdnClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    def cancel_downloads(self) -> None:
        """Stop the downloads under way (their partial files stay for a resume); callers waiting get CancelledError."""
        for task in list(self._inflight.values()):
            task.cancel()

    async def close(self) -> None:
        """Close the network session (in-flight downloads keep their partial files for a later resume)."""
        downloads = list(self._inflight.values())
        for task in downloads:
            task.cancel()
        # Their clean-up (releasing the partial's claim) runs on the store's worker: let it finish before the worker
        # stops (a Ctrl-C in `sync` printed "cannot schedule new futures after shutdown" tracebacks).
        await asyncio.gather(*downloads, return_exceptions=True)
        await self._source.close()
        await asyncio.to_thread(self.store.close)

    async def fetch_manifest(self) -> Manifest:
        """Fetch, verify (signature, version floor, expiry) and remember the CDN's manifest."""
        if self.offline:
            raise TransferFailed(
                f"{self.cdn}/{MANIFEST_FILE}",
                "offline: no network attempt made",
                attempts=0,
                fix="Unset --offline, EDGE_RT_OFFLINE and HF_HUB_OFFLINE to reach the CDN",
            )
        async with self._manifest_lock:
            document = await self._source.manifest_bytes()
            manifest = await asyncio.to_thread(read_manifest, document, source=self.cdn, public_key=self.public_key)
            if self.public_key is None:
                log.warning("no public key configured: the manifest of %s is not signature-checked", self.cdn)
            await self.store.call(self._accept_locked, manifest, document)
            self._manifest, self._manifest_at = manifest, time.monotonic()
            return manifest

    def _accept_locked(self, manifest: Manifest, document: bytes) -> None:
        with self.store.locked():  # trust.json is read, checked and rewritten by every process on this cache
            self._accept(manifest, document)

    def _accept(self, manifest: Manifest, document: bytes) -> None:
        """Raise the trust floors to ``manifest`` (or refuse it) and keep its document for offline listings."""
        self._trust.accept(self._publisher, manifest, source=self.cdn, fallbacks=(self.cdn,))
        if document != self._last_document:  # a 304 brings the same bytes: no rewrite (flash wear)
            with atomic_output(self._last_manifest_path()) as temp:
                temp.write_bytes(document)
            self._last_document = document

    async def reset_trust(self) -> bool:
        """Forget the version and clock floors of this unsigned CDN (``sync --reset-trust``): a forged manifest may
        have raised them. True when there were some. A pinned key's floors are never reset (``InvalidSettings``)."""
        if self.public_key is not None:
            raise InvalidSettings(
                "--reset-trust",
                True,
                "it only resets the floors of unsigned CDNs; a pinned key's floors were proved by its signatures",
                fix="Drop --reset-trust (a rollback under a key is refused for good; publish a newer version instead)",
            )
        return await self.store.call(self._reset_trust_locked)

    def _reset_trust_locked(self) -> bool:
        with self.store.locked():
            dropped = [self._trust.reset(self._publisher), self._trust.reset(self.cdn)]
        if any(dropped):
            log.warning("trust floors of %s reset by the operator", self.cdn)
        return any(dropped)

    async def last_manifest(self) -> Manifest | None:
        """The last manifest this cache verified from this CDN, read from disk (no network): for offline listings.

        Its signature is checked again; its expiry is not (it only names adapters, nothing is fetched from it).
        """
        return await self.store.call(self._read_last_manifest)

    def _read_last_manifest(self) -> Manifest | None:
        path = self._last_manifest_path()
        try:
            return read_manifest(read_manifest_file(path), source=str(path), public_key=self.public_key)
        except (EdgeRtError, OSError) as exc:
            if path.exists():
                log.warning("the last manifest of %s is not usable: %s", self.cdn, exc)
            return None

    def _last_manifest_path(self) -> Path:
        return self.store.root / "manifests" / f"{hashlib.sha256(self.cdn.encode()).hexdigest()[:16]}.json"

    def offered(self, manifest: Manifest) -> tuple[ManifestEntry, ...]:
        """The manifest's adapters made for this device's base model (all when no base fingerprint is set)."""
        return tuple(
            a for a in manifest.adapters if self.base_fingerprint is None or a.base_fingerprint == self.base_fingerprint
        )

    async def ensure_cached(
        self, name: str, *, progress: ProgressCallback | None = None, current: bool = True
    ) -> CachedAdapter:
        """The verified local copy of adapter ``name``, downloading it (once, however many callers) when needed.

        With ``current`` (a sync) a cached copy is checked against the manifest first, which may mean fetching it;
        without (a daemon's request, whose updates follow in the background) a cached copy is used at once. The
        name is checked where it becomes a path (``store.lookup``).
        """
        cached = await self.store.call(self._lookup_trusted, name)
        if cached is not None and not current:
            return await self.store.call(self._used, cached)
        if self.offline:
            if cached is None:
                raise CacheMiss(name, cached=await self.store.call(self._trusted_names))
            return await self.store.call(self._used, cached)
        try:
            manifest = await self._current_manifest()
        except TransferFailed:
            if cached is None:
                raise
            log.warning("%s unreachable: serving the cached %s", self.cdn, name)
            return await self.store.call(self._used, cached)
        entry = self._entry(manifest, name)
        if cached is not None and cached.sha256 == entry.sha256:
            return await self.store.call(self._used, cached)
        linked = await self.store.call(self._link_if_present, name, entry.sha256)
        if linked is not None:
            return linked
        result = await self._shared_download(entry, progress, link=True)
        return (
            result
            if result.name == name
            else await self.store.call(
                functools.partial(self.store.link, name, entry.sha256, publisher=self._publisher)
            )
        )

    async def fetch_update(self, entry: ManifestEntry, *, progress: ProgressCallback | None = None) -> CachedAdapter:
        """The verified blob of ``entry`` on disk, its name still pointing at the version in service.

        The daemon loads it, then calls ``switch``. Until then the blob is staged in the store: cache eviction
        leaves it alone and a restart's index rebuild does not name it after the adapter name inside the file.
        """
        staged = await self.store.call(self._stage, entry)
        return staged or await self._shared_download(entry, progress, link=False)

    def _stage(self, entry: ManifestEntry) -> CachedAdapter | None:
        """Mark ``entry``'s blob as a staged update; the blob when it is already on disk."""
        self.store.stage(entry.sha256)
        path = self.store.blob_path(entry.sha256)
        if not path.is_file():
            return None
        return CachedAdapter(
            name=entry.name, path=path, sha256=entry.sha256, size=path.stat().st_size, last_used=time.time()
        )

    def _link_if_present(self, name: str, sha256: str) -> CachedAdapter | None:
        """Point ``name`` at blob ``sha256`` when the cache already holds it (another name uses the same bytes)."""
        if not self.store.blob_path(sha256).is_file():
            return None
        return self.store.link(name, sha256, publisher=self._publisher)

    def trusted(self, cached: CachedAdapter) -> bool:
        """Whether this client may serve ``cached``: always without a pinned key (nothing is verified then); with one,
        when its ref was verified by that key, or this key's last verified manifest lists the same (name, sha256)
        (a ref rebuilt by recovery, or written before refs recorded who verified them). Another publisher's sync
        into the same cache never decides what a key-pinned daemon serves."""
        if self.public_key is None or cached.publisher == self._publisher:
            return True
        manifest = self._manifest or self._read_last_manifest()
        entry = None if manifest is None else manifest.entry(cached.name)
        return entry is not None and entry.sha256 == cached.sha256

    def _trusted_names(self) -> tuple[str, ...]:
        return tuple(sorted(a.name for a in self.store.adapters() if self.trusted(a)))

    def _lookup_trusted(self, name: str) -> CachedAdapter | None:
        cached = self.store.lookup(name)
        if cached is not None and not self.trusted(cached):
            log.warning(
                "cached %s (%s) was verified by %s, not by this client's key: not used",
                name,
                cached.sha256[:12],
                cached.publisher or "no recorded publisher",
            )
            return None
        return cached

    def switch(self, name: str, sha256: str, *, replaced: str | None = None) -> CachedAdapter:
        """Point ``name`` at the update ``fetch_update`` fetched; the blob it replaces (``replaced``, or what the name
        pointed at) goes unless another name uses it or a live process leases it. Another process on this cache
        may have switched the name already: its old blob is then ``replaced``'s to drop."""
        cached = self.store.link(name, sha256, publisher=self._publisher)
        self.store.unstage(sha256)
        if replaced is not None and replaced != sha256:
            self.store.drop_if_unnamed(replaced)
        return cached

    def abandon(self, sha256: str) -> None:
        """Give up an update ``fetch_update`` fetched (it did not load): its blob goes unless a name uses it."""
        self.store.unstage(sha256)
        self.store.drop_if_unnamed(sha256)

    async def prune_staged(self, manifest: Manifest, *, busy: Iterable[str] = ()) -> None:
        """Unstage updates ``manifest`` no longer lists (superseded or withdrawn) and no update is still working on
        (``busy``): eviction may take them."""
        listed, busy = {a.sha256 for a in manifest.adapters}, set(busy)
        for sha256 in await self.store.call(self.store.staged) - listed - busy:
            await self.store.call(self.store.unstage, sha256)

    async def sync(self, names: Sequence[str] | None = None, *, progress: ProgressCallback | None = None) -> SyncReport:
        """Make ``names`` (every offered adapter when None) cached and current; they are protected from eviction."""
        if self.offline:
            chosen = list(names) if names is not None else list(await self.store.call(self.store.names))
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
                before = await self.store.call(self.store.lookup, name)
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
                fix="Publish a conversion for this device's base model (`edge-rt convert --base`)",
            )
        return entry

    async def _shared_download(
        self, entry: ManifestEntry, progress: ProgressCallback | None, *, link: bool
    ) -> CachedAdapter:
        task = self._inflight.get(entry.sha256)
        if task is None:
            task = asyncio.create_task(self._download(entry, progress, link=link))
            self._inflight[entry.sha256] = task
            task.add_done_callback(lambda _: self._inflight.pop(entry.sha256, None))
        return await asyncio.shield(task)

    def _used(self, cached: CachedAdapter) -> CachedAdapter:
        self.store.touch(cached.name)
        return self.store.lookup(cached.name) or cached

    async def _download(self, entry: ManifestEntry, progress: ProgressCallback | None, *, link: bool) -> CachedAdapter:
        protected = set(self._protected()) | self._syncing
        await self.store.call(
            functools.partial(self.store.make_room, entry.name, entry.size, protected=protected, sha256=entry.sha256)
        )
        request = BlobRequest(
            name=entry.name,
            url=self._source.url(blob_path(entry.sha256)),
            sha256=entry.sha256,
            size=entry.size,
            link=link,
            publisher=self._publisher,
        )
        try:
            return await self._source.fetch(request, progress)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise DiskFull(
                entry.name,
                needed_bytes=entry.size,
                available_bytes=shutil.disk_usage(self.store.root).free,
                limit="free disk space",
            ) from exc


async def run_sync(
    cdn: str,
    names: Sequence[str] | None,
    *,
    progress: ProgressCallback | None = None,
    reset_trust: bool = False,
    **client_options: Any,
) -> SyncReport:
    """Recover the cache (start-up scan), then sync ``names`` (all offered when None): what ``edge-rt sync`` runs."""
    async with CdnClient(cdn, **client_options) as client:
        if reset_trust:
            await client.reset_trust()
        await client.store.call(recover, client.store)
        return await client.sync(names, progress=progress)
