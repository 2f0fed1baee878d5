"""The adapter manager: which adapters are known, cached on disk, resident in memory, and active on the context.

Lifecycle (an Enum with guarded transitions)::

    REMOTE → DOWNLOADING → CACHED → RESIDENT → ACTIVE
               ↘ REMOTE     ↖ (evict)    ↖ (last user done)

Resident adapters live under a byte budget. ``hold`` makes an adapter resident — evicting least-recently-used
adapters that are neither pinned nor used by a running generation — and counts the caller as a user until
``release``. Concurrent requests for one adapter share one load. Before llama.cpp sees a file, its edge-rt base
fingerprint is compared with the resident base model's (``IncompatibleAdapter`` on mismatch).

A new version of a known adapter (``replace``) is loaded beside the one in service and takes its name only once
llama.cpp has loaded it; generations already holding the old version finish on it, and it is freed after them.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from edge_runtime import budget
from edge_runtime.engine import AdapterHandle, Engine
from edge_runtime.errors import (
    AdapterNotFound,
    BudgetExceeded,
    CacheMiss,
    EdgeRtError,
    IncompatibleAdapter,
    InvalidTransition,
)
from edge_runtime.gguf_header import GGUFHeader, read_header
from edge_runtime.gguf_info import KEY_BASE_FINGERPRINT
from edge_runtime.names import validate_name

MAX_COMPOSED_ADAPTERS = 4


class AdapterState(Enum):
    """Where an adapter is: only on the CDN, being downloaded, on disk, in memory, or applied to the context."""

    REMOTE = "remote"
    DOWNLOADING = "downloading"
    CACHED = "cached"
    RESIDENT = "resident"
    ACTIVE = "active"


_TRANSITIONS: dict[AdapterState, frozenset[AdapterState]] = {
    AdapterState.REMOTE: frozenset({AdapterState.DOWNLOADING}),
    AdapterState.DOWNLOADING: frozenset({AdapterState.CACHED, AdapterState.REMOTE}),
    AdapterState.CACHED: frozenset({AdapterState.RESIDENT, AdapterState.REMOTE}),
    AdapterState.RESIDENT: frozenset({AdapterState.ACTIVE, AdapterState.CACHED}),
    AdapterState.ACTIVE: frozenset({AdapterState.RESIDENT}),
}


@dataclass
class AdapterEntry:
    """One known adapter and its bookkeeping (mutated only under the manager's lock)."""

    name: str
    path: Path | None  # None while only remote
    sha256: str
    size_bytes: int
    resident_bytes: int
    state: AdapterState = AdapterState.CACHED
    pinned: bool = False
    users: int = 0
    last_used: float = 0.0  # wall-clock seconds, for display
    use_order: int = 0  # a monotonic counter, for LRU: wall clocks jump on devices that sync time late
    handle: AdapterHandle | None = field(default=None, repr=False)
    loading: Future[AdapterHandle | None] | None = field(default=None, repr=False)  # None: orphaned, look again

    def move_to(self, state: AdapterState) -> None:
        """Change state, refusing transitions the lifecycle does not allow."""
        if state not in _TRANSITIONS[self.state]:
            raise InvalidTransition(self.name, self.state.value, state.value)
        self.state = state


@dataclass(frozen=True)
class AdapterInfo:
    """A snapshot of one adapter for listings (``/v1/adapters``, ``edge-rt`` output)."""

    name: str
    sha256: str
    size_bytes: int
    resident_bytes: int
    state: str
    pinned: bool
    users: int
    last_used: float


@dataclass
class ManagerStats:
    """Counters for /metrics: loads, evictions and the time loads took."""

    loads: int = 0
    evictions: int = 0
    load_seconds_total: float = 0.0


@dataclass(frozen=True)
class HeldAdapter:
    """An adapter a generation may use until its lease is released."""

    name: str
    sha256: str
    scale: float
    handle: AdapterHandle


class AdapterManager:
    """Keeps adapters resident under ``budget_bytes``, loading on demand and evicting the least recently used."""

    def __init__(self, engine: Engine, *, budget_bytes: int, base_header: GGUFHeader, base_fingerprint: str) -> None:
        self.engine = engine
        self.budget_bytes = budget_bytes
        self.stats = ManagerStats()
        self._base_header = base_header
        self._base_fingerprint = base_fingerprint
        self._base_shapes = {t.name: t.shape for t in base_header.tensors}
        self._entries: dict[str, AdapterEntry] = {}
        self._lock = threading.Lock()
        self._uses = itertools.count(1)
        self._freeing_bytes = 0  # detached victims not yet freed: still in memory, so still counted
        self._freeing: dict[int, int] = {}  # id(handle) -> its bytes
        self._staging: dict[str, AdapterEntry] = {}  # name -> a new version being loaded by ``replace``
        self._retired: dict[int, AdapterEntry] = {}  # id(handle) -> a replaced version still used by generations
        self._orphan_loads: dict[int, int] = {}  # id(entry) -> bytes of a replaced version whose load is under way
        self._closed = False

    # -- registry -------------------------------------------------------------------------------------------------

    def add(self, name: str, path: Path | str, *, sha256: str | None = None) -> AdapterInfo:
        """Register a cached adapter file under ``name`` (checked against the base now and again at load)."""
        validate_name(name)
        path = Path(path)
        entry = self._entry_for(name, path, sha256 or _file_sha256(path))
        with self._lock:
            previous = self._entries.get(name)
            if previous is not None and previous.state is not AdapterState.REMOTE and previous.sha256 == entry.sha256:
                return self._info(previous)  # already known: concurrent pulls of one adapter register it once
            if previous is not None and (previous.handle is not None or previous.loading is not None):
                raise InvalidTransition(name, previous.state.value, "replaced")
            self._entries[name] = entry
        return self._info(entry)

    def add_remote(self, name: str, *, sha256: str, size_bytes: int) -> bool:
        """Record an adapter a CDN offers but this device has not pulled; False when a local copy is known."""
        validate_name(name)
        with self._lock:
            known = self._entries.get(name)
            if known is not None and known.state is not AdapterState.REMOTE:
                return False
            self._entries[name] = AdapterEntry(name=name, path=None, sha256=sha256, size_bytes=size_bytes,
                                               resident_bytes=size_bytes, state=AdapterState.REMOTE)
            return True

    def forget_remote(self, keep: Sequence[str]) -> list[str]:
        """Drop remote-only adapters whose names are not in ``keep`` (withdrawn from the CDN); return them."""
        with self._lock:
            gone = [n for n, e in self._entries.items() if e.state is AdapterState.REMOTE and n not in keep]
            for name in gone:
                del self._entries[name]
            return gone

    def outdated(self, name: str, sha256: str) -> bool:
        """True when ``name`` has a local version whose content differs from ``sha256`` (an update is due)."""
        with self._lock:
            entry = self._entries.get(name)
            return entry is not None and entry.state is not AdapterState.REMOTE and entry.sha256 != sha256

    def replace(self, name: str, path: Path | str, *, sha256: str) -> AdapterInfo:
        """Load ``path`` as the new version of ``name`` and switch to it only once llama.cpp has loaded it.

        Until then, and whenever the load fails (the error is raised), ``name`` keeps serving its current version.
        Generations already holding the old version finish on it; its memory is freed after the last of them.
        """
        validate_name(name)
        fresh = self._entry_for(name, Path(path), sha256)
        with self._lock:
            current = self._entry(name)
            if current.state is not AdapterState.REMOTE and current.sha256 == sha256:
                return self._info(current)
            if name in self._staging or self._closed:
                raise InvalidTransition(name, "updating" if name in self._staging else "closed", "replaced")
            victims = self._make_room(fresh)  # may evict an idle old version: its file stays until the switch
            pending = fresh.loading = Future()
            self._staging[name] = fresh
        self._load(fresh, victims, pending)  # switches the name under the lock once loaded
        if pending.result() is None:  # the manager closed while it loaded
            raise InvalidTransition(name, "closed", "replaced")
        return self.info(name)

    def is_remote(self, name: str) -> bool:
        """True when ``name`` is known only from a CDN manifest (it must be pulled before use)."""
        with self._lock:
            return self._entry(name).state is AdapterState.REMOTE

    def protected_names(self) -> set[str]:
        """Adapters the disk cache must not evict: pinned, resident, loading, in use or being updated."""
        with self._lock:
            return {e.name for e in self._entries.values()
                    if e.pinned or e.handle is not None or e.loading or e.name in self._staging}

    def add_directory(self, directory: Path | str) -> tuple[list[AdapterInfo], dict[str, EdgeRtError]]:
        """Register every ``NAME.gguf`` in ``directory``; return those added and, by file name, those refused."""
        added, refused = [], {}
        for path in sorted(Path(directory).glob("*.gguf")):
            try:
                added.append(self.add(path.stem, path))
            except EdgeRtError as exc:  # one bad file must not keep the others from being served
                refused[path.name] = exc
        return added, refused

    def names(self) -> list[str]:
        """Names of all known adapters."""
        with self._lock:
            return sorted(self._entries)

    def list_adapters(self) -> list[AdapterInfo]:
        """Snapshots of all known adapters, by name."""
        with self._lock:
            return [self._info(e) for _, e in sorted(self._entries.items())]

    def info(self, name: str) -> AdapterInfo:
        """Snapshot of one adapter."""
        with self._lock:
            return self._info(self._entry(name))

    @property
    def resident_bytes(self) -> int:
        """Bytes held by resident adapters, including loads under way."""
        with self._lock:
            return self._held_bytes()

    def pin(self, name: str, pinned: bool = True) -> None:
        """Pin (never evicted) or unpin an adapter."""
        with self._lock:
            self._entry(name).pinned = pinned

    # -- residency ------------------------------------------------------------------------------------------------

    def ensure_resident(self, name: str) -> AdapterInfo:
        """Make ``name`` resident (loading and evicting as needed) without keeping it in use."""
        held = self.hold(name, 1.0)
        self.release([held])
        return self.info(name)

    @contextmanager
    def lease(self, specs: Sequence[tuple[str, float]]) -> Iterator[list[HeldAdapter]]:
        """Hold every adapter of ``specs`` (name, scale) for the duration of a generation."""
        if len(specs) > MAX_COMPOSED_ADAPTERS:
            raise ValueError(f"at most {MAX_COMPOSED_ADAPTERS} adapters can be composed, got {len(specs)}")
        held: list[HeldAdapter] = []
        try:
            for name, scale in specs:
                held.append(self.hold(name, scale))
            yield held
        finally:
            self.release(held)

    def hold(self, name: str, scale: float) -> HeldAdapter:
        """Make ``name`` resident and count the caller as a user until ``release``."""
        while True:
            with self._lock:
                entry = self._entry(name)
                if entry.state in (AdapterState.RESIDENT, AdapterState.ACTIVE) and entry.handle is not None:
                    return self._take(entry, scale)
                if entry.state is AdapterState.REMOTE:
                    raise CacheMiss(name, cached=tuple(n for n, e in self._entries.items()
                                                       if e.state is not AdapterState.REMOTE))
                update = self._staging.get(name)
                pending, leader, on_update = entry.loading, False, False
                if pending is None and update is not None and update.loading is not None:
                    pending, on_update = update.loading, True  # a new version is loading: wait, do not reload
                elif pending is None:
                    victims = self._make_room(entry)
                    pending = entry.loading = Future()
                    leader = True
            if leader:
                self._load(entry, victims, pending)
            if on_update:
                wait([pending])  # an update that fails leaves the old version in place: look again
            else:
                pending.result()  # followers wait for the leader's load; a failure raises here for everyone

    def release(self, held: Sequence[HeldAdapter]) -> None:
        """End the use counted by ``hold`` for each adapter (freeing a replaced version after its last user)."""
        unused = []
        with self._lock:
            for item in held:
                entry = self._entries.get(item.name)
                if entry is None or entry.handle is not item.handle:
                    retired = self._retired.get(id(item.handle))
                    if retired is not None:
                        retired.users -= 1
                        unused.extend(self._retire(retired))
                    continue
                entry.users -= 1
                self._touch(entry)
                if entry.users == 0 and entry.state is AdapterState.ACTIVE:
                    entry.move_to(AdapterState.RESIDENT)
        self._free(unused)

    def evict(self, name: str) -> bool:
        """Free ``name``'s memory now; False when it is in use (it stays resident) or was not resident."""
        with self._lock:
            entry = self._entry(name)
            if entry.state is not AdapterState.RESIDENT or entry.handle is None:
                return False
            handle = self._detach(entry)
        self._free([handle])
        return True

    def close(self) -> None:
        """Free every resident adapter (the engine detaches each before freeing it); loads ending later are freed."""
        with self._lock:
            self._closed = True
            entries = [*self._entries.values(), *self._retired.values()]
            self._retired.clear()
            handles = [self._detach(e, force=True) for e in entries if e.handle is not None]
        self._free(handles)

    # -- internals (the lock is held where noted) -----------------------------------------------------------------

    def _take(self, entry: AdapterEntry, scale: float) -> HeldAdapter:  # lock held
        assert entry.handle is not None
        entry.users += 1
        self._touch(entry)
        if entry.state is AdapterState.RESIDENT:
            entry.move_to(AdapterState.ACTIVE)
        return HeldAdapter(name=entry.name, sha256=entry.sha256, scale=float(scale), handle=entry.handle)

    def _touch(self, entry: AdapterEntry) -> None:  # lock held
        entry.last_used = time.time()
        entry.use_order = next(self._uses)

    def _make_room(self, entry: AdapterEntry) -> list[AdapterHandle]:  # lock held
        need = entry.resident_bytes
        free = self.budget_bytes - self._held_bytes()
        candidates = sorted((e for e in self._entries.values()
                             if e.state is AdapterState.RESIDENT and not e.pinned and e.users == 0
                             and e.handle is not None), key=lambda e: e.use_order)
        evictable = sum(e.resident_bytes for e in candidates)
        if free + evictable < need:
            raise BudgetExceeded(entry.name, needed_bytes=need, budget_bytes=self.budget_bytes,
                                 evictable_bytes=evictable, held_bytes=self._held_bytes() - evictable)
        victims = []
        for candidate in candidates:
            if free >= need:
                break
            free += candidate.resident_bytes
            victims.append(self._detach(candidate))
        return victims

    def _detach(self, entry: AdapterEntry, *, force: bool = False, evicted: bool = True) -> AdapterHandle:  # lock held
        handle = entry.handle
        assert handle is not None
        entry.handle = None
        self._freeing_bytes += entry.resident_bytes
        self._freeing[id(handle)] = entry.resident_bytes
        if force and entry.state is AdapterState.ACTIVE:
            entry.move_to(AdapterState.RESIDENT)
        entry.move_to(AdapterState.CACHED)
        self.stats.evictions += evicted
        return handle

    def _held_bytes(self) -> int:  # lock held
        entries = itertools.chain(self._entries.values(), self._staging.values(), self._retired.values())
        return (self._freeing_bytes + sum(self._orphan_loads.values())
                + sum(e.resident_bytes for e in entries if e.handle is not None or e.loading))

    def _retire(self, old: AdapterEntry) -> list[AdapterHandle]:  # lock held
        """Take a replaced version out of service: its handle now when unused, else after its last user."""
        handle = old.handle
        if handle is None:
            return []
        if old.users > 0:
            self._retired[id(handle)] = old
            return []
        self._retired.pop(id(handle), None)
        return [self._detach(old, force=True, evicted=False)]

    def _entry_for(self, name: str, path: Path, sha256: str) -> AdapterEntry:
        """A new cached entry for the adapter file ``path``, checked against the base model."""
        header = read_header(path)
        self._check_compatible(name, header)
        return AdapterEntry(name=name, path=path, sha256=sha256, size_bytes=path.stat().st_size,
                            resident_bytes=sum(t.n_bytes for t in header.tensors))

    def _load(self, entry: AdapterEntry, victims: list[AdapterHandle],
              pending: Future[AdapterHandle | None]) -> None:
        """Load ``entry`` for ``pending``'s waiters; a staged new version takes its name in the same critical section.

        An entry that stopped being current (a new version took its name) is an orphan: it is not loaded, or its
        handle is freed, and its waiters get ``None`` and look again. Its bytes count until then.
        """
        started = time.perf_counter()
        outcome: AdapterHandle | BaseException | None = None
        unused: list[AdapterHandle] = []
        try:
            self._free(victims)
            assert entry.path is not None
            self._check_compatible(entry.name, read_header(entry.path))
            with self._lock:
                orphan = self._orphan(entry) or self._closed
            handle = None if orphan else self.engine.load_adapter(entry.path, content_id=entry.sha256)
        except BaseException as exc:
            handle, outcome = None, exc
        with self._lock:
            entry.loading = None
            orphan = self._orphan(entry) or self._closed
            orphan_bytes = self._orphan_loads.pop(id(entry), 0)
            if self._staging.get(entry.name) is entry and (handle is None or self._closed):
                del self._staging[entry.name]
            if handle is not None and orphan:  # still counted, as a handle on its way out
                self._freeing_bytes += orphan_bytes or entry.resident_bytes
                self._freeing[id(handle)] = orphan_bytes or entry.resident_bytes
                unused = [handle]
            elif handle is not None:
                entry.handle = handle
                entry.move_to(AdapterState.RESIDENT)
                self.stats.loads += 1
                self.stats.load_seconds_total += time.perf_counter() - started
                outcome = handle
                if self._staging.get(entry.name) is entry:
                    unused = self._switch(entry)
        try:
            self._free(unused)
        finally:  # waiters always wake, whatever freeing does
            if isinstance(outcome, BaseException) and not orphan:
                pending.set_exception(outcome)
            else:
                pending.set_result(None if orphan or isinstance(outcome, BaseException) else outcome)

    def _orphan(self, entry: AdapterEntry) -> bool:  # lock held
        return self._entries.get(entry.name) is not entry and self._staging.get(entry.name) is not entry

    def _switch(self, fresh: AdapterEntry) -> list[AdapterHandle]:  # lock held
        """Give ``fresh`` (a loaded new version) its name; the old version retires. Returns handles to free."""
        del self._staging[fresh.name]
        old = self._entries[fresh.name]
        if old.loading is not None:  # a load of the old version is under way: its bytes count until it ends
            self._orphan_loads[id(old)] = old.resident_bytes
        fresh.pinned, fresh.use_order, fresh.last_used = old.pinned, old.use_order, old.last_used
        self._entries[fresh.name] = fresh
        return self._retire(old)

    def _free(self, handles: Sequence[AdapterHandle]) -> None:
        for handle in handles:
            self.engine.free_adapter(handle)
            with self._lock:
                self._freeing_bytes -= self._freeing.pop(id(handle), 0)
        if handles:
            budget.release_freed_memory()

    def _entry(self, name: str) -> AdapterEntry:  # lock held
        entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFound(name, tuple(sorted(self._entries)))
        return entry

    def _info(self, entry: AdapterEntry) -> AdapterInfo:  # lock held
        return AdapterInfo(name=entry.name, sha256=entry.sha256, size_bytes=entry.size_bytes,
                           resident_bytes=entry.resident_bytes, state=entry.state.value, pinned=entry.pinned,
                           users=entry.users, last_used=entry.last_used)

    def _check_compatible(self, name: str, header: GGUFHeader) -> None:
        if header.value("general.type") != "adapter" or header.value("adapter.type") != "lora":
            raise IncompatibleAdapter(f"{header.path} is not a LoRA adapter", fix="Pass a file made by edge-rt convert")
        fingerprint = header.value(KEY_BASE_FINGERPRINT)
        if fingerprint is not None:
            if fingerprint != self._base_fingerprint:
                raise IncompatibleAdapter(
                    f"adapter {name!r} was converted for another base model (fingerprint {str(fingerprint)[:12]}, "
                    f"resident base {self._base_fingerprint[:12]})")
            return
        # Adapters made by other converters carry no fingerprint: check every target tensor's shape instead.
        for tensor in header.tensors:
            target = tensor.name.rsplit(".lora_", 1)[0]
            shape = self._base_shapes.get(target)
            width = tensor.shape[0] if tensor.name.endswith(".lora_a") else tensor.shape[1]
            expected = None if shape is None else shape[0] if tensor.name.endswith(".lora_a") else shape[1]
            if expected != width:
                raise IncompatibleAdapter(f"adapter {name!r} tensor {tensor.name} does not match the base model")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
