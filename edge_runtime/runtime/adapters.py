"""The adapter manager: adapters known by name, cached on disk, resident in memory under a byte budget, in use.

Each name maps to its current ``AdapterVersion`` (``versions.py``). ``hold`` makes an adapter resident, evicting
least-recently-used idle unpinned ones (``eviction.py`` chooses), and counts the caller as a user until ``release``.
``replace`` loads a new version beside the one in service and gives it the name once loaded; users of the old one
finish on it. Every version holding memory (loading, retired, being freed) counts against the budget until freed.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, wait
from contextlib import contextmanager
from pathlib import Path

from edge_runtime.errors import (
    AdapterNotFound,
    BudgetExceeded,
    CacheMiss,
    EdgeRtError,
    InvalidGGUF,
    InvalidRequest,
    InvalidTransition,
    RuntimeClosed,
)
from edge_runtime.gguf.header import GGUFHeader, read_header
from edge_runtime.names import validate_name
from edge_runtime.runtime import budget
from edge_runtime.runtime.compatibility import BaseCompatibility, file_id
from edge_runtime.runtime.engine import AdapterHandle, Engine
from edge_runtime.runtime.eviction import EvictionCandidate, EvictionPlan, choose_evictions
from edge_runtime.runtime.requests import MAX_COMPOSED_ADAPTERS, AdapterRequest
from edge_runtime.runtime.versions import (
    AdapterInfo,
    AdapterState,
    AdapterVersion,
    HeldAdapter,
    ManagerStats,
    NamedAdapter,
    RemoteOffer,
    VersionState,
)

__all__ = ["MAX_COMPOSED_ADAPTERS", "AdapterInfo", "AdapterManager", "AdapterState", "HeldAdapter", "ManagerStats"]

log = logging.getLogger(__name__)
_IN_SERVICE = (VersionState.LOADING, VersionState.RESIDENT)  # a current version add() must not re-point


class AdapterManager:
    """Keeps adapters resident under ``budget_bytes``, loading on demand and evicting the least recently used."""

    def __init__(self, engine: Engine, *, budget_bytes: int, base_header: GGUFHeader, base_fingerprint: str) -> None:
        self.engine = engine
        self.budget_bytes = budget_bytes
        self.stats = ManagerStats()
        self._compatibility = BaseCompatibility(base_header, base_fingerprint, n_ctx=engine.n_ctx)
        self._adapters: dict[str, NamedAdapter] = {}
        self._refused: dict[str, str] = {}  # name -> why its file (or CDN entry) is not served, for clear 404s
        self._lock = threading.Lock()
        self._uses = itertools.count(1)
        self._closed = False

    def add(self, name: str, path: Path | str, *, sha256: str | None = None) -> AdapterInfo:
        """Register a cached adapter file under ``name`` (checked against the base now and again at load)."""
        validate_name(name)
        version = self._compatibility.version_for(name, Path(path), sha256)
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                adapter = self._adapters[name] = NamedAdapter(name=name, current=version)
                return adapter.info()
            if adapter.current is not None and adapter.current.sha256 == version.sha256:
                return adapter.info()  # already known: concurrent pulls of one adapter register it once
            current = adapter.current
            if adapter.update is not None or (current is not None and current.state in _IN_SERVICE):
                raise InvalidTransition(name, adapter.state.value, "replaced")
            if current is not None and current.holds_memory:  # still being freed: counted until it is
                adapter.former.append(current)
            adapter.current, adapter.remote = version, None
            return adapter.info()

    def add_remote(self, name: str, *, sha256: str, size_bytes: int) -> bool:
        """Record an adapter a CDN offers but this device has not pulled; True when that offer is new (a name not
        seen before, or new content for a remote-only one), False when it was known or a local copy exists. The
        name was checked when the manifest offering it was parsed."""
        with self._lock:
            known = self._adapters.get(name)
            if known is not None and known.current is not None:
                return False
            offer = RemoteOffer(sha256=sha256, size_bytes=size_bytes)
            if known is None:
                self._adapters[name] = NamedAdapter(name=name, current=None, remote=offer)
                return True
            changed, known.remote = known.remote != offer, offer
            return changed

    def forget(self, name: str, *, only_remote: bool = False) -> bool:
        """Forget an idle ``name`` (with ``only_remote``: one with no local version); True when it was."""
        with self._lock:
            adapter = self._adapters.get(name)
            idle = adapter is not None and not adapter.busy and not (only_remote and adapter.current is not None)
            return idle and self._adapters.pop(name) is not None

    def forget_remote(self, keep: Sequence[str]) -> list[str]:
        """Drop remote-only adapters whose names are not in ``keep`` (withdrawn from the CDN); return them."""
        kept = set(keep)  # a 40,000-adapter catalog: membership in a tuple was quadratic, on the event loop
        with self._lock:
            remote = [n for n, a in self._adapters.items() if a.current is None and n not in kept]
        return [name for name in remote if self.forget(name, only_remote=True)]

    def outdated(self, name: str, sha256: str) -> bool:
        """True when ``name`` has a local version whose content differs from ``sha256`` (an update is due)."""
        with self._lock:
            adapter = self._adapters.get(name)
            return adapter is not None and adapter.current is not None and adapter.current.sha256 != sha256

    def replace(self, name: str, path: Path | str, *, sha256: str | None = None) -> AdapterInfo:
        """Load ``path`` as the new version of ``name`` and switch to it only once llama.cpp has loaded it.

        Until then, and whenever the load fails (the error is raised), ``name`` keeps serving its current version.
        Generations already holding the old version finish on it; its memory is freed after the last of them.
        """
        validate_name(name)
        fresh = self._compatibility.version_for(name, Path(path), sha256)
        with self._lock:
            adapter = self._adapter(name)
            if adapter.current is not None and adapter.current.sha256 == fresh.sha256:
                return adapter.info()
            if adapter.update is not None or self._closed:
                raise InvalidTransition(name, "updating" if adapter.update else "closed", "replaced")
            victims = self._make_room(fresh)  # may evict an idle old version: its file stays until the switch
            pending = self._start_load(fresh)
            adapter.update = fresh
        switched = self._load(adapter, fresh, victims)  # switches the name under the lock once loaded
        pending.result()  # raises what the load raised
        if not switched:  # the manager closed while it loaded
            raise InvalidTransition(name, "closed", "replaced")
        return self.info(name)

    def is_remote(self, name: str) -> bool:
        """True when ``name`` is known only from a CDN manifest (it must be pulled before use)."""
        with self._lock:
            return self._adapter(name).current is None

    def protected_names(self) -> set[str]:
        """Adapters the disk cache must not evict: pinned, resident, loading, in use or being updated."""
        with self._lock:
            return {a.name for a in self._adapters.values() if a.pinned or a.busy}

    def add_directory(self, directory: Path | str) -> tuple[list[AdapterInfo], dict[str, EdgeRtError]]:
        """Register every ``NAME.gguf`` in ``directory``; return those added and, by file name, those refused.

        A file registered before and unchanged since (same inode, size and mtime) is neither read nor hashed again:
        a rescan of 300 MB took 1.1 s on every load of an unknown name."""
        added, refused = [], {}
        for path in sorted(Path(directory).glob("*.gguf")):
            unchanged = self._unchanged(path.stem, path)
            if unchanged is not None:
                added.append(unchanged)
                continue
            try:
                try:
                    added.append(self.add(path.stem, path))
                except InvalidTransition:  # in service: the changed file becomes its next version, loaded first
                    added.append(self.replace(path.stem, path))
            except (EdgeRtError, OSError) as exc:  # one bad or unreadable file must not keep the others from serving
                refused[path.name] = exc if isinstance(exc, EdgeRtError) else InvalidGGUF(str(path), f"{exc}")
                self.refuse(path.stem, str(refused[path.name]))
        return added, refused

    def refuse(self, name: str, reason: str) -> None:
        """Remember why ``name`` is not served (its file was refused, or the CDN offers it for another base): a
        request for it says so instead of "unknown adapter". Registering ``name`` later clears it."""
        with self._lock:
            if name not in self._adapters:
                self._refused[name] = reason

    def refusal(self, name: str) -> str | None:
        """Why ``name`` is not served, when it was refused (None: never seen, or served)."""
        with self._lock:
            return None if name in self._adapters else self._refused.get(name)

    def _unchanged(self, name: str, path: Path) -> AdapterInfo | None:
        """The adapter ``name`` when its current version is ``path`` and the file has not changed since."""
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is None or adapter.current is None or adapter.current.path != path:
                return None
            registered = adapter.current.file_id
        try:
            same = file_id(path) == registered
        except OSError:
            return None
        if not same:
            return None
        with self._lock:
            return adapter.info()

    def names(self) -> list[str]:
        """Names of all known adapters."""
        with self._lock:
            return sorted(self._adapters)

    def is_known(self, name: str) -> bool:
        """True when ``name`` is a known adapter (one dictionary look-up: no copy of the catalog)."""
        return name in self._adapters  # a dict read is atomic under the GIL

    def list_adapters(self) -> list[AdapterInfo]:
        """Snapshots of all known adapters, by name."""
        with self._lock:
            return [a.info() for _, a in sorted(self._adapters.items())]

    def info(self, name: str) -> AdapterInfo:
        """Snapshot of one adapter."""
        with self._lock:
            return self._adapter(name).info()

    @property
    def resident_bytes(self) -> int:
        """Bytes held by adapters in memory, including loads under way and versions being freed."""
        with self._lock:
            return self._held_bytes()

    def pin(self, name: str, pinned: bool = True) -> None:
        """Pin (never evicted) or unpin an adapter."""
        with self._lock:
            self._adapter(name).pinned = pinned

    # -- residency ------------------------------------------------------------------------------------------------

    def ensure_resident(self, name: str) -> AdapterInfo:
        """Make ``name`` resident (loading and evicting as needed) without keeping it in use."""
        self.release([self.hold(name, 1.0)])
        return self.info(name)

    @contextmanager
    def lease(self, requests: Sequence[AdapterRequest]) -> Iterator[list[HeldAdapter]]:
        """Hold every adapter of ``requests`` for the duration of a generation."""
        if len(requests) > MAX_COMPOSED_ADAPTERS:
            raise InvalidRequest(
                f"at most {MAX_COMPOSED_ADAPTERS} adapters can be composed, got {len(requests)}", param="adapters"
            )
        if not all(isinstance(request, AdapterRequest) for request in requests):
            raise InvalidRequest(
                "adapters must be AdapterRequest(name, scale) values (edge_runtime.AdapterRequest), "
                f"got {[type(r).__name__ for r in requests]}",
                param="adapters",
            )
        held: list[HeldAdapter] = []
        try:
            for request in requests:
                held.append(self.hold(request.name, request.scale))
            yield held
        finally:
            self.release(held)

    def hold(self, name: str, scale: float) -> HeldAdapter:
        """Make ``name`` resident and count the caller as a user until ``release``."""
        while True:
            victims: list[AdapterVersion] = []
            with self._lock:
                if self._closed:
                    raise RuntimeClosed()
                adapter = self._adapter(name)
                version = adapter.current
                if version is None:
                    raise CacheMiss(name, cached=tuple(n for n, a in self._adapters.items() if a.current))
                if version.usable:
                    return self._take(adapter, version, scale)
                update = adapter.update
                if update is not None and update.pending is not None:
                    pending, leader, settles = update.pending, False, True  # a new version is loading: wait for it
                elif version.pending is not None:  # loading (its failure raises for every waiter) or being freed
                    pending, leader, settles = version.pending, False, version.state is VersionState.FREEING
                else:
                    try:
                        victims = self._make_room(version)
                    except BudgetExceeded:
                        in_flux = self._settling()  # memory being loaded or freed elsewhere: the numbers will move
                        if in_flux is None:
                            raise
                        pending, leader, settles = in_flux, False, True
                    else:
                        pending, leader, settles = self._start_load(version), True, False
            if leader:
                self._load(adapter, version, victims)
            if settles:
                wait([pending])  # then look again: the name may point elsewhere by now
            else:
                pending.result()

    def release(self, held: Sequence[HeldAdapter]) -> None:
        """End the use counted by ``hold`` for each adapter (freeing a replaced version after its last user)."""
        unused = []
        with self._lock:
            for item in held:
                version = item.version
                version.users -= 1
                adapter = self._adapters.get(item.name)
                if adapter is not None and adapter.current is version:
                    self._touch(adapter)
                if version.users == 0 and version.state is VersionState.RETIRED:
                    unused.append(self._detach(version))
        self._free(unused)

    def evict(self, name: str) -> bool:
        """Free ``name``'s memory now; False when it is in use (it stays resident) or was not resident."""
        with self._lock:
            version = self._adapter(name).current
            if version is None or not version.usable or version.users:
                return False
            self.stats.evictions += 1
            victim = self._detach(version)
        self._free([victim])
        return True

    def evict_least_recent(self) -> str | None:
        """Evict the least recently used idle, unpinned adapter (memory over the budget); its name, or None."""
        with self._lock:
            victims = self._eviction_choice(need_bytes=1, free_bytes=0)[1].victims
        return victims[0] if victims and self.evict(victims[0]) else None

    def close(self) -> None:
        """Free every resident adapter (the engine detaches each before freeing it); loads ending later are freed."""
        with self._lock:
            self._closed = True
            victims = [
                self._detach(v)
                for a in self._adapters.values()
                for v in a.versions()
                if v.state in (VersionState.RESIDENT, VersionState.RETIRED)
            ]
            self.stats.evictions += len(victims)
        self._free(victims)

    # -- internals (the lock is held where noted) -----------------------------------------------------------------

    def _take(self, adapter: NamedAdapter, version: AdapterVersion, scale: float) -> HeldAdapter:  # lock held
        assert version.handle is not None
        version.users += 1
        self._touch(adapter)
        return HeldAdapter(
            name=adapter.name, sha256=version.sha256, scale=float(scale), handle=version.handle, version=version
        )

    def _touch(self, adapter: NamedAdapter) -> None:  # lock held
        adapter.last_used = time.time()
        adapter.use_order = next(self._uses)

    def _held_bytes(self) -> int:  # lock held
        return sum(v.resident_bytes for a in self._adapters.values() for v in a.versions() if v.holds_memory)

    def _eviction_choice(
        self, *, need_bytes: int, free_bytes: int
    ) -> tuple[dict[str, NamedAdapter], EvictionPlan]:  # lock held
        resident = {a.name: a for a in self._adapters.values() if a.current is not None and a.current.usable}
        candidates = [
            EvictionCandidate(
                name=a.name,
                resident_bytes=a.current.resident_bytes,
                last_use=a.use_order,
                pinned=a.pinned,
                in_use=a.current.users > 0,
            )
            for a in resident.values()
            if a.current is not None
        ]
        return resident, choose_evictions(candidates, need_bytes=need_bytes, free_bytes=free_bytes)

    def _make_room(self, version: AdapterVersion) -> list[AdapterVersion]:  # lock held
        """Detach the versions the eviction choice names to fit ``version``; ``BudgetExceeded`` when it cannot."""
        held = self._held_bytes()
        resident, plan = self._eviction_choice(need_bytes=version.resident_bytes, free_bytes=self.budget_bytes - held)
        if not plan.fits:
            raise BudgetExceeded(
                version.name,
                needed_bytes=version.resident_bytes,
                budget_bytes=self.budget_bytes,
                evictable_bytes=plan.evictable_bytes,
                held_bytes=held - plan.evictable_bytes,
            )
        self.stats.evictions += len(plan.victims)
        return [self._detach(v) for v in (resident[n].current for n in plan.victims) if v is not None]

    def _settling(self) -> Future[None] | None:  # lock held
        """A load or free under way (its bytes count, but are about to become usable or free), or None."""
        return next(
            (
                v.pending
                for a in self._adapters.values()
                for v in a.versions()
                if v.pending is not None and v.state in (VersionState.LOADING, VersionState.FREEING)
            ),
            None,
        )

    def _start_load(self, version: AdapterVersion) -> Future[None]:  # lock held
        version.move_to(VersionState.LOADING)
        version.pending = Future()
        return version.pending

    def _detach(self, version: AdapterVersion) -> AdapterVersion:  # lock held
        """Take a resident or retired version out of use; ``_free`` then releases its memory."""
        version.move_to(VersionState.FREEING)
        version.pending = Future()
        return version

    def _load(self, adapter: NamedAdapter, version: AdapterVersion, victims: list[AdapterVersion]) -> bool:
        """Load ``version`` for its waiters; a new version (``adapter.update``) takes the name in the same step.

        A version that stopped being wanted meanwhile (a newer one took the name, or the manager closed) is freed
        at once; its waiters wake and look again. Waiters always wake, whatever loading or freeing raises. Returns
        True when ``version`` was a new version and took the name.
        """
        started = time.perf_counter()
        handle: AdapterHandle | None = None
        error: BaseException | None = None
        unused: list[AdapterVersion] = []
        switched = False
        try:
            self._free(victims)
            self._compatibility.verify_unchanged(version)  # a file replaced in place must not pass as the old one
            self._compatibility.check(version.name, read_header(version.path))
            with self._lock:
                wanted = self._wanted(adapter, version)
            if wanted:
                handle = self.engine.load_adapter(version.path, content_id=version.sha256)
        except BaseException as exc:
            error = exc
        with self._lock:
            loaded, version.pending = version.pending, None
            wanted = self._wanted(adapter, version)
            if adapter.update is version and (handle is None or not wanted):
                adapter.update = None
            if handle is None:
                version.move_to(VersionState.CACHED)
                if version in adapter.former:
                    adapter.former.remove(version)
            else:
                version.handle = handle
                if not wanted:
                    version.move_to(VersionState.FREEING)
                    version.pending = Future()
                    unused = [version]
                else:
                    version.move_to(VersionState.RESIDENT)
                    self.stats.loads += 1
                    self.stats.load_seconds_total += time.perf_counter() - started
                    if adapter.update is version:
                        unused, switched = self._switch(adapter, version), True
            if version is not adapter.current and version.holds_memory and version not in adapter.former:
                adapter.former.append(version)  # counted until freed
        try:
            self._free(unused)
        finally:
            assert loaded is not None
            if error is not None and wanted:
                loaded.set_exception(error)
            else:
                loaded.set_result(None)
        return switched

    def _wanted(self, adapter: NamedAdapter, version: AdapterVersion) -> bool:  # lock held
        current = self._adapters.get(adapter.name) is adapter
        return current and not self._closed and version in (adapter.current, adapter.update)

    def _switch(self, adapter: NamedAdapter, fresh: AdapterVersion) -> list[AdapterVersion]:  # lock held
        """Give ``fresh`` (a loaded new version) its name; the old version retires. Returns versions to free."""
        old, adapter.current, adapter.update, adapter.remote = adapter.current, fresh, None, None
        if old is None or not old.holds_memory:
            return []
        adapter.former.append(old)  # a load or free under way ends on its own and forgets it
        if old.state is not VersionState.RESIDENT:
            return []
        if old.users:
            old.move_to(VersionState.RETIRED)
            return []
        return [self._detach(old)]

    def _free(self, versions: Sequence[AdapterVersion]) -> None:
        """Release each version's memory; every waiter wakes. The first failure is raised after all were tried.

        A version llama.cpp fails to free stays FREEING, counted for good; its name gets a fresh cached copy.
        """
        failure: BaseException | None = None
        for version in versions:
            leaked = False
            try:
                if version.handle is not None:
                    self.engine.free_adapter(version.handle)
            except BaseException as exc:
                failure, leaked = failure or exc, True
                log.error(
                    "adapter %s (%s) could not be freed; its %d bytes stay counted against the budget",
                    version.name,
                    version.sha256[:12],
                    version.resident_bytes,
                )
            with self._lock:
                freed, version.pending = version.pending, None
                adapter = self._adapters.get(version.name)
                if not leaked:
                    version.handle = None
                    version.move_to(VersionState.CACHED)
                    if adapter is not None and version in adapter.former:
                        adapter.former.remove(version)
                elif adapter is not None and adapter.current is version:
                    adapter.current = dataclasses.replace(version, state=VersionState.CACHED, users=0, handle=None)
                    adapter.former.append(version)
            if freed is not None:
                freed.set_result(None)
        if versions:
            budget.release_freed_memory()
        if failure is not None:
            raise failure

    def _adapter(self, name: str) -> NamedAdapter:  # lock held
        adapter = self._adapters.get(name)
        if adapter is None:
            raise AdapterNotFound(name, tuple(sorted(self._adapters)), refused=self._refused.get(name))
        return adapter
