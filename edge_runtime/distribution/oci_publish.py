"""Publish a folder of adapters to an OCI registry (``oci://HOST[:PORT]/REPO[:TAG]``), or anywhere ``--out`` says.

The same manifest as a folder publish (``publish.py``: entries, versions one more than the release already under
the tag, the same signature), pushed as the artifacts ``oci.py`` describes. Order matters for readers: blobs
first, then each adapter's artifact, then the release under the tag, so a device that sees the new release finds
every blob it names. Blobs the repository already holds are not uploaded again (``HEAD`` by digest).
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.distribution.keys import keyid
from edge_runtime.distribution.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestEntry, format_time, read_manifest
from edge_runtime.distribution.manifest import sign_manifest as sign
from edge_runtime.distribution.oci import (
    EMPTY_CONFIG,
    LORA_LAYER_TYPE,
    MANIFEST_LAYER_TYPE,
    Descriptor,
    OciReference,
    adapter_artifact,
    parse_reference,
    read_release,
    release_artifact,
)
from edge_runtime.distribution.publish import PublishResult, publish, refuse_unsigned_over_signed
from edge_runtime.distribution.publish import _entry as adapter_entry
from edge_runtime.distribution.registry import Registry
from edge_runtime.distribution.transfer import TransferSettings
from edge_runtime.errors import NothingToPublish, RemoteNotFound, UnsupportedDestination

__all__ = ["RegistryPublishResult", "publish_oci", "publish_to"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class RegistryPublishResult:
    """What ``publish_oci`` pushed."""

    manifest: Manifest
    reference: str  # oci://HOST/REPO:TAG
    release_digest: str  # the digest of the release manifest the tag now names
    new_blobs: tuple[str, ...]  # sha256 of adapter blobs uploaded by this run
    uploaded_bytes: int  # every blob byte sent (adapters, the signed document, the empty config)
    signed: bool
    keyid: str | None
    previous_keyids: tuple[str, ...]

    @property
    def key_changed(self) -> bool:
        """True when the previous release was signed, and not by this key: devices pinned to it will refuse."""
        return bool(self.previous_keyids) and self.keyid not in self.previous_keyids


def publish_to(
    src_dir: Path,
    out: str,
    *,
    key: Ed25519PrivateKey | None = None,
    expires_days: float = 30.0,
    allow_empty: bool = False,
    unsigned: bool = False,
    allow_renamed: bool = False,
    transfer: TransferSettings | None = None,
) -> PublishResult | RegistryPublishResult:
    """Publish to a folder (a path or ``file://``) or a registry (``oci://``); any other scheme is refused."""
    match = _SCHEME.match(out)
    if match is None or match.group(1).lower() == "file":
        folder = Path(out) if match is None else Path(unquote(urlsplit(out).path))
        return publish(
            src_dir,
            folder,
            key=key,
            expires_days=expires_days,
            allow_empty=allow_empty,
            unsigned=unsigned,
            allow_renamed=allow_renamed,
        )
    scheme = match.group(1).lower()
    if scheme == "oci":
        return asyncio.run(
            publish_oci(
                src_dir,
                parse_reference(out),
                key=key,
                expires_days=expires_days,
                allow_empty=allow_empty,
                unsigned=unsigned,
                allow_renamed=allow_renamed,
                transfer=transfer,
            )
        )
    raise UnsupportedDestination(out, scheme)


async def publish_oci(
    src_dir: Path,
    reference: OciReference,
    *,
    key: Ed25519PrivateKey | None = None,
    expires_days: float = 30.0,
    now: datetime | None = None,
    allow_empty: bool = False,
    unsigned: bool = False,
    allow_renamed: bool = False,
    transfer: TransferSettings | None = None,
    upload_chunk_bytes: int | None = None,
) -> RegistryPublishResult:
    """Push every ``NAME.gguf`` of ``src_dir`` and a new signed manifest to ``reference``'s repository and tag.

    Refused as for a folder: an empty ``src_dir`` unless ``allow_empty``, no ``key`` over a signed release unless
    ``unsigned``, a file whose inner adapter name differs from its file name unless ``allow_renamed``. Unlike a
    folder, a registry offers no lock: two publishers racing to one tag leave the last one's release.
    """
    now = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    registry = Registry(reference, transfer=transfer or TransferSettings())
    if upload_chunk_bytes is not None:
        registry.upload_chunk_bytes = upload_chunk_bytes
    try:
        previous, previous_keyids = await _previous(registry)
        sources = sorted(src_dir.glob("*.gguf"))
        if not sources and not allow_empty:
            raise NothingToPublish(str(src_dir), withdrawn=len(previous.adapters) if previous else 0)
        refuse_unsigned_over_signed(str(reference), previous_keyids, key=key, unsigned=unsigned)
        earlier = {a.sha256: a.created for a in previous.adapters} if previous else {}
        entries = [
            await asyncio.to_thread(adapter_entry, path, created=now, earlier=earlier, allow_renamed=allow_renamed)
            for path in sources
        ]
        new_blobs = [entry.sha256 for path, entry in zip(sources, entries) if await _push_blob(registry, path, entry)]
        await registry.upload_bytes(EMPTY_CONFIG)
        for entry in entries:
            await registry.put_manifest(entry.name, _adapter_manifest(entry))
        manifest = Manifest(
            version=(previous.version + 1) if previous else 1,
            created=now,
            expires=now + timedelta(days=expires_days),
            adapters=tuple(entries),
        )
        document = await registry.upload_bytes(sign(manifest, key))
        layer = Descriptor(
            MANIFEST_LAYER_TYPE, document.digest, document.size, (("org.opencontainers.image.title", "manifest.json"),)
        )
        blobs = [
            Descriptor(LORA_LAYER_TYPE, f"sha256:{sha}", size)
            for sha, size in dict((e.sha256, e.size) for e in entries).items()
        ]
        release = release_artifact(document=layer, blobs=blobs, version=manifest.version, created=format_time(now))
        digest = await registry.put_manifest(reference.tag, release)
    finally:
        await registry.close()
    return RegistryPublishResult(
        manifest=manifest,
        reference=str(reference),
        release_digest=digest,
        new_blobs=tuple(new_blobs),
        uploaded_bytes=registry.uploaded_bytes,
        signed=key is not None,
        keyid=None if key is None else keyid(key.public_key()),
        previous_keyids=previous_keyids,
    )


async def _previous(registry: Registry) -> tuple[Manifest | None, tuple[str, ...]]:
    """The release already under the tag (its version is the floor; a broken one stops publishing) and its keys."""
    try:
        fetched = await registry.release()
    except RemoteNotFound:
        return None, ()
    source = registry.manifest_url(registry.reference.tag)
    descriptor = read_release(fetched.body or b"", source=source)
    document = await registry.small_blob(descriptor, limit_bytes=MAX_MANIFEST_BYTES)
    manifest = read_manifest(document, source=source, public_key=None)
    signatures = json.loads(document).get("signatures")
    keyids = [s.get("keyid") for s in signatures if isinstance(s, dict)] if isinstance(signatures, list) else []
    return manifest, tuple(k for k in keyids if isinstance(k, str))


async def _push_blob(registry: Registry, path: Path, entry: ManifestEntry) -> bool:
    """Upload an adapter's GGUF unless the repository holds it; True when uploaded."""
    digest = f"sha256:{entry.sha256}"
    if await registry.blob_exists(digest):
        return False
    await registry.upload_file(path, digest, entry.size)
    return True


def _adapter_manifest(entry: ManifestEntry) -> bytes:
    return adapter_artifact(
        name=entry.name,
        sha256=entry.sha256,
        size=entry.size,
        base_fingerprint=entry.base_fingerprint,
        rank=entry.rank,
        description=entry.description,
        created=format_time(entry.created),
    )
