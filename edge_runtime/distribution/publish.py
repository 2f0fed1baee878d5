"""The server side of distribution: turn a folder of ``NAME.gguf`` adapters into a CDN folder.

``CDN_DIR/blobs/<sha256>.gguf`` are immutable and never deleted here (a device may still be fetching a blob an
older manifest lists); ``CDN_DIR/manifest.json`` is replaced by one atomic rename, so a reader sees the old
manifest or the new one. Its ``version`` is one more than the manifest already there: two publishes into one folder
take turns (``CDN_DIR/.publish.lock``), so no version is ever written twice with different content.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.distribution.keys import keyid
from edge_runtime.distribution.locks import CacheLock
from edge_runtime.distribution.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestEntry,
    blob_path,
    read_manifest,
    sign_manifest,
)
from edge_runtime.distribution.sources import read_manifest_file
from edge_runtime.errors import IncompatibleAdapter, InvalidGGUF, NothingToPublish, PublishRefused
from edge_runtime.files import atomic_output, file_sha256
from edge_runtime.gguf import keys
from edge_runtime.gguf.info import read_info
from edge_runtime.names import validate_name

PUBLIC_FILE_MODE = 0o644  # the origin server may run as another user
PUBLIC_DIR_MODE = 0o755
LOCK_FILE = ".publish.lock"


@dataclass(frozen=True)
class PublishResult:
    """What ``publish`` wrote."""

    manifest: Manifest
    manifest_path: Path
    new_blobs: tuple[str, ...]  # sha256 of blobs written by this run
    signed: bool
    keyid: str | None  # the signing key's id (None: unsigned)
    previous_keyids: tuple[str, ...]  # keys that signed the manifest this one replaces

    @property
    def key_changed(self) -> bool:
        """True when the previous manifest was signed, and not by this key: devices pinned to it will refuse."""
        return bool(self.previous_keyids) and self.keyid not in self.previous_keyids


def publish(
    src_dir: Path,
    out_dir: Path,
    *,
    key: Ed25519PrivateKey | None = None,
    expires_days: float = 30.0,
    now: datetime | None = None,
    allow_empty: bool = False,
    unsigned: bool = False,
    allow_renamed: bool = False,
) -> PublishResult:
    """Publish every ``NAME.gguf`` adapter of ``src_dir`` into ``out_dir`` with a new manifest version.

    Files land 0644 (an origin server often runs as another user). Refused: an empty ``src_dir``
    (``NothingToPublish``) unless ``allow_empty``, as it would withdraw every adapter from every device; without
    ``key``, a folder whose manifest is signed (``PublishRefused``) unless ``unsigned``, as every device pinned to the
    key would refuse all updates from then on; a file whose adapter name inside is not its file name unless
    ``allow_renamed`` (the file name is what devices will call it).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with CacheLock(out_dir / LOCK_FILE).held():  # held until the new manifest is in place
        return _publish(
            src_dir,
            out_dir,
            key=key,
            expires_days=expires_days,
            now=now,
            allow_empty=allow_empty,
            unsigned=unsigned,
            allow_renamed=allow_renamed,
        )


def _publish(
    src_dir: Path,
    out_dir: Path,
    *,
    key: Ed25519PrivateKey | None,
    expires_days: float,
    now: datetime | None,
    allow_empty: bool,
    unsigned: bool,
    allow_renamed: bool,
) -> PublishResult:
    now = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    previous, previous_keyids = _previous(out_dir)
    sources = sorted(src_dir.glob("*.gguf"))
    if not sources and not allow_empty:
        raise NothingToPublish(str(src_dir), withdrawn=len(previous.adapters) if previous else 0)
    refuse_unsigned_over_signed(str(out_dir), previous_keyids, key=key, unsigned=unsigned)
    earlier = {a.sha256: a.created for a in previous.adapters} if previous else {}
    entries, new_blobs = [], []
    for path in sources:
        entry = _entry(path, created=now, earlier=earlier, allow_renamed=allow_renamed)
        if _write_blob(path, out_dir / blob_path(entry.sha256)):
            new_blobs.append(entry.sha256)
        entries.append(entry)
    manifest = Manifest(
        version=(previous.version + 1) if previous else 1,
        created=now,
        expires=now + timedelta(days=expires_days),
        adapters=tuple(entries),
    )
    target = out_dir / MANIFEST_FILE
    with atomic_output(target, mode=PUBLIC_FILE_MODE) as temp:
        temp.write_bytes(sign_manifest(manifest, key))
    return PublishResult(
        manifest=manifest,
        manifest_path=target,
        new_blobs=tuple(new_blobs),
        signed=key is not None,
        keyid=None if key is None else keyid(key.public_key()),
        previous_keyids=previous_keyids,
    )


