"""The adapter manifest: its schema, canonical JSON, and the signed envelope it travels in.

``manifest.json`` is one file holding the signed part and its signatures (TUF's envelope), so a publisher replaces
it with a single atomic rename and a reader never pairs a new manifest with an old detached signature::

    {"signed": {"_type": "edge-rt/adapter-manifest", "schema_version": 1, "version": 7,
                "created": "2025-01-01T00:00:00Z", "expires": "2025-01-31T00:00:00Z",
                "adapters": [{"name": ..., "sha256": ..., "size": ..., "path": "blobs/<sha256>.gguf",
                              "rank": ..., "base_fingerprint": ..., "created": ..., "description": ...}]},
     "signatures": [{"keyid": "<sha256 of the raw public key>", "sig": "<base64 ed25519 signature>"}]}

The signature covers the canonical JSON of ``signed`` (sorted keys, no spaces, UTF-8), so any whitespace or key
order of the file verifies the same. Unknown keys are ignored (forward compatibility inside one schema version);
a ``schema_version`` this code does not know is refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.distribution import keys
from edge_runtime.errors import EdgeRtError, InvalidManifest
from edge_runtime.names import SHA256_NAME, validate_name

MANIFEST_FILE = "manifest.json"
MANIFEST_TYPE = "edge-rt/adapter-manifest"
SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20  # ~40,000 adapters; read whole, never more


def blob_path(sha256: str) -> str:
    """The CDN-relative path of a blob: ``blobs/<sha256>.gguf`` (the only layout accepted)."""
    return f"blobs/{sha256}.gguf"


@dataclass(frozen=True)
class ManifestEntry:
    """One published adapter: its name, content address and what a device needs to decide whether to fetch it."""

    name: str
    sha256: str
    size: int  # bytes
    rank: int
    base_fingerprint: str
    created: datetime
    description: str = ""

    @property
    def path(self) -> str:
        """CDN-relative path of the blob."""
        return blob_path(self.sha256)

    @classmethod
    def from_dict(cls, data: object, *, source: str, where: str) -> ManifestEntry:
        """Parse one ``adapters[i]`` object; ``InvalidManifest`` names the bad field."""
        fields = _Fields(data, source=source, where=where)
        try:
            name = validate_name(fields.text("name"))
        except EdgeRtError as exc:
            raise fields.invalid("name", f"not a safe adapter name ({exc.message})") from exc
        sha256 = fields.text("sha256")
        if SHA256_NAME.fullmatch(sha256) is None:
            raise fields.invalid("sha256", "must be 64 lowercase hex digits")
        if fields.text("path") != blob_path(sha256):
            raise fields.invalid("path", f"must be {blob_path(sha256)!r}")
        return cls(
            name=name,
            sha256=sha256,
            size=fields.integer("size", minimum=1),
            rank=fields.integer("rank", minimum=1),
            base_fingerprint=fields.text("base_fingerprint"),
            created=fields.timestamp("created"),
            description=fields.text("description", default=""),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, including the derived ``path``."""
        return {
            "name": self.name,
            "sha256": self.sha256,
            "size": self.size,
            "path": self.path,
            "rank": self.rank,
            "base_fingerprint": self.base_fingerprint,
            "created": format_time(self.created),
            "description": self.description,
        }


