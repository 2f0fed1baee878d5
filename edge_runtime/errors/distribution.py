"""Errors of adapter distribution: the CDN could not be reached, or what it sent failed verification."""

from __future__ import annotations

from edge_runtime.errors.base import EdgeRtError

__all__ = [
    "CacheMiss",
    "DistributionError",
    "IntegrityError",
    "InvalidManifest",
    "LengthExceeded",
    "ManifestExpired",
    "RegistryAuthFailed",
    "RemoteNotFound",
    "RollbackRefused",
    "SignatureInvalid",
    "SlowRetrieval",
    "TransferFailed",
    "UnsupportedDestination",
    "UntrustedData",
]


class DistributionError(EdgeRtError):
    """Getting an adapter from a CDN failed; the subclass names the step and the cause."""

    http_status = 502
    exit_code = 8
    error_type = "distribution_error"


class UntrustedData(DistributionError, ValueError):
    """What a CDN sent failed verification; none of it was used or kept."""

    exit_code = 9
    error_type = "untrusted_data"

    def __init__(self, source: str, problem: str, *, fix: str) -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}", fix=fix)


class InvalidManifest(UntrustedData):
    """A manifest is not valid JSON or breaks the schema; ``field`` names the bad or missing key."""

    error_type = "invalid_manifest"

    def __init__(self, source: str, field: str | None, problem: str) -> None:
        self.field = field
        where = f"{field}: " if field else ""
        super().__init__(
            source, f"invalid manifest: {where}{problem}", fix="Republish the CDN folder with `edge-rt publish`"
        )


class SignatureInvalid(UntrustedData):
    """The manifest is unsigned, signed by another key, or its signature does not match its content."""

    error_type = "signature_invalid"

    def __init__(self, source: str, problem: str, *, keyid: str) -> None:
        self.keyid = keyid
        super().__init__(
            source,
            f"manifest signature: {problem} (trusted key {keyid[:16]})",
            fix="Check --public-key, or republish with `edge-rt publish --key` and the matching key",
        )


class RollbackRefused(UntrustedData):
    """The CDN offers an older manifest than one this device already trusted (a rollback or freeze attack)."""

    error_type = "manifest_rollback"

    def __init__(
        self,
        source: str,
        *,
        offered_version: int,
        trusted_version: int,
        problem: str | None = None,
        fix: str = "Publish a new manifest (versions only grow)",
    ) -> None:
        self.offered_version = offered_version
        self.trusted_version = trusted_version
        super().__init__(
            source,
            problem or f"manifest version {offered_version} is older than version {trusted_version} already trusted",
            fix=fix,
        )


class ManifestExpired(UntrustedData):
    """The manifest's ``expires`` lies before the device's clock (or the newest time it has already seen)."""

    error_type = "manifest_expired"

    def __init__(
        self,
        source: str,
        *,
        expires: str,
        now: str,
        fix: str = "Republish the CDN folder (`edge-rt publish` renews expires); check the device clock",
    ) -> None:
        self.expires = expires
        self.now = now
        super().__init__(source, f"manifest expired at {expires} (device time {now})", fix=fix)


class IntegrityError(UntrustedData):
    """A downloaded blob's sha256 differs from the manifest's; it was deleted before anyone could see it."""

    error_type = "integrity_error"

    def __init__(self, source: str, *, expected_sha256: str, actual_sha256: str, problem: str | None = None) -> None:
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256
        super().__init__(
            source,
            problem or f"sha256 {actual_sha256[:16]}... differs from the manifest's {expected_sha256[:16]}...",
            fix="The CDN or the link corrupts data; republish the adapter or try another network",
        )


class LengthExceeded(UntrustedData):
    """A response is longer than the manifest (or the 16 MiB manifest bound) allows; reading stopped at the limit."""

    error_type = "length_exceeded"

    def __init__(self, source: str, *, limit_bytes: int, received_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.received_bytes = received_bytes
        super().__init__(
            source,
            f"sent at least {received_bytes} bytes where {limit_bytes} are allowed",
            fix="The CDN serves a different file than its manifest lists; republish it",
        )


class TransferFailed(DistributionError, ConnectionError):
    """The CDN could not be reached or refused the request (after retries where retrying makes sense)."""

    def __init__(
        self,
        url: str,
        reason: str,
        *,
        status: int | None = None,
        attempts: int = 1,
        fix: str = "Check the network and the --cdn URL; cached adapters stay usable with --offline",
    ) -> None:
        self.url = url
        self.reason = reason
        self.status = status
        self.attempts = attempts
        super().__init__(f"{url}: {reason} (after {attempts} attempt{'s' if attempts != 1 else ''})", fix=fix)


class RedirectRefused(TransferFailed):
    """The CDN redirected somewhere edge-rt does not follow: another scheme, a loop, a link-local address, or from a
    public origin to a loopback or private one."""

    def __init__(self, url: str, location: str, reason: str) -> None:
        self.location = location
        super().__init__(
            url,
            f"redirect to {location[:200]!r} refused: {reason}",
            fix="Fix the CDN's redirect, or point --cdn at where the files are",
        )


class SlowRetrieval(TransferFailed, TimeoutError):
    """A download stalled, ran below the minimum throughput, or passed its overall deadline."""

    error_type = "slow_retrieval"


class RemoteNotFound(TransferFailed, FileNotFoundError):
    """The CDN answered 404 for a file its manifest lists (or for the manifest itself)."""

    exit_code = 3
    error_type = "remote_not_found"


class RegistryAuthFailed(TransferFailed, PermissionError):
    """A registry refused the credentials edge-rt sent (or wants some edge-rt has none of, or cannot use)."""

    exit_code = 11
    error_type = "registry_auth_failed"

    def __init__(
        self,
        url: str,
        reason: str,
        *,
        status: int | None = 401,
        fix: str = "Set EDGE_RT_REGISTRY_USERNAME and EDGE_RT_REGISTRY_PASSWORD, or add the registry to "
        "the auths of ~/.docker/config.json (`docker login` without a credential helper)",
    ) -> None:
        super().__init__(url, reason, status=status, attempts=1, fix=fix)


class UnsupportedDestination(EdgeRtError, ValueError):
    """``publish --out`` names a URL scheme edge-rt does not publish to (it would otherwise become a folder name)."""

    http_status = 400
    exit_code = 2
    error_type = "unsupported_destination"

    def __init__(self, destination: str, scheme: str) -> None:
        self.destination = destination
        self.scheme = scheme
        super().__init__(
            f"cannot publish to {destination}: edge-rt does not publish to {scheme}:// addresses",
            fix="Use a folder path (served by any static server) or oci://HOST[:PORT]/REPOSITORY[:TAG]",
        )


class CacheMiss(DistributionError, FileNotFoundError):
    """Offline (``--offline``, ``EDGE_RT_OFFLINE`` or ``HF_HUB_OFFLINE``) and the adapter is not in the cache."""

    http_status = 503
    exit_code = 3
    error_type = "cache_miss"

    def __init__(self, name: str, *, cached: tuple[str, ...]) -> None:
        self.name = name
        self.cached = cached
        listing = ", ".join(cached) if cached else "none"
        super().__init__(
            f"adapter {name!r} is not cached and the device is offline",
            fix=f"Sync it while online (`edge-rt sync --adapters {name}`); cached adapters: {listing}",
        )
