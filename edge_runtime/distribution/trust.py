"""What a device remembers about each CDN so it can refuse rollbacks, freezes and expired manifests.

Policy (after TUF's rollback and freeze protection):

- **Versions only grow.** The highest manifest ``version`` verified from a publisher is persisted (``trust.json``
  in the cache folder); an older one raises ``RollbackRefused``. Floors belong to the publisher, as TUF's belong to
  a role whatever mirror served it: to the pinned signing key's id (``key:<keyid>``), so no other spelling of the
  URL, mirror or hf:// alias can serve an older manifest; without a pinned key (nothing is verified then) to the
  CDN's address in a normal form (``url:...``: scheme and host lower-cased, default port and dot segments gone).
  The same version with different content is refused too (a publisher always bumps the version, so that is a
  mix-and-match attack).
- **Expired manifests are refused**, judged against a *monotonic clock floor*: the device's time is taken as
  ``max(wall clock, newest "created" of any manifest it has verified)``. A device whose clock reset to 1970 (no
  RTC battery, no NTP yet) therefore still refuses every manifest that had expired before the newest one it has
  seen was published, and a replayed old manifest cannot pull its clock back. A device that has never verified a
  manifest and has no trustworthy clock accepts any unexpired-looking first manifest (trust on first use);
  pinning ``--public-key`` is what makes that first manifest trustworthy. Cached adapters stay usable whatever
  the manifest's state (``--offline``): expiry stops *updates*, it never deletes verified blobs.
- **Unsigned floors are bounded and resettable.** Without a key anyone on the path can forge a manifest, and one with
  version 2^62 created in 9999 would lock the address out for good. So an unsigned manifest may move the floors at
  most ``UNSIGNED_VERSION_STEP`` versions and ``UNSIGNED_TIME_STEP`` past them, and the operator may drop an
  unsigned address's floors (``edge-rt sync --reset-trust``; refusals say so). Keyed floors are never reset.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime.distribution.keys import keyid
from edge_runtime.distribution.manifest import Manifest, format_time, parse_time
from edge_runtime.errors import ManifestExpired, RollbackRefused
from edge_runtime.files import atomic_output, read_bounded

TRUST_FILE = "trust.json"
UNSIGNED_VERSION_STEP = 10_000  # how far an unsigned manifest may raise the version floor at once
UNSIGNED_TIME_STEP = timedelta(days=400)  # how far past the clock floor an unsigned manifest's "created" may lie
RESET_FIX = (
    "This CDN is unsigned, so its floors came from unverified manifests: if a forged one raised them, run "
    "`edge-rt sync --cdn URL --reset-trust`, or pin a key (--public-key) so floors cannot be forged"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def publisher_id(cdn: str, public_key: Ed25519PublicKey | None) -> str:
    """Whose floors apply to manifests from ``cdn``: the pinned key's id, else the CDN's normalised address."""
    return f"key:{keyid(public_key)}" if public_key is not None else f"url:{normalized_url(cdn)}"


def normalized_url(url: str) -> str:
    """``url`` with its scheme and host lower-cased, a default port dropped and dot segments resolved."""
    parts = urlsplit(url.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    port = parts.port if parts.port not in (None, _DEFAULT_PORTS.get(scheme)) else None
    netloc = host if port is None else f"{host}:{port}"
    path = posixpath.normpath(parts.path) if parts.path else ""
    return urlunsplit((scheme, netloc, "" if path in ("/", ".") else path, parts.query, ""))


MAX_TRUST_BYTES = 4 << 20


@dataclass(frozen=True)
class TrustRecord:
    """The newest manifest a device verified from one CDN."""

    version: int
    digest: str  # sha256 of the canonical signed content
    clock_floor: datetime  # newest "created" seen: the device never believes it is earlier than this

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> TrustRecord:
        """Read one entry of ``trust.json`` (written by this module)."""
        return cls(
            version=int(str(data["version"])),
            digest=str(data["digest"]),
            clock_floor=parse_time(str(data["clock_floor"])),
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"version": self.version, "digest": self.digest, "clock_floor": format_time(self.clock_floor)}


class TrustStore:
    """Version and clock floors per CDN URL, persisted atomically in ``<cache_dir>/trust.json``."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / TRUST_FILE

    def get(self, publisher: str) -> TrustRecord | None:
        """The record for ``publisher``, or None when this device never verified a manifest from it."""
        entry = self._load().get(publisher)
        return None if entry is None else TrustRecord.from_dict(entry)

    def accept(
        self,
        publisher: str,
        manifest: Manifest,
        *,
        source: str | None = None,
        fallbacks: Sequence[str] = (),
        now: datetime | None = None,
    ) -> TrustRecord:
        """Check ``manifest`` against ``publisher``'s floors (rollback, same-version swap, expiry), then raise them.

        ``source`` names where it came from in errors; ``fallbacks`` are older keys of the same floors (a trust.json
        written when floors were keyed by URL), used until ``publisher`` has a record of its own.
        """
        source = source or publisher
        record = next((r for r in map(self.get, (publisher, *fallbacks)) if r is not None), None)
        now = now or datetime.now(timezone.utc)
        unsigned = not publisher.startswith("key:")
        fix = {"fix": RESET_FIX} if unsigned else {}
        if record is not None:
            if manifest.version < record.version:
                raise RollbackRefused(source, offered_version=manifest.version, trusted_version=record.version, **fix)
            if manifest.version == record.version and manifest.digest != record.digest:
                raise RollbackRefused(
                    source,
                    offered_version=manifest.version,
                    trusted_version=record.version,
                    problem=f"manifest version {manifest.version} changed content without a new version",
                    **fix,
                )
            if unsigned:
                _check_unsigned_step(source, manifest, record)
        device_time = max(now, record.clock_floor) if record is not None else now
        if manifest.expires <= device_time:
            raise ManifestExpired(source, expires=format_time(manifest.expires), now=format_time(device_time), **fix)
        floor = manifest.created if record is None else max(record.clock_floor, manifest.created)
        accepted = TrustRecord(version=manifest.version, digest=manifest.digest, clock_floor=floor)
        if accepted != record or self.get(publisher) is None:
            self._save(publisher, accepted)
        return accepted

    def reset(self, publisher: str) -> bool:
        """Forget the floors of an unsigned ``publisher`` (``url:...``); True when there were some. Keyed floors
        cannot be reset: a signature proved them."""
        if publisher.startswith("key:"):
            raise ValueError("floors of a signing key cannot be reset")
        data = self._load()
        if data.pop(publisher, None) is None:
            return False
        with atomic_output(self.path) as temp:
            temp.write_text(json.dumps(data, indent=2, sort_keys=True), "utf-8")
        return True

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(read_bounded(self.path, MAX_TRUST_BYTES))
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, source: str, record: TrustRecord) -> None:
        data = self._load()
        data[source] = record.to_dict()
        with atomic_output(self.path) as temp:
            temp.write_text(json.dumps(data, indent=2, sort_keys=True), "utf-8")


def _check_unsigned_step(source: str, manifest: Manifest, record: TrustRecord) -> None:
    """Refuse an unsigned manifest that would move the floors further than a publisher plausibly does at once."""
    if manifest.version - record.version > UNSIGNED_VERSION_STEP:
        raise RollbackRefused(
            source,
            offered_version=manifest.version,
            trusted_version=record.version,
            problem=f"unsigned manifest version {manifest.version} jumps more than "
            f"{UNSIGNED_VERSION_STEP} past version {record.version}",
            fix=RESET_FIX,
        )
    if manifest.created - record.clock_floor > UNSIGNED_TIME_STEP:
        raise RollbackRefused(
            source,
            offered_version=manifest.version,
            trusted_version=record.version,
            problem=f"unsigned manifest created {format_time(manifest.created)}, more than "
            f"{UNSIGNED_TIME_STEP.days} days after the newest one seen "
            f"({format_time(record.clock_floor)})",
            fix=RESET_FIX,
        )
