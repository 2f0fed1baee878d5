"""Files, read and written safely: atomic replacement, bounded reads, sha256 of a file.

A file changes atomically or not at all: a unique temp file beside the target, fsync, rename, fsync the folder.
Every read of a file whose size another party controls is bounded.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_runtime.errors import FileTooLarge

__all__ = ["HASH_CHUNK_BYTES", "atomic_output", "file_sha256", "fsync_directory", "read_bounded"]

HASH_CHUNK_BYTES = 1 << 20


@contextmanager
def atomic_output(target: Path, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a unique temp path beside ``target``; on success it replaces ``target``, on error it is removed.

    The file is private (0600) unless ``mode`` is given: files others serve (a CDN folder) need 0644, and files a
    user asked for (a converted adapter, a merged model) get ``user_file_mode()``, as ``open`` would make them.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        if mode is not None:
            os.chmod(temp, mode)
        with temp.open("rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp, target)
        fsync_directory(target.parent)
    finally:
        temp.unlink(missing_ok=True)


def user_file_mode() -> int:
    """The mode a new file gets from this process's umask (0644 under the usual 022)."""
    try:  # Linux 4.7+: read it without changing it (os.umask sets it, racing other threads)
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Umask:"))
        umask = int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_bounded(path: Path, limit_bytes: int) -> bytes:
    """The whole content of ``path``, or ``FileTooLarge`` when it holds more than ``limit_bytes`` bytes."""
    with path.open("rb") as handle:
        data = handle.read(limit_bytes + 1)
    if len(data) > limit_bytes:
        raise FileTooLarge(str(path), limit_bytes=limit_bytes)
    return data


def file_sha256(path: Path, *, limit: int | None = None) -> hashlib._Hash:
    """A sha256 object fed with the first ``limit`` bytes of ``path`` (all when None)."""
    digest = hashlib.sha256()
    remaining = limit
    with path.open("rb") as handle:
        while remaining is None or remaining > 0:
            chunk = handle.read(HASH_CHUNK_BYTES if remaining is None else min(HASH_CHUNK_BYTES, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest
