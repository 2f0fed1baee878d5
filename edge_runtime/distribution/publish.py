"""The server side of distribution: turn a folder of ``NAME.gguf`` adapters into a CDN folder.

``CDN_DIR/blobs/<sha256>.gguf`` are immutable and never deleted here (a device may still be fetching a blob an
older manifest lists); ``CDN_DIR/manifest.json`` is replaced by one atomic rename, so a reader sees the old
manifest or the new one. Its ``version`` is one more than the manifest already there.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.distribution.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestEntry,
    blob_path,
    read_manifest,
    sign_manifest,
)
from edge_runtime.distribution.sources import read_manifest_file
from edge_runtime.errors import IncompatibleAdapter, InvalidGGUF
from edge_runtime.files import atomic_output, file_sha256
from edge_runtime.gguf.info import read_info
from edge_runtime.names import validate_name


@dataclass(frozen=True)
class PublishResult:
    """What ``publish`` wrote."""

    manifest: Manifest
    manifest_path: Path
    new_blobs: tuple[str, ...]  # sha256 of blobs written by this run
    signed: bool


def publish(src_dir: Path, out_dir: Path, *, key: Ed25519PrivateKey | None = None, expires_days: float = 30.0,
            now: datetime | None = None) -> PublishResult:
    """Publish every ``NAME.gguf`` adapter of ``src_dir`` into ``out_dir`` with a new manifest version."""
    now = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    previous = _previous(out_dir)
    earlier = {a.sha256: a.created for a in previous.adapters} if previous else {}
    entries, new_blobs = [], []
    for path in sorted(src_dir.glob("*.gguf")):
        entry = _entry(path, created=now, earlier=earlier)
        if _write_blob(path, out_dir / blob_path(entry.sha256)):
            new_blobs.append(entry.sha256)
        entries.append(entry)
    manifest = Manifest(version=(previous.version + 1) if previous else 1, created=now,
                        expires=now + timedelta(days=expires_days), adapters=tuple(entries))
    target = out_dir / MANIFEST_FILE
    with atomic_output(target) as temp:
        temp.write_bytes(sign_manifest(manifest, key))
    return PublishResult(manifest=manifest, manifest_path=target, new_blobs=tuple(new_blobs), signed=key is not None)


def _previous(out_dir: Path) -> Manifest | None:
    """The manifest already in ``out_dir``: its version is the floor (a broken one stops publishing)."""
    path = out_dir / MANIFEST_FILE
    if not path.exists():
        return None
    return read_manifest(read_manifest_file(path), source=str(path), public_key=None)


def _entry(path: Path, *, created: datetime, earlier: dict[str, datetime]) -> ManifestEntry:
    name = validate_name(path.stem)
    info = read_info(path)
    if not info.is_adapter:
        raise InvalidGGUF(str(path), "a base model, not a LoRA adapter: only adapters are published")
    if info.base_fingerprint is None or not info.lora_ranks:
        raise IncompatibleAdapter(f"{path} records no base fingerprint or LoRA tensors",
                                  fix="Convert it with `edge-rt convert` so devices can match it to their base")
    sha256 = file_sha256(path).hexdigest()
    return ManifestEntry(name=name, sha256=sha256, size=info.size_bytes, rank=max(info.lora_ranks),
                         base_fingerprint=info.base_fingerprint, created=earlier.get(sha256, created),
                         description=str(info.metadata.get("general.description", "")))


def _write_blob(source: Path, target: Path) -> bool:
    """Copy ``source`` to its content address unless a correct copy is already there; True when written."""
    if target.is_file() and file_sha256(target).hexdigest() == target.name.removesuffix(".gguf"):
        return False
    with atomic_output(target) as temp:
        shutil.copyfile(source, temp)
        if file_sha256(temp).hexdigest() != target.name.removesuffix(".gguf"):
            raise OSError(f"{source} changed while it was being published")
    return True

