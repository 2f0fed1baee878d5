"""Where a download lands: a claimed partial file filled while it is hashed (``DownloadSink``), on helper threads.

Receiving, sha256 and disk writes overlap on three threads (``HashingWriter``).

On a fast link one core cannot receive, hash (~1.8 GB/s with SHA-NI) and write in turn at line rate: done in
sequence a 100 MB adapter spent more time in sha256, ``write`` and the final ``fsync`` than on the wire. Here the
caller (the event loop) only queues each chunk; one helper thread appends chunks to the file, another feeds the
digest, each in arrival order, and the file is flushed to disk every ``sync_every`` bytes so the ``fsync`` that
makes it durable (``AdapterStore.install``) has little left to do. At most ``max_pending`` chunks wait in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from edge_runtime.distribution.store import AdapterStore, CachedAdapter, release
from edge_runtime.errors import IntegrityError, LengthExceeded
from edge_runtime.files import file_sha256

T = TypeVar("T")
SYNC_EVERY_BYTES = 16 << 20
MAX_PENDING_CHUNKS = 32


@dataclass(frozen=True)
class BlobRequest:
    """What to download: the blob the manifest names and where from."""

    name: str
    url: str
    sha256: str
    size: int  # bytes, from the manifest
    link: bool = True  # point ``name`` at the blob once installed (False: the caller switches the name later)
    publisher: str | None = None  # who verified the manifest that lists it (recorded in the ref, ``store.py``)


class HashingWriter:
    """Appends chunks to ``path`` and feeds them to ``digest`` on helper threads, in order."""

    def __init__(
        self,
        path: Path,
        digest: hashlib._Hash,
        *,
        sync_every: int = SYNC_EVERY_BYTES,
        max_pending: int = MAX_PENDING_CHUNKS,
    ) -> None:
        self.path = path
        self._digest = digest
        self._handle: BinaryIO = path.open("ab")
        self._sync_every = sync_every
        self._max_pending = max_pending
        self._unsynced = 0
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-rt-write")
        self._hash = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-rt-hash")
        self._pending: deque[tuple[Future[None], Future[None]]] = deque()
        self._closed = False
        self._error: OSError | None = None
        self._write_error: OSError | None = None  # set on the writer thread by the first failed write

    def append(self, chunk: bytes) -> None:
        """Queue ``chunk`` for the file and the digest; raises the error of an earlier write (e.g. disk full)."""
        self._collect(keep=len(self._pending))
        self._pending.append((self._disk.submit(self._write, chunk), self._hash.submit(self._digest.update, chunk)))

    async def drain(self) -> None:
        """Wait, without blocking the event loop, until at most ``max_pending`` chunks are queued."""
        while len(self._pending) > self._max_pending:
            written, hashed = self._pending.popleft()
            await asyncio.wrap_future(written)
            await asyncio.wrap_future(hashed)

    def wait(self, *, keep: int = 0) -> None:
        """Block until at most ``keep`` chunks are queued (0: everything is written and hashed)."""
        self._collect(keep=keep, block=True)

    def before_next_write(self, function: Callable[[], T]) -> Future[T]:
        """Run ``function`` on the writer thread, after the writes queued so far and before any queued later."""
        return self._disk.submit(function)

    def reset(self, digest: hashlib._Hash) -> None:
        """Finish queued work, then start hashing anew with ``digest`` (the caller empties the file)."""
        self.wait()
        self._handle.flush()
        self._digest = digest
        self._unsynced = 0

    def finish(self) -> str:
        """Write and hash everything queued, close the file; the sha256 as hex (``AdapterStore.install`` fsyncs).

        Raises the error of any write, including one ``close`` already saw.
        """
        self.close()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def close(self) -> None:
        """Let queued writes land, stop the helper threads and close the file (again: no-op).

        A write error is kept for ``finish``, not raised: a caller closing after a failure has its own error.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
            self._handle.flush()
        except OSError as exc:
            self._error = exc
        finally:
            self._disk.shutdown(wait=True)
            self._hash.shutdown(wait=True)
            try:
                self._handle.close()
            except OSError as exc:  # the buffer's last flush failed too
                self._error = self._error or exc

    def _collect(self, *, keep: int, block: bool = False) -> None:
        while len(self._pending) > keep or (
            self._pending and self._pending[0][0].done() and self._pending[0][1].done()
        ):
            written, hashed = self._pending[0]
            if not block and not (written.done() and hashed.done()):
                return
            self._pending.popleft()
            written.result()
            hashed.result()

    def _write(self, chunk: bytes) -> None:
        if self._write_error is not None:  # after a failed write nothing more lands: the file stays a prefix
            raise self._write_error
        try:
            self._write_unchecked(chunk)
        except OSError as exc:
            self._write_error = exc
            raise

    def _write_unchecked(self, chunk: bytes) -> None:
        self._handle.write(chunk)
        self._unsynced += len(chunk)
        if self._unsynced >= self._sync_every:  # start the disk early: the final fsync then waits for little
            self._handle.flush()
            _fdatasync(self._handle.fileno())
            self._unsynced = 0


_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class DownloadSink:
    """Appends to a partial while hashing it (on helper threads); refuses a byte past the expected size.

    Opening one claims a partial and re-hashes the bytes already in it: file work, done on the store's thread.
    """

    def __init__(self, store: AdapterStore, request: BlobRequest) -> None:
        self.store = store
        self.request = request
        self.partial = store.open_partial(request.sha256)
        if self.partial.size > request.size:
            self.partial = store.restart(self.partial)
        self.written = self.partial.size
        self.writer = HashingWriter(self.partial.path, file_sha256(self.partial.path, limit=self.written))
        self.mixed = self.written > 0  # bytes from an earlier response are in the file

    def restart(self) -> None:
        """Empty the partial and forget its validator."""
        self.writer.reset(hashlib.sha256())
        self.partial = self.store.restart(self.partial)
        self.written, self.mixed = 0, False

    def append(self, chunk: bytes) -> None:
        """Queue ``chunk`` for writing and hashing; ``LengthExceeded`` when it would pass the manifest's size."""
        if self.written + len(chunk) > self.request.size:
            raise LengthExceeded(
                self.request.url, limit_bytes=self.request.size, received_bytes=self.written + len(chunk)
            )
        self.writer.append(chunk)
        self.written += len(chunk)

    def finish(self) -> CachedAdapter:
        """Verify and install the complete partial; ``IntegrityError`` (partial deleted) when it does not match.

        The claim on the partial ends here, whatever happens.
        """
        try:
            actual = self.writer.finish()
            if actual != self.request.sha256:
                self.store.discard(self.partial)
                raise IntegrityError(self.request.url, expected_sha256=self.request.sha256, actual_sha256=actual)
            installed = self.store.install(
                self.partial,
                name=self.request.name if self.request.link else None,
                digest=actual,
                size=self.request.size,
                publisher=self.request.publisher,
            )
        finally:
            release(self.partial)
        return installed or CachedAdapter(
            name=self.request.name,
            path=self.store.blob_path(actual),
            sha256=actual,
            size=self.written,
            last_used=time.time(),
        )

    def close(self, *, release_claim: bool = False) -> None:
        """Close the file once queued writes landed; a non-empty partial stays for a later resume.

        With ``release_claim`` (the download is abandoned) the claim ends after the last write landed, so another
        process may resume the partial.
        """
        self.writer.close()
        if self.partial.size == 0:
            self.store.discard(self.partial)
        if release_claim:
            release(self.partial)
