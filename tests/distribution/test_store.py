"""The adapter cache: verified installs, the rebuildable index, the start-up recovery scan, disk budget and LRU."""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple

import pytest

from edge_runtime.distribution.manifest import Manifest, ManifestEntry, sign_manifest
from edge_runtime.distribution.recovery import recover
from edge_runtime.distribution.store import AdapterStore, release
from edge_runtime.errors import DiskFull, IntegrityError
from edge_runtime.files import file_sha256


class Blob(NamedTuple):
    name: str
    data: bytes
    sha256: str


@pytest.fixture
def blobs(adapter_sources: Path) -> list[Blob]:
    """The two real adapters as (name, bytes, sha256)."""
    found = []
    for path in sorted(adapter_sources.glob("*.gguf")):
        found.append(Blob(path.stem, path.read_bytes(), file_sha256(path).hexdigest()))
    return found


def _put(store: AdapterStore, blob: Blob, *, name: str | None = None) -> None:
    partial = store.open_partial(blob.sha256)
    partial.path.write_bytes(blob.data)
    store.install(partial, name=name or blob.name, digest=blob.sha256, size=len(blob.data))


def _remember_manifest(store: AdapterStore, listed: dict[str, Blob]) -> None:
    """What a client leaves in ``manifests/`` after verifying a manifest that lists ``listed`` (name -> blob)."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    entries = tuple(ManifestEntry(name=name, sha256=blob.sha256, size=len(blob.data), rank=2, base_fingerprint="f" * 64,
                                  created=now) for name, blob in listed.items())
    folder = store.root / "manifests"
    folder.mkdir(exist_ok=True)
    (folder / "0123456789abcdef.json").write_bytes(sign_manifest(
        Manifest(version=1, created=now, expires=now + timedelta(days=1), adapters=entries), None))


def _age(store: AdapterStore, name: str, seconds_ago: float) -> None:
    moment = time.time() - seconds_ago
    os.utime(store.refs_dir / name, (moment, moment))


def test_install_makes_a_verified_blob_visible_under_its_name(tmp_path: Path, blobs: list[Blob]) -> None:
    store = AdapterStore(tmp_path / "cache")
    _put(store, blobs[0])
    cached = store.lookup(blobs[0].name)
    assert cached is not None and cached.path == store.blobs_dir / f"{blobs[0].sha256}.gguf"
    assert cached.path.read_bytes() == blobs[0].data and cached.size == len(blobs[0].data)
    assert list(store.partial_dir.iterdir()) == [] and store.names() == (blobs[0].name,)
    assert store.lookup("unknown") is None


def test_a_partial_whose_sha256_differs_never_becomes_visible(tmp_path: Path, blobs: list[Blob]) -> None:
    store = AdapterStore(tmp_path / "cache")
    partial = store.open_partial(blobs[0].sha256)
    partial.path.write_bytes(blobs[1].data)
    with pytest.raises(ValueError, match="sha256"):
        store.install(partial, name=blobs[0].name, digest=blobs[1].sha256, size=len(blobs[1].data))
    assert list(store.blobs_dir.iterdir()) == list(store.partial_dir.iterdir()) == []


def test_the_index_is_rebuilt_from_the_verified_manifests_pairs_when_refs_are_lost(tmp_path: Path,
                                                                                   blobs: list[Blob]) -> None:
    # Issue 18 item 5: refs were rebuilt from the adapter name inside each GGUF: after refs/ was lost, legal's blob
    # was named medical and an offline daemon served it. Only a verified manifest's (name, sha256) pairs name blobs.
    store = AdapterStore(tmp_path / "cache")
    for blob in blobs:
        _put(store, blob)
    _remember_manifest(store, {"legal": blobs[0]})  # blobs[0] was published as "legal", whatever it says inside
    shutil.rmtree(store.refs_dir)
    rebuilt = AdapterStore(tmp_path / "cache")
    assert rebuilt.names() == ()
    report = recover(rebuilt)
    assert report.refs_rebuilt == ("legal",)
    assert {a.name: a.sha256 for a in rebuilt.adapters()} == {"legal": blobs[0].sha256}  # blobs[1]: listed nowhere
    assert rebuilt.lookup(blobs[0].name) is None and rebuilt.lookup(blobs[1].name) is None


def test_recovery_scan_removes_corrupt_blobs_and_debris_and_finishes_or_keeps_partials(
        tmp_path: Path, blobs: list[Blob]) -> None:
    store = AdapterStore(tmp_path / "cache")
    _put(store, blobs[0])
    flipped = bytearray(blobs[0].data)
    flipped[len(flipped) // 2] ^= 1  # bit rot on disk, same length
    store.blob_path(blobs[0].sha256).write_bytes(flipped)
    complete = store.open_partial(blobs[1].sha256)  # killed after the last byte, before the rename
    complete.path.write_bytes(blobs[1].data)
    half_sha = "ab" * 32
    half = store.save_validator(store.open_partial(half_sha), '"etag-1"')
    half.path.write_bytes(b"x" * 100)
    stale = store.open_partial("cd" * 32)
    stale.path.write_bytes(b"y")
    os.utime(stale.path, (0, 0))
    for killed in (complete, half, stale):  # their writers died: the kernel dropped their claims
        release(killed)
    (store.partial_dir / f"{'ef' * 32}.0123456789abcdef.json").write_text("{}")  # validator without a partial
    (store.blobs_dir / ".x.gguf.tmp").write_bytes(b"temp")
    (store.refs_dir / ".json-extract.abc.tmp").write_text("temp")

    _remember_manifest(store, {blob.name: blob for blob in blobs})
    report = recover(store)

    assert report.removed_corrupt == (blobs[0].sha256,) and store.lookup(blobs[0].name) is None
    assert report.completed == (blobs[1].sha256,) and report.refs_rebuilt == (blobs[1].name,)
    assert report.resumable == (half_sha,)
    assert {".x.gguf.tmp", ".json-extract.abc.tmp", stale.path.name} <= set(report.removed_files)
    assert sorted(p.name for p in store.blobs_dir.iterdir()) == [f"{blobs[1].sha256}.gguf"]
    assert sorted(p.name for p in store.partial_dir.iterdir()) == sorted([half.path.name, half.validator_path.name])
    resumed = store.open_partial(half_sha)
    assert resumed.size == 100 and resumed.validator == '"etag-1"' and resumed.path != half.path


def test_a_partial_being_written_is_never_claimed_by_another_writer(tmp_path: Path) -> None:
    # Regression: a second claimer renamed a live writer's partial and both appended to one file.
    store = AdapterStore(tmp_path / "cache")
    first = store.open_partial("ab" * 32)
    first.path.write_bytes(b"1234")
    second = store.open_partial("ab" * 32)  # the first writer still holds its claim: a partial of its own
    assert first.path.exists() and second.path != first.path and second.size == 0
    release(first)  # the first writer died or gave up: its bytes may be resumed
    third = store.open_partial("ab" * 32)
    assert third.size == 4 and not first.path.exists() and third.path.exists()
    with pytest.raises(IntegrityError, match="3 bytes on disk where the manifest lists 4"):
        third.path.write_bytes(b"123")
        store.install(third, name=None, digest="ab" * 32, size=4)
    assert not third.path.exists()


def test_lru_eviction_keeps_protected_adapters(tmp_path: Path, blobs: list[Blob]) -> None:
    small, large = sorted(blobs, key=lambda b: len(b.data))
    store = AdapterStore(tmp_path / "cache", budget_bytes=len(small.data) + len(large.data))
    _put(store, small)
    _put(store, large)
    _age(store, small.name, 100)  # small is the least recently used
    assert store.make_room("new", len(small.data), protected=[small.name]) == [large.name]
    assert store.names() == (small.name,)
    _put(store, large)
    _age(store, large.name, 200)
    assert store.make_room("new", len(small.data)) == [large.name]


def test_a_budget_smaller_than_the_adapter_is_refused_without_evicting(tmp_path: Path, blobs: list[Blob]) -> None:
    store = AdapterStore(tmp_path / "cache", budget_bytes=len(blobs[0].data) + 10)
    _put(store, blobs[0])
    with pytest.raises(DiskFull, match="adapter_cache_mb") as caught:
        store.make_room("huge", 10 * len(blobs[0].data))
    assert caught.value.needed_bytes == 10 * len(blobs[0].data) and store.names() == (blobs[0].name,)
    with pytest.raises(DiskFull) as held:
        store.make_room("other", len(blobs[0].data), protected=[blobs[0].name])
    assert held.value.held_bytes == len(blobs[0].data) and store.names() == (blobs[0].name,)


def test_free_space_pre_check_evicts_or_refuses(tmp_path: Path, blobs: list[Blob],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = AdapterStore(tmp_path / "cache")
    _put(store, blobs[0])
    free = 100
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - free, free))  # type: ignore[attr-defined]
    with pytest.raises(DiskFull, match="free disk space"):
        store.make_room("new", free + len(blobs[0].data) + 1)
    assert store.names() == (blobs[0].name,)
    assert store.make_room("new", free + len(blobs[0].data)) == [blobs[0].name]


def test_an_updated_adapter_replaces_its_old_blob(tmp_path: Path, blobs: list[Blob]) -> None:
    store = AdapterStore(tmp_path / "cache")
    _put(store, blobs[0], name="task")
    _put(store, blobs[1], name="task")  # a new version published under the same name
    assert store.lookup("task").sha256 == blobs[1].sha256  # type: ignore[union-attr]
    assert [p.name for p in store.blobs_dir.iterdir()] == [f"{blobs[1].sha256}.gguf"]


def test_two_names_can_share_one_blob_and_eviction_keeps_it_for_the_other(tmp_path: Path,
                                                                         blobs: list[Blob]) -> None:
    store = AdapterStore(tmp_path / "cache")
    _put(store, blobs[0])
    store.link("alias", blobs[0].sha256)
    assert store.usage_bytes() == len(blobs[0].data)
    assert store.evict(blobs[0].name)
    assert store.lookup("alias") is not None and store.blob_path(blobs[0].sha256).exists()
    assert store.evict("alias") and not store.blob_path(blobs[0].sha256).exists()


def test_a_staged_update_is_neither_evicted_nor_named_by_the_index_rebuild(tmp_path: Path, blobs: list[Blob]) -> None:
    store = AdapterStore(tmp_path / "cache", budget_bytes=len(blobs[0].data) + len(blobs[1].data))
    _put(store, blobs[0], name="task")
    partial = store.open_partial(blobs[1].sha256)  # an update of "task", fetched but not switched to yet
    partial.path.write_bytes(blobs[1].data)
    store.stage(blobs[1].sha256)
    store.install(partial, name=None, digest=blobs[1].sha256, size=len(blobs[1].data))
    report = recover(store)  # a restart: the blob's inner name (brand-voice or json-extract) must not be used
    assert report.refs_rebuilt == () and store.names() == ("task",)
    with pytest.raises(DiskFull):  # the staged blob is kept like a protected one
        store.make_room("other", len(blobs[1].data), protected=["task"])  # fits only by evicting it
    assert store.blob_path(blobs[1].sha256).exists()
    store.link("task", blobs[1].sha256)
    store.unstage(blobs[1].sha256)
    assert store.staged() == set() and [p.name for p in store.blobs_dir.iterdir()] == [f"{blobs[1].sha256}.gguf"]


def test_a_daemon_evicts_its_own_idle_adapters_but_never_another_processs(tmp_path: Path, blobs: list[Blob]) -> None:
    # Regression: the daemon's own leases made its idle cached adapters unevictable: every new pull was a 507.
    small, large = sorted(blobs, key=lambda b: len(b.data))
    store = AdapterStore(tmp_path / "cache", budget_bytes=len(large.data) + 16)
    _put(store, small)
    assert store.lease(small.sha256)  # this daemon serves it, idle (cached, not resident)
    other = AdapterStore(tmp_path / "cache", budget_bytes=len(large.data) + 16)  # another process on the cache
    assert store.make_room(large.name, len(large.data)) == [small.name]
    assert not store.blob_path(small.sha256).exists()
    _put(store, small)
    assert other.lease(small.sha256)  # now another process relies on it
    with pytest.raises(DiskFull):
        store.make_room(large.name, len(large.data))
    assert store.blob_path(small.sha256).exists()
    other.close()


def test_stray_refs_and_folders_in_the_cache_are_ignored_then_cleaned(tmp_path: Path, blobs: list[Blob]) -> None:
    # Regression: `touch refs/'alpha~'` made ls, gc and sync fail with "invalid name"; a folder made gc crash.
    store = AdapterStore(tmp_path / "cache")
    _put(store, blobs[0])
    (store.refs_dir / "alpha~").write_text("x")
    (store.refs_dir / "folder").mkdir()
    (store.blobs_dir / "junk").mkdir()
    assert store.names() == (blobs[0].name,)
    report = recover(store)
    assert {"alpha~", "folder", "junk"} <= set(report.removed_files) and store.names() == (blobs[0].name,)


def test_partial_downloads_count_against_the_budget_and_the_oldest_unclaimed_goes_first(
        tmp_path: Path, blobs: list[Blob]) -> None:
    # Issue 18 item 11: partial/ held 6.8 MB under --cache-mb 2; they were outside the quota.
    small, large = sorted(blobs, key=lambda b: len(b.data))
    store = AdapterStore(tmp_path / "cache", budget_bytes=len(large.data) + len(small.data))
    _put(store, small)
    abandoned = store.open_partial("ab" * 32)  # a download given up on, its writer gone
    abandoned.path.write_bytes(b"x" * (len(small.data) // 2))
    release(abandoned)
    os.utime(abandoned.path, (0, 0))  # older than the cached adapter
    assert store.partial_bytes() == len(small.data) // 2
    # large + small + the partial exceed the budget: the partial (oldest) goes, the cached adapter stays.
    assert store.make_room(large.name, len(large.data)) == [abandoned.path.name]
    assert not abandoned.path.exists() and store.lookup(small.name) is not None

    live = store.open_partial("cd" * 32)  # a download under way in this (or any live) process: never removed
    live.path.write_bytes(b"y" * (len(small.data) // 2))
    with pytest.raises(DiskFull) as full:
        store.make_room(large.name, len(large.data), protected=[small.name])
    assert full.value.held_bytes >= len(small.data) // 2 and live.path.exists()
    resumed = store.open_partial(large.sha256)  # the download itself resumes a partial: it is part of the size
    resumed.path.write_bytes(large.data[:100])
    release(resumed)
    release(live)
    live.path.unlink()
    assert store.make_room(large.name, len(large.data), protected=[small.name], sha256=large.sha256) == []
    assert resumed.path.exists()