def refuse_unsigned_over_signed(
    destination: str, previous_keyids: tuple[str, ...], *, key: Ed25519PrivateKey | None, unsigned: bool
) -> None:
    """``PublishRefused`` when a publish without a key would replace a signed manifest and ``--unsigned`` was not
    given: every device pinned to that key would refuse all updates from then on."""
    if key is None and previous_keyids and not unsigned:
        raise PublishRefused(
            destination,
            f"its manifest is signed (key {', '.join(previous_keyids)}) and no --key "
            "was given: devices pinned to that key would refuse every update",
            fix="Pass --key with the signing key, or --unsigned to replace it with an unsigned one",
        )


def _previous(out_dir: Path) -> tuple[Manifest | None, tuple[str, ...]]:
    """The manifest already in ``out_dir`` (its version is the floor; a broken one stops publishing) and its keys."""
    path = out_dir / MANIFEST_FILE
    if not path.exists():
        return None, ()
    document = read_manifest_file(path)
    manifest = read_manifest(document, source=str(path), public_key=None)
    signatures = json.loads(document).get("signatures")
    keyids = [s.get("keyid") for s in signatures if isinstance(s, dict)] if isinstance(signatures, list) else []
    return manifest, tuple(k for k in keyids if isinstance(k, str))


def _entry(path: Path, *, created: datetime, earlier: dict[str, datetime], allow_renamed: bool) -> ManifestEntry:
    name = validate_name(path.stem)
    info = read_info(path)
    inner = info.metadata.get(keys.ADAPTER_NAME)
    if inner is not None and str(inner) != name and not allow_renamed:
        raise PublishRefused(
            str(path),
            f"the adapter inside is named {str(inner)!r}, its file {name!r}",
            fix=f"Rename the file to {inner}.gguf, or pass --allow-renamed to publish it as {name!r}",
        )
    if not info.is_adapter:
        raise InvalidGGUF(str(path), "a base model, not a LoRA adapter: only adapters are published")
    if info.base_fingerprint is None or not info.lora_ranks:
        raise IncompatibleAdapter(
            f"{path} records no base fingerprint or LoRA tensors",
            fix="Convert it with `edge-rt convert` so devices can match it to their base",
        )
    sha256 = file_sha256(path).hexdigest()
    return ManifestEntry(
        name=name,
        sha256=sha256,
        size=info.size_bytes,
        rank=max(info.lora_ranks),
        base_fingerprint=info.base_fingerprint,
        created=earlier.get(sha256, created),
        description=str(info.metadata.get(keys.DESCRIPTION, "")),
    )


def _write_blob(source: Path, target: Path) -> bool:
    """Copy ``source`` to its content address unless a correct copy is already there; True when written."""
    for folder in (target.parent.parent, target.parent):  # readable by an origin running as another user, whatever
        folder.mkdir(parents=True, exist_ok=True)  # the publisher's umask
        os.chmod(folder, PUBLIC_DIR_MODE)
    if target.is_file() and file_sha256(target).hexdigest() == target.name.removesuffix(".gguf"):
        return False
    with atomic_output(target, mode=PUBLIC_FILE_MODE) as temp:
        shutil.copyfile(source, temp)
        if file_sha256(temp).hexdigest() != target.name.removesuffix(".gguf"):
            raise OSError(f"{source} changed while it was being published")
    return True
