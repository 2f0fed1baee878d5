"""The daemon's view of a CDN: remote adapters listed, pulled on first use, updated only once the new one loads.

``CdnFollower`` joins the CDN client (``distribution/client.py``) to the adapter manager (``runtime/adapters.py``)
for ``edge-rt serve --cdn``. At start it re-verifies the cache and registers what is there, then reads the manifest
before the daemon serves. About every ``manifest_ttl_s`` (+-20%, and backing off after failures: ``RefreshSchedule``,
so a fleet that restarted together drifts apart) and on ``POST /v1/sync`` it asks again with If-None-Match, then

- lists newly offered adapters as ``remote`` and forgets remote ones the CDN no longer offers (pulled copies stay);
- for an adapter whose content changed, downloads and verifies the new blob beside the old, has llama.cpp load it,
  and only then points the name at it. The old version keeps serving throughout. A version llama.cpp refuses is
  logged and not tried again until the CDN publishes another; one that cannot be fetched, or does not fit in memory
  beside a busy old version, is tried again at the next refresh. Only adapters that came from the CDN follow it:
  one loaded from ``--adapters-dir`` stays as given.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_runtime.distribution.client import CdnClient
from edge_runtime.distribution.manifest import ManifestEntry
from edge_runtime.distribution.recovery import recover
from edge_runtime.distribution.schedule import RefreshSchedule
from edge_runtime.distribution.store import CachedAdapter
from edge_runtime.distribution.transfer import TransferProgress
from edge_runtime.errors import (
    BudgetExceeded,
    CacheMiss,
    EdgeRtError,
    IncompatibleAdapter,
    InvalidGGUF,
    InvalidTransition,
    ShuttingDown,
)
from edge_runtime.runtime.adapters import AdapterManager

log = logging.getLogger(__name__)
START_REFRESH_S = 10.0  # how long a starting daemon waits for the manifest before serving its cache


@dataclass(frozen=True)
class RefreshReport:
    """What one manifest refresh found."""

    version: int
    offered: tuple[str, ...]
    new_remote: tuple[str, ...]  # offered adapters this device had not seen
    withdrawn: tuple[str, ...]  # remote-only adapters the CDN stopped offering (forgotten)
    updating: tuple[str, ...]  # local adapters with a new version on the CDN (being fetched and loaded)
    deferred: tuple[str, ...] = ()  # local adapters with a new version not fetched: the link is metered


class CdnFollower:
    """Keeps an adapter manager following a CDN for the life of a daemon."""

    def __init__(self, cdn: CdnClient, manager: AdapterManager) -> None:
        self.cdn = cdn
        self.manager = manager
        self._refresher: asyncio.Task[None] | None = None
        self._updates: dict[str, tuple[str, asyncio.Task[None]]] = {}  # name -> (sha256, task) of its update
        self._rejected: set[str] = set()  # sha256 of versions that did not load: not retried
        self._followed: set[str] = set()  # names that came from the CDN (others, e.g. --adapters-dir, stay as given)
        self._switching: set[asyncio.Future[None]] = set()  # shielded load + rename steps still running
        self._pulling: dict[str, TransferProgress | None] = {}  # pulls under way: their last progress report
        self._pull_tasks: dict[str, asyncio.Task[None]] = {}  # one pull per name, however many requests wait
        self._stopping = False  # stop_pulls() was called: waiting requests are answered 503
        self.waiting: dict[str, int] = {}  # name -> requests waiting for its download (the status page shows them)
        self.updated: dict[str, tuple[float, str, str]] = {}  # name -> (when, sha256 replaced, sha256 now)
        self.descriptions: dict[str, str] = {}  # name -> description, from the last manifest verified
        self.version: int | None = None  # of the last manifest verified
        self.last_refresh: float | None = None  # when it was verified (seconds since the epoch)
        self.last_error: str | None = None  # why the last refresh failed (None: it did not)
        self.refresh_failures = 0  # refreshes that failed since start (for /metrics: a stuck device can be alerted on)
        self.deferred: dict[str, str] = {}  # name -> sha256 of updates held back by a metered link
        self.other_base: tuple[str, ...] = ()  # offered adapters skipped: converted for another base model
        self.on_pull: Callable[[str, int, float, bool], None] | None = None  # (name, bytes, seconds, ok) for metrics

    async def start(self) -> None:
        """Recover the cache, register cached adapters, read the manifest once, then refresh in the background."""
        store = self.cdn.store
        await store.call(recover, store)
        local = set(self.manager.names())  # e.g. --adapters-dir: the operator's files win over cached copies
        for cached in await store.call(store.adapters):
            if not await store.call(self.cdn.trusted, cached):  # another publisher's sync wrote it
                log.warning(
                    "cached adapter %s is not served: %s verified it, not this daemon's --public-key",
                    cached.name,
                    cached.publisher or "no recorded publisher",
                )
                continue
            if cached.name in local:
                log.warning("cached adapter %s is not served: a local file of that name is", cached.name)
                continue
            try:
                await self._register(cached)
            except EdgeRtError as exc:
                log.warning("cached adapter %s is not served: %s", cached.name, exc)
        if self.cdn.offline:  # no network: the last verified manifest still names what was not pulled (cache misses)
            known = await self.cdn.last_manifest()
            for entry in self.cdn.offered(known) if known is not None else ():
                self.manager.add_remote(entry.name, sha256=entry.sha256, size_bytes=entry.size)
            return
        # Before serving, so remote adapters are listed from the first request on; but a stalling CDN must not keep
        # the daemon (and its cached adapters) down: after START_REFRESH_S it serves and the read goes on.
        first = asyncio.create_task(self._refresh_logged())
        done, _ = await asyncio.wait([first], timeout=START_REFRESH_S)
        if not done:
            log.warning(
                "the manifest of %s did not arrive within %.0f s: serving the cache meanwhile",
                self.cdn.cdn,
                START_REFRESH_S,
            )
        self._refresher = asyncio.create_task(self._refresh_forever(first))

    async def close(self) -> None:
        """Stop refreshing and updating (partial downloads stay for a later resume) and close the client."""
        tasks = [t for t in (self._refresher, *self._update_tasks()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._switching, return_exceptions=True)  # a load + rename finishes before the runtime
        await self.cdn.close()

    async def refresh(self) -> RefreshReport:
        """Fetch and verify the manifest; list new adapters, forget withdrawn ones, start due updates."""
        try:
            manifest = await self.cdn.fetch_manifest()
        except EdgeRtError as exc:  # the status page and `edge-rt status` show it, whoever asked for the refresh
            self.last_error = str(exc)
            self.refresh_failures += 1
            log.warning("manifest refresh from %s failed: %s", self.cdn.cdn, exc)
            raise
        self.version, self.last_refresh, self.last_error = manifest.version, time.time(), None
        offered = self.cdn.offered(manifest)
        self._note_other_base([entry for entry in manifest.adapters if entry not in offered])
        self.descriptions = {entry.name: entry.description for entry in offered if entry.description}
        names = tuple(entry.name for entry in offered)
        added = tuple(e.name for e in offered if self.manager.add_remote(e.name, sha256=e.sha256, size_bytes=e.size))
        withdrawn = tuple(self.manager.forget_remote(keep=names))
        await self.cdn.prune_staged(manifest, busy={sha256 for sha256, _ in self._updates.values()})
        due = [
            e
            for e in offered
            if e.name in self._followed and e.sha256 not in self._rejected and self.manager.outdated(e.name, e.sha256)
        ]
        deferred: tuple[str, ...] = ()
        self.deferred = {}
        if due and self.cdn.settings.defer_updates:  # a metered link: updates wait for `serve --allow-metered-...`
            deferred, due = tuple(e.name for e in due), []
            self.deferred = {e.name: e.sha256 for e in offered if e.name in deferred}
            log.info(
                "updates of %s deferred: the profile's link is metered (serve --allow-metered-updates)",
                ", ".join(deferred),
            )
        for entry in due:
            if entry.name not in self._updates:
                self._updates[entry.name] = (entry.sha256, asyncio.create_task(self._update(entry)))
        return RefreshReport(
            version=manifest.version,
            offered=names,
            new_remote=added,
            withdrawn=withdrawn,
            updating=tuple(e.name for e in due),
            deferred=deferred,
        )

    def _note_other_base(self, skipped: list[ManifestEntry]) -> None:
        """Say (once per change) which offered adapters were made for another base; requests for them say why."""
        base = (self.cdn.base_fingerprint or "")[:12]
        for entry in skipped:
            self.manager.refuse(
                entry.name,
                f"{self.cdn.cdn} offers it converted for another base model (fingerprint "
                f"{entry.base_fingerprint[:12]}; this daemon runs {base})",
            )
        names = tuple(sorted(entry.name for entry in skipped))
        if names and names != self.other_base:
            log.warning(
                "skipped %d adapters %s offers for another base model: %s",
                len(names),
                self.cdn.cdn,
                ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""),
            )
        self.other_base = names

    async def settle(self) -> None:
        """Wait for the updates under way (each logs its own failure); cancelling the wait leaves them running."""
        if self._updates:
            await asyncio.wait(self._update_tasks())

    async def pull(self, names: list[str]) -> None:
        """Download the named adapters the device knows only from the CDN, or whose cached file vanished (deleted
        by hand, or by a process that ignores leases); other requests go on meanwhile."""
        for name in names:
            if self.manager.is_remote(name) or (name in self._followed and await asyncio.to_thread(self._gone, name)):
                task = self._pull_tasks.get(name)
                if task is None:  # the first waiter starts it; it is logged and counted once
                    task = self._pull_tasks[name] = asyncio.create_task(self._pull(name))
                    task.add_done_callback(lambda _, name=name: self._pull_tasks.pop(name, None))  # type: ignore[misc]
                self.waiting[name] = self.waiting.get(name, 0) + 1
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    if not self._stopping or not task.cancelled():
                        raise
                    raise ShuttingDown(
                        f"the download of adapter {name} was stopped (it resumes from where it "
                        "stopped on the next start)"
                    ) from None
                finally:
                    self.waiting[name] -= 1
                    if not self.waiting[name]:
                        del self.waiting[name]

    def stop_pulls(self) -> None:
        """Stop every download under way at once (a shutdown): partial files stay for a resume, and the requests
        waiting for them get ``ShuttingDown``."""
        self._stopping = True
        for task in list(self._pull_tasks.values()):
            task.cancel()
        self.cdn.cancel_downloads()

    def unfollow(self, name: str) -> None:
        """Stop updating ``name`` from the CDN (the operator serves a file of that name from --adapters-dir)."""
        self._followed.discard(name)

    def downloads(self) -> dict[str, TransferProgress | None]:
        """Pulls under way, by adapter name: the last progress report (None before the first byte)."""
        return dict(self._pulling)

    async def _pull(self, name: str) -> None:
        """One pull, visible while it runs (``downloads``), logged at start and end, observed for /metrics.

        A copy already in the cache (a CLI sync put it there) is used at once: the request does not wait for the
        manifest to be fetched again, which on a slow CDN took a minute.
        """
        started, last = time.monotonic(), None
        self._pulling[name] = None
        log.info("pulling adapter %s from %s", name, self.cdn.cdn)

        def track(progress: TransferProgress) -> None:
            nonlocal last
            last = self._pulling[name] = progress

        try:
            cached = await self.cdn.ensure_cached(name, progress=track, current=False)
            await self._register(cached)
        except asyncio.CancelledError:
            received = 0 if last is None else last.done_bytes
            log.warning(
                "pull of adapter %s stopped after %.1f s by the shutdown: %.1f MB on disk, resumed on the next start",
                name,
                time.monotonic() - started,
                received / 1e6,
            )
            self._observe(name, 0 if last is None else last.received_bytes, time.monotonic() - started, False)
            raise
        except BaseException as exc:
            log.warning(
                "pull of adapter %s failed after %.1f s: %s",
                name,
                time.monotonic() - started,
                str(exc) or type(exc).__name__,
            )
            self._observe(name, 0 if last is None else last.received_bytes, time.monotonic() - started, False)
            raise
        finally:
            self._pulling.pop(name, None)
        seconds, received = time.monotonic() - started, 0 if last is None else last.received_bytes
        log.info(
            "pulled adapter %s: %.1f MB %s in %.1f s (%.1f MB/s)",
            name,
            cached.size / 1e6,
            "downloaded" if received else "from the cache",
            seconds,
            received / 1e6 / max(seconds, 1e-9),
        )
        self._observe(name, received, seconds, True)

    def _observe(self, name: str, received_bytes: int, seconds: float, ok: bool) -> None:
        if self.on_pull is not None:
            self.on_pull(name, received_bytes, seconds, ok)

    async def _register(self, cached: CachedAdapter) -> None:
        """Serve ``cached``, leasing its blob first: no other process on this cache evicts or deletes it."""
        store = self.cdn.store
        if not await store.call(store.lease, cached.sha256):
            raise CacheMiss(cached.name, cached=())
        try:
            await asyncio.to_thread(self.manager.add, cached.name, cached.path, sha256=cached.sha256)
        except InvalidTransition:  # another pull registered the version before this one, and it is in memory:
            log.info(
                "adapter %s keeps serving %s; %s follows as an update",
                cached.name,  # the update path
                self.manager.info(cached.name).sha256[:12],
                cached.sha256[:12],
            )  # switches it once loaded
        self._followed.add(cached.name)

    def _gone(self, name: str) -> bool:
        path = self.manager.info(name).path
        return path is not None and not path.exists()

    def _update_tasks(self) -> list[asyncio.Task[None]]:
        return [task for _, task in self._updates.values()]

    async def _update(self, entry: ManifestEntry) -> None:
        started, last = time.monotonic(), None

        def track(progress: TransferProgress) -> None:
            nonlocal last
            last = progress

        log.info(
            "fetching update of %s: %s (%.1f MB) from %s", entry.name, entry.sha256[:12], entry.size / 1e6, self.cdn.cdn
        )
        try:
            staged = await self.cdn.fetch_update(entry, progress=track)
        except EdgeRtError as exc:  # network trouble: the next refresh tries again
            log.warning(
                "update of %s to %s not fetched after %.1f s: %s",
                entry.name,
                entry.sha256[:12],
                time.monotonic() - started,
                exc,
            )
            self._observe(entry.name, 0 if last is None else last.received_bytes, time.monotonic() - started, False)
        except Exception:
            log.exception("update of %s to %s not fetched", entry.name, entry.sha256[:12])
        else:
            seconds, received = time.monotonic() - started, 0 if last is None else last.received_bytes
            log.info(
                "fetched update of %s: %.1f MB %s in %.1f s",
                entry.name,
                entry.size / 1e6,
                "downloaded" if received else "already in the cache",
                seconds,
            )
            self._observe(entry.name, received, seconds, True)
            # Loading and renaming are one step on one thread: a cancelled caller (a client gone from
            # /v1/sync?wait=true, a shutdown) must not leave the memory on the new version and the disk on the old.
            step = asyncio.ensure_future(asyncio.to_thread(self._load_and_switch, entry, staged))
            self._switching.add(step)
            step.add_done_callback(self._switching.discard)
            await asyncio.shield(step)
        finally:
            self._updates.pop(entry.name, None)

    def _load_and_switch(self, entry: ManifestEntry, staged: CachedAdapter) -> None:
        """Load the fetched version, then point its name at it on disk; logs every failure, never raises."""
        name, short = entry.name, entry.sha256[:12]
        old = self.manager.info(name).sha256
        try:
            self.manager.replace(name, staged.path, sha256=entry.sha256)
        except BudgetExceeded as exc:  # the old version is busy and both do not fit: the next refresh tries again
            log.warning("update of %s to %s waits for memory: %s", name, short, exc)
            return
        except (IncompatibleAdapter, InvalidGGUF) as exc:
            if staged.path.exists():  # the file itself is refused: not again until the CDN publishes another
                self._rejected.add(entry.sha256)
                self.cdn.abandon(entry.sha256)
            log.warning("update of %s to %s did not load, the old version keeps serving: %s", name, short, exc)
            return
        except Exception:
            log.exception("update of %s to %s did not load, the old version keeps serving", name, short)
            return
        store = self.cdn.store
        store.lease(entry.sha256)
        store.release_lease(old)  # the old version's file is not needed any more: it may go with its name
        try:
            self.cdn.switch(name, entry.sha256, replaced=old)
        except OSError:
            log.exception("adapter %s serves %s, but the cache could not record it (a restart goes back)", name, short)
            return
        log.info("adapter %s updated: %s -> %s (%.1f MB)", name, (old or "none")[:12], short, entry.size / 1e6)
        self.updated[name] = (time.time(), old or "", entry.sha256)

    async def _refresh_forever(self, first: asyncio.Task[bool]) -> None:
        try:
            failures = 0 if await first else 1
        finally:
            first.cancel()  # a no-op once done; ends it when the follower closes first
        schedule, rng = RefreshSchedule(interval_s=self.cdn.settings.manifest_ttl_s), random.Random()
        while True:
            await asyncio.sleep(schedule.next_delay(rng, failures=failures))
            failures = 0 if await self._refresh_logged() else failures + 1

    async def _refresh_logged(self) -> bool:
        """One refresh, logged; True when it succeeded."""
        try:
            await self.refresh()
            return True
        except EdgeRtError:  # unreachable or untrusted CDN (refresh recorded and logged it): keep serving the cache
            return False
        except Exception as exc:  # never let one unexpected error end the refreshing for the daemon's lifetime
            self.last_error = f"unexpected {type(exc).__name__}: see the daemon's log"
            log.exception("manifest refresh from %s failed", self.cdn.cdn)
            return False
