"""An adapter's versions. One version (one file content) has a memory lifecycle, an Enum with guarded transitions::

    CACHED ──▶ LOADING ──▶ RESIDENT ──▶ FREEING ──▶ CACHED
                 │  │           │           ▲
                 │  │           ▼           │
                 │  │        RETIRED ───────┤   (a newer version took the name; its last user frees it)
                 │  └───────────────────────┘   (loaded, but no longer wanted: a newer version, or closing)
                 └──▶ CACHED                    (the load failed, or was skipped as no longer wanted)

A version's bytes count against the adapter budget in every state but CACHED, so what is being loaded, retired or
freed is accounted from the versions themselves. ``pending`` is set while a version is LOADING or FREEING. Waiters
on a FREEING version, or on a load that ends unwanted, wake and look again; waiters on the current version's load
get its error when it fails. A version llama.cpp fails to free stays FREEING (and counted) for good.

A ``NamedAdapter`` is what a name points at: its current version (none while only a CDN offers it), a new version
being loaded to replace it, and the versions it left behind that still hold memory. Its ``AdapterState`` is derived
from the current version, never stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from edge_runtime.errors import InvalidTransition
from edge_runtime.runtime.handles import AdapterHandle

__all__ = [
    "AdapterInfo",
    "AdapterState",
    "AdapterVersion",
    "HeldAdapter",
    "ManagerStats",
    "NamedAdapter",
    "RemoteOffer",
    "VersionState",
]


class VersionState(Enum):
    """Where one version of an adapter is in memory."""

    CACHED = "cached"  # on disk only
    LOADING = "loading"  # llama.cpp is reading it
    RESIDENT = "resident"  # in memory and usable
    RETIRED = "retired"  # replaced by a newer version, in memory until its last user is done
    FREEING = "freeing"  # detached from use, its memory being released


_TRANSITIONS: dict[VersionState, frozenset[VersionState]] = {
    VersionState.CACHED: frozenset({VersionState.LOADING}),
    VersionState.LOADING: frozenset({VersionState.RESIDENT, VersionState.CACHED, VersionState.FREEING}),
    VersionState.RESIDENT: frozenset({VersionState.FREEING, VersionState.RETIRED}),
    VersionState.RETIRED: frozenset({VersionState.FREEING}),
    VersionState.FREEING: frozenset({VersionState.CACHED}),
}


@dataclass(eq=False)
class AdapterVersion:
    """One adapter file's content under a name: its bytes, its state, its llama.cpp handle and its users."""

    name: str
    path: Path
    sha256: str
    size_bytes: int  # on disk
    resident_bytes: int  # in memory once loaded (its tensor bytes)
    file_id: tuple[int, int, int] = (0, 0, 0)  # (inode, size, mtime ns) when registered: a changed file is caught
    state: VersionState = VersionState.CACHED
    users: int = 0  # generations holding it
    handle: AdapterHandle | None = field(default=None, repr=False)  # set from RESIDENT until freed
    pending: Future[None] | None = field(default=None, repr=False)  # set while LOADING or FREEING

    def move_to(self, state: VersionState) -> None:
        """Change state, refusing transitions the lifecycle does not allow (``InvalidTransition``)."""
        if state not in _TRANSITIONS[self.state]:
            raise InvalidTransition(self.name, self.state.value, state.value)
        self.state = state

    @property
    def holds_memory(self) -> bool:
        """True in every state whose bytes count against the budget (all but CACHED)."""
        return self.state is not VersionState.CACHED

    @property
    def usable(self) -> bool:
        """True when generations may start on it."""
        return self.state is VersionState.RESIDENT and self.handle is not None


class AdapterState(Enum):
    """Where a named adapter is: only on the CDN, on disk, in memory, or used by a running generation."""

    REMOTE = "remote"
    CACHED = "cached"
    RESIDENT = "resident"
    ACTIVE = "active"


@dataclass(frozen=True)
class RemoteOffer:
    """What a CDN manifest says of an adapter this device has not pulled."""

    sha256: str
    size_bytes: int


@dataclass(eq=False)
class NamedAdapter:
    """One name: its current version, a new version being loaded to replace it, and versions it left behind."""

    name: str
    current: AdapterVersion | None  # None: known only from a CDN manifest
    remote: RemoteOffer | None = None
    update: AdapterVersion | None = None  # loading; takes the name once loaded
    former: list[AdapterVersion] = field(default_factory=list)  # lost the name, still holding memory
    pinned: bool = False
    last_used: float = 0.0  # wall-clock seconds, for display
    use_order: int = 0  # a monotonic counter, for LRU

    def versions(self) -> Iterator[AdapterVersion]:
        """Every version of this name that may hold memory."""
        yield from (v for v in (self.current, self.update) if v is not None)
        yield from self.former

    @property
    def state(self) -> AdapterState:
        version = self.current
        if version is None:
            return AdapterState.REMOTE
        if version.usable:
            return AdapterState.ACTIVE if version.users else AdapterState.RESIDENT
        return AdapterState.CACHED

    def info(self) -> AdapterInfo:
        """A snapshot of this name for listings."""
        version, remote = self.current, self.remote
        if version is not None:
            sha256, size, resident, users = version.sha256, version.size_bytes, version.resident_bytes, version.users
        else:
            assert remote is not None
            sha256, size, resident, users = remote.sha256, remote.size_bytes, remote.size_bytes, 0
        return AdapterInfo(
            name=self.name,
            sha256=sha256,
            size_bytes=size,
            resident_bytes=resident,
            state=self.state.value,
            pinned=self.pinned,
            users=users,
            last_used=self.last_used,
            path=None if version is None else version.path,
        )

    @property
    def busy(self) -> bool:
        """True when a version is in memory or an update is under way (the name cannot be re-pointed)."""
        return self.update is not None or any(v.holds_memory for v in self.versions())


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
    path: Path | None = None  # the file of the current version (None: only remote)


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
    version: AdapterVersion = field(repr=False, compare=False)
