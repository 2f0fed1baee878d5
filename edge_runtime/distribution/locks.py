"""Cross-process locks on the adapter cache: one cache may serve a CLI ``sync``, daemons and a recovery scan at once.

Three kinds, all ``fcntl.flock`` locks, so the kernel drops them when their process dies (a SIGKILL never leaves a
stale lock behind):

- the **cache lock** (``<cache>/.lock``, exclusive): held while blobs are installed, refs change, or anything is
  deleted, so no two processes decide over the same files at once. Re-entrant within a thread. Its holder writes its
  pid into the file; a waiter gives up after ``EDGE_RT_CACHE_LOCK_TIMEOUT_S`` (a `cache gc` stopped with Ctrl-Z
  must not hang a daemon's start for ever) or when ``interrupt`` is called (a shutdown), naming that pid.
- a **claim** on a partial download (exclusive, non-blocking): held by its one writer from the moment it opens the
  file until the blob is installed or the partial deleted. Another process never appends to a claimed partial: it
  downloads to a partial of its own.
- a **lease** on a blob (shared): held by a daemon for every cached adapter it serves, so no other process evicts
  or deletes a blob a live daemon relies on. Deleting a blob takes it exclusively first, without waiting.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_runtime import settings
from edge_runtime.errors import CacheBusy

log = logging.getLogger(__name__)
POLL_S = 0.05  # between attempts at a lock another process holds

__all__ = ["CacheLock", "Claim", "Leases", "delete_unless_leased", "leased"]


class CacheLock:
    """The cache-wide exclusive lock, re-entrant per thread (flock on separate descriptors would self-deadlock)."""

    def __init__(self, path: Path, *, timeout_s: float | None = None) -> None:
        self.path = path
        self.timeout_s = timeout_s  # None: EDGE_RT_CACHE_LOCK_TIMEOUT_S, read at each wait
        self._local = threading.local()
        self._interrupted = threading.Event()

    def interrupt(self) -> None:
        """Make every wait for this lock, now and later, end with ``CacheBusy`` (the process is shutting down)."""
        self._interrupted.set()

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the block (waits for other processes and threads)."""
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._acquire(descriptor)
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
            self._local.depth = 1
            try:
                yield
            finally:
                self._local.depth = 0
        finally:
            os.close(descriptor)  # releases the lock

    def _acquire(self, descriptor: int) -> None:
        started = time.monotonic()
        timeout = settings.cache_lock_timeout_s() if self.timeout_s is None else self.timeout_s
        logged = False
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            waited = time.monotonic() - started
            if self._interrupted.is_set() or waited >= timeout:
                raise CacheBusy(
                    str(self.path),
                    holder_pid=_holder(descriptor),
                    waited_s=round(waited, 1),
                    interrupted=self._interrupted.is_set(),
                )
            if not logged and waited >= 1.0:
                log.warning("waiting for the cache lock %s, held by process %s", self.path, _holder(descriptor))
                logged = True
            self._interrupted.wait(POLL_S)


def _holder(descriptor: int) -> int | None:
    """The pid the lock's holder wrote into it (None when it wrote none)."""
    try:
        return int(os.pread(descriptor, 32, 0).decode("ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


class Claim:
    """An exclusive claim on one partial download, held through an open descriptor until released."""

    def __init__(self, descriptor: int) -> None:
        self._descriptor: int | None = descriptor

    @classmethod
    def take(cls, path: Path, *, create: bool = False) -> Claim | None:
        """Claim ``path`` unless a live process holds it (None then, or when it no longer exists)."""
        try:
            descriptor = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(descriptor).st_ino != os.stat(path).st_ino:  # renamed by its claimer between open and lock
                raise FileNotFoundError(path)
        except (BlockingIOError, FileNotFoundError):
            os.close(descriptor)
            return None
        return cls(descriptor)

    @staticmethod
    def writing(path: Path) -> bool:
        """True when a live process holds a claim on ``path``; the probe changes nothing."""
        claim = Claim.take(path)
        if claim is None:
            return path.exists()
        claim.release()
        return False

    @property
    def held(self) -> bool:
        """True until ``release``."""
        return self._descriptor is not None

    def release(self) -> None:
        """Give the claim up (idempotent)."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


class Leases:
    """The shared locks this process holds on blobs it relies on, by path."""

    def __init__(self) -> None:
        self._held: dict[Path, int] = {}
        self._lock = threading.Lock()

    def take(self, path: Path) -> bool:
        """Lease ``path`` (waits while a deletion decides over it); False when the file is gone."""
        with self._lock:
            if path in self._held:
                return True
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        fcntl.flock(descriptor, fcntl.LOCK_SH)
        try:
            same = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # deleted (or replaced) while we waited: what we hold is not the cached blob
            os.close(descriptor)
            return False
        with self._lock:
            if path in self._held:
                os.close(descriptor)
            else:
                self._held[path] = descriptor
        return True

    def release(self, path: Path) -> None:
        """End the lease on ``path`` (a no-op when none is held)."""
        with self._lock:
            descriptor = self._held.pop(path, None)
        if descriptor is not None:
            os.close(descriptor)

    def held(self) -> set[Path]:
        """Paths leased by this process."""
        with self._lock:
            return set(self._held)

    def release_all(self) -> None:
        """End every lease."""
        for path in self.held():
            self.release(path)


def delete_unless_leased(path: Path) -> bool:
    """Delete ``path`` unless some process (this one included) leases it; True when it is gone afterwards.

    The exclusive lock is held across the unlink, so a process taking a lease meanwhile waits and then sees the
    file gone.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            if os.fstat(descriptor).st_ino == os.stat(path).st_ino:
                path.unlink()
        except FileNotFoundError:
            pass
        return True
    finally:
        os.close(descriptor)


def leased(path: Path) -> bool:
    """True when a live process (this one included) holds a lease on ``path``; the probe changes nothing."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False
