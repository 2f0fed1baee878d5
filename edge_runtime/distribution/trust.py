"""What a device remembers about each CDN so it can refuse rollbacks, freezes and expired manifests.

Policy (after TUF's rollback and freeze protection):

- **Versions only grow.** The highest manifest ``version`` verified from a CDN is persisted (``trust.json`` in the
  cache folder, keyed by CDN URL); an older one raises ``RollbackRefused``. The same version with different content
  is refused too (a publisher always bumps the version, so that is a mix-and-match attack).
- **Expired manifests are refused**, judged against a *monotonic clock floor*: the device's time is taken as
  ``max(wall clock, newest "created" of any manifest it has verified)``. A device whose clock reset to 1970 (no
  RTC battery, no NTP yet) therefore still refuses every manifest that had expired before the newest one it has
  seen was published, and a replayed old manifest cannot pull its clock back. A device that has never verified a
  manifest and has no trustworthy clock accepts any unexpired-looking first manifest (trust on first use);
  pinning ``--public-key`` is what makes that first manifest trustworthy. Cached adapters stay usable whatever
  the manifest's state (``--offline``): expiry stops *updates*, it never deletes verified blobs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edge_runtime.distribution.manifest import Manifest, format_time, parse_time
from edge_runtime.errors import ManifestExpired, RollbackRefused
from edge_runtime.files import atomic_output, read_bounded

TRUST_FILE = "trust.json"
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
        return cls(version=int(str(data["version"])), digest=str(data["digest"]),
                   clock_floor=parse_time(str(data["clock_floor"])))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"version": self.version, "digest": self.digest, "clock_floor": format_time(self.clock_floor)}


class TrustStore:
    """Version and clock floors per CDN URL, persisted atomically in ``<cache_dir>/trust.json``."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / TRUST_FILE

    def get(self, source: str) -> TrustRecord | None:
        """The record for ``source``, or None when this device never verified a manifest from it."""
        entry = self._load().get(source)
        return None if entry is None else TrustRecord.from_dict(entry)

    def accept(self, source: str, manifest: Manifest, *, now: datetime | None = None) -> TrustRecord:
        """Check ``manifest`` against the floors (rollback, same-version swap, expiry) and raise the floors."""
        record = self.get(source)
        now = now or datetime.now(timezone.utc)
        if record is not None:
            if manifest.version < record.version:
                raise RollbackRefused(source, offered_version=manifest.version, trusted_version=record.version)
            if manifest.version == record.version and manifest.digest != record.digest:
                raise RollbackRefused(source, offered_version=manifest.version, trusted_version=record.version,
                                      problem=f"manifest version {manifest.version} changed content without a "
                                              "new version")
        device_time = max(now, record.clock_floor) if record is not None else now
        if manifest.expires <= device_time:
            raise ManifestExpired(source, expires=format_time(manifest.expires), now=format_time(device_time))
        floor = manifest.created if record is None else max(record.clock_floor, manifest.created)
        accepted = TrustRecord(version=manifest.version, digest=manifest.digest, clock_floor=floor)
        if accepted != record:
            self._save(source, accepted)
        return accepted

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
