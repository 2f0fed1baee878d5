"""The on-device adapter cache: content-addressed verified blobs, name refs, partial downloads, a disk budget.

Layout of the cache folder (after huggingface_hub's blobs/refs split, but every blob is sha256-verified, never
just size-checked)::

    blobs/<sha256>.gguf               immutable, verified before it got this name
    refs/<name>                       the sha256 the name points to, then on a second line who verified the
                                      manifest that listed it (``key:<keyid>``, or ``url:<cdn>`` when unsigned;
                                      none for a ref written before this was recorded); its mtime is the last use
    partial/<sha256>.<token>.part     a download in progress or interrupted (resumable)
    partial/<sha256>.<token>.json     the server's validator (ETag or Last-Modified) for If-Range
    staged/<sha256>                   a fetched update no name points at yet: kept from eviction, never auto-named

The refs folder *is* the index. When it is lost, refs are rebuilt only from the (name, sha256) pairs of the
manifests this cache verified (``manifests/``), never from the name a GGUF carries inside: a file's inner name is
whatever its converter wrote, and naming blobs by it served one adapter under another's name.

Several processes may share one cache (``locks.py``): every change to blobs, refs and markers happens under the
cache lock; a partial belongs to the one process that claimed it (an exclusive lock held while it writes: a second
process downloads to a partial of its own, never appends to another's); a blob is installed only when its size on
disk matches and its sha256 is its name, and never replaced once there; blobs a live daemon leases are neither
evicted nor deleted.

The store's methods are synchronous file operations and never run on the event loop: async callers hand them to the
store's one worker thread (``await store.call(method, ...)``), or run them on a thread of their own where a step
must stay together with other blocking work (the follower's load-and-switch); the cache lock (a thread lock and
``flock``) and the leases' own lock make either safe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edge_runtime.distribution.locks import CacheLock, Claim, Leases, delete_unless_leased, leased
from edge_runtime.errors import DiskFull, FileTooLarge, IntegrityError, InvalidName
from edge_runtime.files import atomic_output, fsync_directory, read_bounded
from edge_runtime.names import NAME_PATTERN, SHA256_HEX, SHA256_NAME, validate_name

log = logging.getLogger(__name__)
T = TypeVar("T")

PARTIAL_MAX_AGE_S = 7 * 24 * 3600
MAX_REF_BYTES = 1024
MAX_VALIDATOR_BYTES = 16 * 1024
_NAME = re.compile(NAME_PATTERN)
BLOB_NAME = re.compile(rf"^(?P<sha>{SHA256_HEX})\.gguf$")
PARTIAL_NAME = re.compile(rf"^(?P<sha>{SHA256_HEX})\.(?P<token>[0-9a-f]{{16}})\.(?P<kind>part|json)$")


@dataclass(frozen=True)
class CachedAdapter:
    """A verified adapter on disk."""

    name: str
    path: Path
    sha256: str
    size: int  # bytes
    last_used: float  # seconds since the epoch
    publisher: str | None = None  # who verified the ref (``key:<keyid>`` or ``url:<cdn>``); None: not recorded


@dataclass(frozen=True)
class Partial:
    """A claimed partial download: the file, its blob's sha256, and the server validator saved with it."""

    path: Path
    sha256: str
    validator: str | None
    claim: Claim | None = field(default=None, compare=False, repr=False)  # held while this process writes it

    @property
    def size(self) -> int:
        """Bytes already on disk."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    @property
    def validator_path(self) -> Path:
        """The sidecar holding ``validator``."""
        return self.path.with_suffix(".json")


@dataclass
class _PartialFile:
    path: Path
    sha256: str
    size: int
    last_used: float  # its mtime: the last byte written
    kept: bool  # a live process writes it, or the download making room resumes it

    def remove(self) -> None:
        claim = Claim.take(self.path)
        if claim is None:  # a writer claimed it since: it stays
            return
        try:
            self.path.unlink(missing_ok=True)
            self.path.with_suffix(".json").unlink(missing_ok=True)
        finally:
            claim.release()


@dataclass
class _Blob:
    sha256: str
    size: int
    names: list[str] = field(default_factory=list)
    last_used: float = 0.0


class AdapterStore:
    """The adapter cache in ``root`` with an optional disk budget in bytes (blobs only)."""

    def __init__(self, root: Path, *, budget_bytes: int | None = None) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.blobs_dir = root / "blobs"
        self.refs_dir = root / "refs"
        self.partial_dir = root / "partial"
        self.staged_dir = root / "staged"
        for folder in (self.blobs_dir, self.refs_dir, self.partial_dir, self.staged_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-rt-store")  # started on first call
        self._lock = CacheLock(root / ".lock")
        self.leases = Leases()

    async def call(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``function`` (a store operation, or any file work) on the store's worker thread and await it."""
        return await asyncio.get_running_loop().run_in_executor(
            self._worker, functools.partial(function, *args, **kwargs)
        )

    def close(self) -> None:
        """Stop the worker thread once queued operations are done and give up this process's leases; an operation
        still waiting for another process's cache lock gives up at once (``CacheBusy``)."""
        self._lock.interrupt()
        self._worker.shutdown(wait=True)
        self.leases.release_all()

    def lease(self, sha256: str) -> bool:
        """Keep blob ``sha256`` from eviction and deletion by any process while this one lives (or until released);
        False when the blob is not (or no longer) in the cache."""
        return self.leases.take(self.blob_path(_checked_sha(sha256)))

    def release_lease(self, sha256: str) -> None:
        """End the lease ``lease`` took."""
        self.leases.release(self.blob_path(_checked_sha(sha256)))

    def blob_path(self, sha256: str) -> Path:
        """Where the verified blob ``sha256`` lives (it may not exist)."""
        return self.blobs_dir / f"{sha256}.gguf"

    def lookup(self, name: str) -> CachedAdapter | None:
        """The cached adapter called ``name``, or None."""
        ref = self.refs_dir / validate_name(name)
        try:
            sha256, _, publisher = read_bounded(ref, MAX_REF_BYTES).decode("utf-8").strip().partition("\n")
            if SHA256_NAME.fullmatch(sha256) is None:  # a damaged ref never names a path outside blobs/
                return None
            last_used = ref.stat().st_mtime
            size = self.blob_path(sha256).stat().st_size
        except (FileNotFoundError, UnicodeDecodeError, FileTooLarge):
            return None
        return CachedAdapter(
            name=name,
            path=self.blob_path(sha256),
            sha256=sha256,
            size=size,
            last_used=last_used,
            publisher=publisher.strip() or None,
        )

    def adapters(self) -> list[CachedAdapter]:
        """Every cached adapter, least recently used first."""
        found = [self.lookup(ref.name) for ref in self.refs_dir.iterdir() if is_ref(ref)]
        return sorted((a for a in found if a is not None), key=lambda a: a.last_used)

    def names(self) -> tuple[str, ...]:
        """Names of the cached adapters, sorted."""
        return tuple(sorted(a.name for a in self.adapters()))

    def in_use(self, sha256: str) -> bool:
        """True when a live process (this one included) leases blob ``sha256``: it must not be removed."""
        return leased(self.blob_path(_checked_sha(sha256)))

    def collect_garbage(self) -> list[str]:
        """Delete blobs no name points at that are neither staged nor leased; return their sha256."""
        with self._lock.held():
            kept = {a.sha256 for a in self.adapters()} | self.staged()
            return [
                sha for sha in sorted(self._blobs()) if sha not in kept and delete_unless_leased(self.blob_path(sha))
            ]

    def usage_bytes(self) -> int:
        """Bytes of verified blobs on disk."""
        return sum(b.size for b in self._blobs().values())

    def touch(self, name: str) -> None:
        """Record a use of ``name`` (the LRU clock)."""
        os.utime(self.refs_dir / validate_name(name))

    def link(self, name: str, sha256: str, *, publisher: str | None = None) -> CachedAdapter:
        """Point ``name`` at the verified blob ``sha256``, recording ``publisher`` (who verified the manifest that
        lists the pair); a blob it replaces goes when no other name uses it."""
        with self._lock.held():
            if not self.blob_path(sha256).is_file():
                raise FileNotFoundError(self.blob_path(sha256))
            previous = self.lookup(name)
            with atomic_output(self.refs_dir / validate_name(name)) as temp:
                temp.write_text(sha256 if publisher is None else f"{sha256}\n{publisher.splitlines()[0]}\n", "utf-8")
            if previous is not None and previous.sha256 != sha256:
                self.drop_if_unnamed(previous.sha256)  # an open file (a loaded adapter) stays readable until closed
            cached = self.lookup(name)
        assert cached is not None
        return cached

    def stage(self, sha256: str) -> None:
        """Mark blob ``sha256`` as an update waiting for its switch (it need not exist yet)."""
        (self.staged_dir / _checked_sha(sha256)).touch()

    def unstage(self, sha256: str) -> None:
        """Drop the mark ``stage`` set."""
        (self.staged_dir / _checked_sha(sha256)).unlink(missing_ok=True)

    def staged(self) -> set[str]:
        """sha256 of the blobs marked by ``stage``."""
        return {p.name for p in self.staged_dir.iterdir() if SHA256_NAME.fullmatch(p.name)}

    def evict(self, name: str) -> bool:
        """Forget ``name``; its blob goes too when no other name points at it. True when something was removed."""
        with self._lock.held():
            cached = self.lookup(name)
            if cached is None:
                return False
            (self.refs_dir / name).unlink(missing_ok=True)
            self.drop_if_unnamed(cached.sha256)
            fsync_directory(self.refs_dir)
            return True

    def drop_if_unnamed(self, sha256: str) -> None:
        """Delete blob ``sha256`` unless some name still points at it or a live process leases it."""
        with self._lock.held():
            if all(a.sha256 != sha256 for a in self.adapters()):
                delete_unless_leased(self.blob_path(sha256))

    def make_room(
        self, name: str, size: int, *, protected: Iterable[str] = (), have_bytes: int = 0, sha256: str | None = None
    ) -> list[str]:
        """Evict least recently used unprotected adapters and partial downloads until ``size`` bytes fit the budget
        and the disk.

        Partial downloads count against the budget like blobs (``partial/`` once held 6.8 MB under a 2 MB budget);
        the oldest that no live process writes go first, in one LRU order with the blobs, except those of
        ``sha256`` (the blob being made room for: the download resumes from them). Staged blobs (updates waiting for
        their switch) are kept even though no name points at them. ``have_bytes`` of the download already sit in a
        partial. Nothing is evicted when room cannot be made: ``DiskFull`` names the limit. Returns the evicted
        names (a partial's is its file name).
        """
        with self._lock.held():
            return self._make_room(name, size, protected=protected, have_bytes=have_bytes, sha256=sha256)

    def _make_room(
        self, name: str, size: int, *, protected: Iterable[str], have_bytes: int, sha256: str | None
    ) -> list[str]:
        keep = set(protected) | {name}
        keep_blobs = self.staged()
        blobs = self._blobs()
        partials = self._partials()
        for partial in partials:
            if partial.sha256 == sha256:  # resumed by this download: its bytes are part of ``size`` already
                partial.kept = True
                have_bytes = max(have_bytes, partial.size)

        own = self.leases.held()  # this process's own leases do not stop it: ``protected`` says what it needs

        def kept(blob: _Blob) -> bool:  # protected here, staged, or leased by another live process
            path = self.blob_path(blob.sha256)
            return bool(keep & set(blob.names)) or blob.sha256 in keep_blobs or (path not in own and leased(path))

        held = sum(b.size for b in blobs.values() if kept(b)) + sum(p.size for p in partials if p.kept)
        candidates: list[_Blob | _PartialFile] = sorted(
            [*(b for b in blobs.values() if not kept(b)), *(p for p in partials if not p.kept)],
            key=lambda b: b.last_used,
        )
        plan: list[_Blob | _PartialFile] = []
        if self.budget_bytes is not None:
            used = sum(b.size for b in blobs.values()) + sum(p.size for p in partials) - have_bytes
            if size > self.budget_bytes:
                raise DiskFull(name, needed_bytes=size, available_bytes=self.budget_bytes, limit="adapter_cache_mb")
            while used + size > self.budget_bytes:
                if not candidates:
                    raise DiskFull(
                        name,
                        needed_bytes=size,
                        available_bytes=self.budget_bytes - used,
                        limit="adapter_cache_mb",
                        held_bytes=held,
                    )
                plan.append(candidates.pop(0))
                used -= plan[-1].size
        free = shutil.disk_usage(self.root).free + sum(b.size for b in plan)
        while free < size - have_bytes:
            if not candidates:
                raise DiskFull(
                    name, needed_bytes=size - have_bytes, available_bytes=free, limit="free disk space", held_bytes=held
                )
            plan.append(candidates.pop(0))
            free += plan[-1].size
        evicted = []
        for victim in plan:
            if isinstance(victim, _PartialFile):
                victim.remove()
                evicted.append(victim.path.name)
                log.info(
                    "removed partial download %s (%d bytes) to make room for %s", victim.path.name, victim.size, name
                )
                continue
            blob = victim
            self.leases.release(self.blob_path(blob.sha256))  # ours, if any: an idle cached adapter of this daemon
            for victim_name in blob.names:
                self.evict(victim_name)
                evicted.append(victim_name)
            delete_unless_leased(self.blob_path(blob.sha256))
            log.info("evicted %s (%d bytes) to make room for %s", ",".join(blob.names) or blob.sha256, blob.size, name)
        return evicted

    def open_partial(self, sha256: str) -> Partial:
        """Claim the largest partial download of ``sha256`` no live process writes, or start an empty one.

        The claim (an exclusive lock) is held until ``install`` or ``discard``, or ``release``: a second process
        skips a claimed partial and downloads to its own.
        """
        token = secrets.token_hex(8)
        target = self.partial_dir / f"{_checked_sha(sha256)}.{token}.part"
        with self._lock.held():
            for candidate in sorted(self.partial_dir.glob(f"{sha256}.*.part"), key=_size, reverse=True):
                claim = Claim.take(candidate)
                if claim is None:  # a live writer holds it, or it is gone
                    continue
                os.rename(candidate, target)
                validator = read_validator(candidate.with_suffix(".json"))
                candidate.with_suffix(".json").unlink(missing_ok=True)
                return self.save_validator(Partial(path=target, sha256=sha256, validator=None, claim=claim), validator)
            claim = Claim.take(target, create=True)
        assert claim is not None  # a fresh random name: nobody else can hold it
        return Partial(path=target, sha256=sha256, validator=None, claim=claim)

    def save_validator(self, partial: Partial, validator: str | None) -> Partial:
        """Persist the server's validator for ``partial`` (None removes it) and return the updated partial."""
        with self._lock.held():
            if validator is None:
                partial.validator_path.unlink(missing_ok=True)
            else:
                with atomic_output(partial.validator_path) as temp:
                    temp.write_text(json.dumps({"validator": validator}), "utf-8")
        return dataclasses.replace(partial, validator=validator)

    def restart(self, partial: Partial) -> Partial:
        """Empty ``partial`` and forget its validator (the next request starts at byte 0)."""
        with partial.path.open("wb"):
            pass
        return self.save_validator(partial, None)

    def discard(self, partial: Partial) -> None:
        """Delete ``partial`` and its validator, and give up its claim."""
        with self._lock.held():
            partial.path.unlink(missing_ok=True)
            partial.validator_path.unlink(missing_ok=True)
        release(partial)

    def install(
        self, partial: Partial, *, name: str | None, digest: str, size: int, publisher: str | None = None
    ) -> CachedAdapter | None:
        """Make a complete, claimed partial visible as ``blobs/<sha256>.gguf``: fsync, rename, fsync the folder.

        ``digest`` (the sha256 of the bytes written) must be the partial's name and ``size`` (the manifest's) its
        size on disk, else ``IntegrityError`` after deleting it. A blob already installed (by another process) is
        kept and the partial dropped: blobs never change once named. Returns the cached adapter when ``name`` is
        given.
        """
        on_disk = _size(partial.path)
        if digest != partial.sha256 or on_disk != size:
            self.discard(partial)
            raise IntegrityError(
                str(partial.path),
                expected_sha256=partial.sha256,
                actual_sha256=digest,
                problem=None if on_disk == size else f"{on_disk} bytes on disk where the manifest lists {size}",
            )
        with partial.path.open("rb+") as handle:
            os.fsync(handle.fileno())
        with self._lock.held():
            if self.blob_path(partial.sha256).is_file():
                self.discard(partial)
            else:
                os.replace(partial.path, self.blob_path(partial.sha256))
                fsync_directory(self.blobs_dir)
                partial.validator_path.unlink(missing_ok=True)
                release(partial)
            return None if name is None else self.link(name, partial.sha256, publisher=publisher)

    def locked(self) -> AbstractContextManager[None]:
        """The cache lock, for changes that span several store operations (re-entrant within a thread)."""
        return self._lock.held()

    def partial_bytes(self) -> int:
        """Bytes of partial downloads on disk (they count against the budget too)."""
        return sum(p.size for p in self._partials())

    def _partials(self) -> list[_PartialFile]:
        """Partial downloads on disk; one a live process writes is kept (``kept``)."""
        found = []
        for path in self.partial_dir.glob("*.part"):
            match = PARTIAL_NAME.fullmatch(path.name)
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if match is not None:
                found.append(
                    _PartialFile(
                        path=path,
                        sha256=match["sha"],
                        size=stat.st_size,
                        last_used=stat.st_mtime,
                        kept=Claim.writing(path),
                    )
                )
        return found

    def _blobs(self) -> dict[str, _Blob]:
        blobs: dict[str, _Blob] = {}
        for path in self.blobs_dir.iterdir():
            match = BLOB_NAME.fullmatch(path.name)
            if match is not None:
                stat = path.stat()
                blobs[match["sha"]] = _Blob(sha256=match["sha"], size=stat.st_size, last_used=stat.st_mtime)
        for cached in self.adapters():
            blob = blobs.get(cached.sha256)
            if blob is not None:  # a named blob's last use is its refs' (an unnamed one's is its mtime)
                blob.last_used = cached.last_used if not blob.names else max(blob.last_used, cached.last_used)
                blob.names.append(cached.name)
        return blobs


def read_validator(path: Path) -> str | None:
    """The server validator saved beside a partial, or None (missing or unreadable: the resume starts over)."""
    try:
        value = json.loads(read_bounded(path, MAX_VALIDATOR_BYTES)).get("validator")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def release(partial: Partial) -> None:
    """Give up this process's claim on ``partial`` (idempotent): another process may resume it."""
    if partial.claim is not None:
        partial.claim.release()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def is_ref(path: Path) -> bool:
    """True when ``path`` in ``refs/`` is a ref this store wrote: a regular file with a valid adapter name (strays
    such as ``alpha~`` or folders are not)."""
    return _NAME.fullmatch(path.name) is not None and ".." not in path.name and path.is_file()


def _checked_sha(sha256: str) -> str:
    if not SHA256_NAME.fullmatch(sha256):
        raise InvalidName(sha256, SHA256_NAME.pattern)
    return sha256


def remove_file(path: Path) -> str:
    """Delete ``path`` (gone already is fine; a stray folder too) and return its name, for reports."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return path.name