@dataclass(frozen=True)
class Manifest:
    """The signed list of adapters a CDN offers; ``version`` only grows, ``expires`` bounds a freeze attack."""

    version: int
    created: datetime
    expires: datetime
    adapters: tuple[ManifestEntry, ...]
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, data: object, *, source: str) -> Manifest:
        """Parse the ``signed`` object; ``InvalidManifest`` names the bad field."""
        fields = _Fields(data, source=source, where="signed")
        if fields.text("_type") != MANIFEST_TYPE:
            raise fields.invalid("_type", f"must be {MANIFEST_TYPE!r}")
        schema = fields.integer("schema_version", minimum=1)
        if schema != SCHEMA_VERSION:
            raise fields.invalid("schema_version", f"{schema} is not supported (this edge-rt reads {SCHEMA_VERSION})")
        raw_adapters = fields.get("adapters")
        if not isinstance(raw_adapters, list):
            raise fields.invalid("adapters", "must be a list")
        adapters = tuple(
            ManifestEntry.from_dict(item, source=source, where=f"signed.adapters[{i}]")
            for i, item in enumerate(raw_adapters)
        )
        duplicates = sorted(n for n, count in Counter(a.name for a in adapters).items() if count > 1)
        if duplicates:
            raise fields.invalid("adapters", f"names listed twice: {', '.join(duplicates)}")
        return cls(
            version=fields.integer("version", minimum=1),
            created=fields.timestamp("created"),
            expires=fields.timestamp("expires"),
            adapters=adapters,
            schema_version=schema,
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``signed`` object as JSON-ready data."""
        return {
            "_type": MANIFEST_TYPE,
            "schema_version": self.schema_version,
            "version": self.version,
            "created": format_time(self.created),
            "expires": format_time(self.expires),
            "adapters": [a.to_dict() for a in self.adapters],
        }

    def entry(self, name: str) -> ManifestEntry | None:
        """The entry called ``name``, or None."""
        return self._by_name.get(name)

    @functools.cached_property
    def _by_name(self) -> dict[str, ManifestEntry]:
        return {a.name: a for a in self.adapters}

    @property
    def names(self) -> tuple[str, ...]:
        """Names of all listed adapters, in manifest order."""
        return tuple(a.name for a in self.adapters)

    @property
    def digest(self) -> str:
        """sha256 (hex) of the canonical signed content: two manifests with one version must share it."""
        return hashlib.sha256(canonical_json(self.to_dict())).hexdigest()


class _Fields:
    """Typed reads from one JSON object that name the offending key on failure."""

    def __init__(self, data: object, *, source: str, where: str) -> None:
        if not isinstance(data, Mapping):
            raise InvalidManifest(source, where, "must be a JSON object")
        self.data = data
        self.source = source
        self.where = where

    def invalid(self, key: str, problem: str) -> InvalidManifest:
        return InvalidManifest(self.source, f"{self.where}.{key}", problem)

    def get(self, key: str) -> object:
        if key not in self.data:
            raise self.invalid(key, "missing")
        return self.data[key]

    def text(self, key: str, *, default: str | None = None) -> str:
        value = self.data.get(key, default) if default is not None else self.get(key)
        if not isinstance(value, str):
            raise self.invalid(key, f"must be a string, not {type(value).__name__}")
        return value

    def integer(self, key: str, *, minimum: int) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.invalid(key, f"must be an integer >= {minimum}, not {value!r}")
        return value

    def timestamp(self, key: str) -> datetime:
        text = self.text(key)
        try:
            return parse_time(text)
        except ValueError as exc:
            raise self.invalid(key, f"{text!r} is not an ISO 8601 UTC time such as 2025-01-31T00:00:00Z") from exc


def format_time(moment: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``, to the second."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """Parse what ``format_time`` writes (any ISO 8601 with an offset); naive times are refused."""
    moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    if moment.tzinfo is None:
        raise ValueError("no time zone")
    try:
        return moment.astimezone(timezone.utc)
    except OverflowError as exc:  # 9999-12-31T23:59:59-01:00 is past what datetime holds in UTC
        raise ValueError(f"{text} is out of range") from exc


def canonical_json(data: object) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey | None) -> bytes:
    """The ``manifest.json`` document: ``signed`` plus an ed25519 signature by ``key`` (none when key is None)."""
    signed = manifest.to_dict()
    signatures = [] if key is None else [keys.sign(key, canonical_json(signed))]
    return json.dumps({"signed": signed, "signatures": signatures}, indent=2, sort_keys=True).encode("utf-8") + b"\n"


def read_manifest(document: bytes, *, source: str, public_key: Ed25519PublicKey | None) -> Manifest:
    """Parse a ``manifest.json`` document; with ``public_key``, a valid signature by that key is required."""
    if len(document) > MAX_MANIFEST_BYTES:
        raise InvalidManifest(source, None, f"{len(document)} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
    try:
        envelope = json.loads(document.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, a 5,000-digit number, absurd nesting
        raise InvalidManifest(source, None, f"not UTF-8 JSON ({str(exc)[:200]})") from exc
    if not isinstance(envelope, dict) or not isinstance(envelope.get("signed"), dict):
        raise InvalidManifest(source, "signed", 'missing: expected {"signed": {...}, "signatures": [...]}')
    if public_key is not None:
        keys.verify(envelope.get("signatures"), canonical_json(envelope["signed"]), public_key, source=source)
    return Manifest.from_dict(envelope["signed"], source=source)
