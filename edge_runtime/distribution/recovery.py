"""The start-up scan of the adapter cache: what a crash, a kill or bit rot left behind is verified or cleaned up.

Blobs are re-hashed (a corrupt one is removed), partials whose writer died are finished when complete, kept for a
resume, or deleted when stale; stray files go; refs lost with the index are rebuilt from the adapter name each GGUF
records. Partials another live process writes are left alone (``locks.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from edge_runtime.distribution.locks import Claim
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
from edge_runtime.files import file_sha256
from edge_runtime.gguf.info import read_info
from edge_runtime.names import SHA256_NAME, validate_name

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
    refs_rebuilt: tuple[str, ...] = ()  # names whose ref was recreated from a blob's metadata


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
    """Recreate refs for blobs no name points at, from the adapter name each GGUF records; return them."""
    referenced = {a.sha256 for a in store.adapters()} | store.staged()  # a staged update keeps its old name's
    rebuilt = []
    for path in sorted(store.blobs_dir.glob("*.gguf")):
        sha256 = path.name[:64]
        if sha256 in referenced:
            continue
        try:
            name = validate_name(read_info(path).name)
        except EdgeRtError as exc:
            log.warning("cannot name blob %s (%s): left for eviction", path.name, exc)
            continue
        if store.lookup(name) is None:
            store.link(name, sha256)
            rebuilt.append(name)
    return rebuilt
