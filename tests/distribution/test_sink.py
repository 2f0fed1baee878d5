"""The download sink's writer: bytes land in order, the digest matches, errors of the disk reach the caller."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from pathlib import Path

import pytest

from edge_runtime.distribution.sink import HashingWriter


def chunks(count: int, size: int = 64 * 1024) -> list[bytes]:
    return [os.urandom(size) for _ in range(count)]


def test_the_file_and_the_digest_hold_every_chunk_in_order(tmp_path: Path) -> None:
    path = tmp_path / "blob.part"
    path.write_bytes(b"resumed prefix")
    parts = chunks(40)
    writer = HashingWriter(path, hashlib.sha256(b"resumed prefix"), sync_every=256 * 1024, max_pending=4)
    for part in parts:
        writer.append(part)
        writer.wait(keep=4)
    expected = b"resumed prefix" + b"".join(parts)
    assert writer.finish() == hashlib.sha256(expected).hexdigest()
    assert path.read_bytes() == expected


def test_drain_bounds_the_chunks_held_in_memory(tmp_path: Path) -> None:
    writer = HashingWriter(tmp_path / "blob.part", hashlib.sha256(), max_pending=3)

    async def feed() -> list[int]:
        depths = []
        for part in chunks(30, 256 * 1024):
            writer.append(part)
            await writer.drain()
            depths.append(len(writer._pending))
        return depths

    assert max(asyncio.run(feed())) <= 3
    writer.finish()
    assert (tmp_path / "blob.part").stat().st_size == 30 * 256 * 1024


def test_reset_starts_a_new_digest_after_queued_work_landed(tmp_path: Path) -> None:
    path = tmp_path / "blob.part"
    writer = HashingWriter(path, hashlib.sha256())
    writer.append(b"a" * 5000)
    writer.reset(hashlib.sha256())
    assert path.read_bytes() == b"a" * 5000  # the queued chunk landed before the caller empties the file
    path.write_bytes(b"")
    writer.append(b"b" * 5000)
    assert writer.finish() == hashlib.sha256(b"b" * 5000).hexdigest()
    assert path.read_bytes() == b"b" * 5000


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full (every write: ENOSPC)")
def test_a_full_disk_is_raised_by_finish_even_after_close() -> None:
    writer = HashingWriter(Path("/dev/full"), hashlib.sha256(), sync_every=1 << 40)
    writer.append(b"x" * (1 << 20))  # larger than the file buffer: written through at once
    writer.close()
    with pytest.raises(OSError) as raised:
        writer.finish()
    assert raised.value.errno == errno.ENOSPC
