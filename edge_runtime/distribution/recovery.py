"""The start-up scan of the adapter cache: what a crash, a kill or bit rot left behind is verified or cleaned up.

Blobs are re-hashed (a corrupt one is removed), partials whose writer died are finished when complete, kept for a
resume, or deleted when stale; stray files go; refs lost with the index are rebuilt from the (name, sha256) pairs
of the manifests this cache verified (``manifests/``), never from the adapter name a GGUF records inside (that is
whatever its converter wrote: a blob named by it served one adapter as another). Partials another live process
writes are left alone (``locks.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from edge_runtime.distribution.locks import Claim
from edge_runtime.distribution.manifest import MAX_MANIFEST_BYTES, read_manifest
from edge_runtime.distribution.store import (
    BLOB_NAME,
    PARTIAL_MAX_AGE_S,
    PARTIAL_NAME,
    AdapterStore,
    Partial,
    is_ref,
    read_validator,
    release,
    remove_file,
)
from edge_runtime.errors import EdgeRtError
from edge_runtime.files import file_sha256, read_bounded
from edge_runtime.names import SHA256_NAME

__all__ = ["RecoveryReport", "rebuild_refs", "recover"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    """What the start-up scan did."""

    verified: tuple[str, ...] = ()  # sha256 of blobs that re-hashed correctly
    removed_corrupt: tuple[str, ...] = ()  # sha256 of blobs whose content no longer matched their name
    completed: tuple[str, ...] = ()  # partials that were whole and correct: installed
    resumable: tuple[str, ...] = ()  # partials kept for resuming
    removed_files: tuple[str, ...] = ()  # stale partials, temp files and strays (file names)
    refs_rebuilt: tuple[str, ...] = ()  # names whose ref was recreated from a verified manifest's listing


def recover(store: AdapterStore, *, verify: bool = True) -> RecoveryReport:
    """The start-up scan of ``store``, under its cache lock: re-hash blobs, finish or keep partials, remove strays,
    rebuild missing refs; partials and blobs of other live processes are left alone."""
    with store.locked():
        return _recover(store, verify=verify)


def _recover(store: AdapterStore, *, verify: bool) -> RecoveryReport:
    verified, corrupt, removed = [], [], []
    for path in sorted(store.blobs_dir.iterdir()):
        match = BLOB_NAME.fullmatch(path.name)
        if match is None:
            removed.append(remove_file(path))
        elif verify and file_sha256(path).hexdigest() != match["sha"]:
            log.warning("blob %s no longer matches its sha256: removed", path.name)
            corrupt.append(remove_file(path)[:64])
        elif verify:
            verified.append(match["sha"])
    completed, resumable = _recover_partials(store, removed)
    for mark in sorted(store.staged_dir.iterdir()):
        if not SHA256_NAME.fullmatch(mark.name):
            removed.append(remove_file(mark))
    for ref in sorted(store.refs_dir.iterdir()):
        if not is_ref(ref) or store.lookup(ref.name) is None:
            removed.append(remove_file(ref))
    return RecoveryReport(
        verified=tuple(verified),
        removed_corrupt=tuple(corrupt),
        completed=tuple(completed),
        resumable=tuple(resumable),
        removed_files=tuple(removed),
        refs_rebuilt=tuple(rebuild_refs(store)),
    )


def _recover_partials(store: AdapterStore, removed: list[str]) -> tuple[list[str], list[str]]:
    completed, resumable = [], []
    now = time.time()
    for path in sorted(store.partial_dir.iterdir()):
        match = PARTIAL_NAME.fullmatch(path.name)
        if match is None or (match["kind"] == "json" and not path.with_suffix(".part").exists()):
            removed.append(remove_file(path))
            continue
        if match["kind"] != "part":
            continue
        claim = Claim.take(path)
        if claim is None:  # a live process is writing it
            resumable.append(match["sha"])
            continue
        partial = Partial(
            path=path, sha256=match["sha"], validator=read_validator(path.with_suffix(".json")), claim=claim
        )
        if store.blob_path(partial.sha256).exists() or now - path.stat().st_mtime > PARTIAL_MAX_AGE_S:
            store.discard(partial)
            removed.append(path.name)
        elif partial.size and file_sha256(path).hexdigest() == partial.sha256:
            store.install(partial, name=None, digest=partial.sha256, size=partial.size)
            completed.append(partial.sha256)
        else:
            release(partial)
            resumable.append(partial.sha256)
    return completed, resumable


def rebuild_refs(store: AdapterStore) -> list[str]:
    """Recreate refs for blobs no name points at, from the (name, sha256) pairs of the manifests this cache verified;
    return the names. The refs record no publisher: a key-pinned daemon serves them only where its own manifest lists
    the same pair."""
    referenced = {a.sha256 for a in store.adapters()} | store.staged()  # a staged update keeps its old name's
    listed = listed_names(store)
    rebuilt = []
    for path in sorted(store.blobs_dir.glob("*.gguf")):
        sha256 = path.name[:64]
        if sha256 in referenced:
            continue
        names = [name for name in listed.get(sha256, ()) if store.lookup(name) is None]
        if not names:
            log.warning("no verified manifest names blob %s: left unnamed for eviction", path.name)
        for name in names:
            store.link(name, sha256)
            rebuilt.append(name)
    return rebuilt


def listed_names(store: AdapterStore) -> dict[str, list[str]]:
    """sha256 -> adapter names, from every manifest a client verified into ``manifests/`` (each was checked against
    its client's key, if any, before it was written there)."""
    listed: dict[str, list[str]] = {}
    folder = store.root / "manifests"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            manifest = read_manifest(read_bounded(path, MAX_MANIFEST_BYTES), source=str(path), public_key=None)
        except (EdgeRtError, OSError) as exc:
            log.warning("manifest %s is not readable, its adapters are not renamed from it: %s", path, exc)
            continue
        for entry in manifest.adapters:
            if entry.name not in listed.setdefault(entry.sha256, []):
                listed[entry.sha256].append(entry.name)
    return listed
