"""Typed errors: one class per failure a user can act on.

Every error carries the offending value, the limit it broke and the fix, and declares the HTTP status and the
CLI exit code it maps to. Only ``cli.py`` and the server's error middleware read those two ClassVars.

The tree::

    EdgeRtError                                  (Exception)
    ├── ModelNotFound                            (FileNotFoundError)   the base model file is missing
    ├── InvalidGGUF                              (ValueError)          not a GGUF file, or a corrupt one
    ├── SourceUnavailable                        (ConnectionError)     an hf:// source could not be resolved
    ├── InvalidName                              (ValueError)          a name that would become a path is unsafe
    ├── FileTooLarge                             (ValueError)          a file holds more than edge-rt reads of it
    ├── PeftAdapterError                         (ValueError)          a PEFT directory edge-rt cannot read
    │   ├── AdapterFilesMissing                  (FileNotFoundError)   adapter_config.json / safetensors missing
    │   ├── MalformedAdapter                                           unreadable JSON, corrupt tensors, rank mismatch
    │   └── UnsupportedAdapterFeature            (NotImplementedError) DoRA, biases, modules_to_save, ...
    ├── AdapterNotFound                          (LookupError)         no adapter by that name is known
    ├── BudgetExceeded                           (MemoryError)         an adapter cannot fit the memory budget
    ├── BaseDoesNotFit                           (MemoryError)         the base model alone exceeds the budget
    ├── ContextOverflow                          (ValueError)          the prompt does not fit the context
    ├── InvalidSettings                          (ValueError)          a library setting it does not support
    ├── RuntimeClosed                            (RuntimeError)        the runtime was closed before the call
    ├── LlamaCppError                            (RuntimeError)        llama.cpp refused an operation
    ├── InvalidTransition                        (RuntimeError)        an adapter lifecycle step out of order
    ├── InvalidRequest                           (ValueError)          a request body or parameter is malformed
    ├── Unauthorized                             (PermissionError)     the API key is missing or wrong
    ├── QueueFull                                (RuntimeError)        the request queue is at its bound
    ├── ShuttingDown                             (RuntimeError)        the daemon stopped before serving it
    ├── IncompatibleAdapter                      (ValueError)          the adapter does not fit this base model
    │   └── UnsupportedArchitecture              (NotImplementedError) the base architecture has no name mapping
    ├── InvalidProfile                           (ValueError)          a device profile breaks the schema
    ├── ProfileNotFound                          (LookupError)         no device profile by that name or path
    ├── DiskFull                                 (OSError)             the adapter cache's disk budget or disk is full
    └── DistributionError                                              getting an adapter from a CDN failed
        ├── UntrustedData                        (ValueError)          the CDN's data failed verification
        │   ├── InvalidManifest                                        malformed JSON or schema; names the field
        │   ├── SignatureInvalid                                       unsigned, wrong key, or tampered manifest
        │   ├── RollbackRefused                                        manifest older than one already trusted
        │   ├── ManifestExpired                                        manifest past its expires
        │   ├── IntegrityError                                         blob sha256 differs from the manifest
        │   └── LengthExceeded                                         response longer than allowed
        ├── TransferFailed                       (ConnectionError)     network error, refusal, retries exhausted
        │   ├── SlowRetrieval                    (TimeoutError)        stall, too slow, or past the deadline
        │   └── RemoteNotFound                   (FileNotFoundError)   404 for a listed file
        └── CacheMiss                            (FileNotFoundError)   offline and not cached
"""

from __future__ import annotations

from typing import ClassVar


class EdgeRtError(Exception):
    """Base of every error edge-rt raises on purpose; ``fix`` tells the user what to do next."""

    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1
    error_type: ClassVar[str] = "edge_rt_error"

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}. {fix}")


class ModelNotFound(EdgeRtError, FileNotFoundError):
    """The base model file does not exist (or the embedded default model is not installed)."""

    http_status = 404
    exit_code = 3
    error_type = "model_not_found"

    def __init__(self, message: str, *, path: str | None = None, fix: str | None = None) -> None:
        self.path = path
        super().__init__(message, fix=fix)


class InvalidGGUF(EdgeRtError, ValueError):
    """A file given as GGUF is not one, or cannot be parsed."""

    http_status = 400
    exit_code = 4
    error_type = "invalid_gguf"

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path} is not a readable GGUF file: {reason}",
                         fix="Pass a .gguf file written by llama.cpp's converters or by `edge-rt convert`")


class SourceUnavailable(EdgeRtError, ConnectionError):
    """A remote source (hf://) could not be resolved: offline without a cached copy, not found, or refused."""

    http_status = 502
    exit_code = 5
    error_type = "source_unavailable"

    def __init__(self, source: str, reason: str, *, fix: str | None = None) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"cannot fetch {source}: {reason}", fix=fix)


class InvalidName(EdgeRtError, ValueError):
    """A user-supplied name that would become part of a path or a key does not match the allowed pattern."""

    http_status = 400
    exit_code = 2
    error_type = "invalid_name"

    def __init__(self, name: str, pattern: str) -> None:
        self.name = name
        self.pattern = pattern
        super().__init__(f"invalid name {name!r}",
                         fix=f"Names must match {pattern} (letters, digits, '.', '_', '-'; no paths)")


class FileTooLarge(EdgeRtError, ValueError):
    """A file holds more bytes than edge-rt reads of its kind (reads of files others control are bounded)."""

    http_status = 400
    exit_code = 4
    error_type = "file_too_large"

    def __init__(self, path: str, *, limit_bytes: int) -> None:
        self.path = path
        self.limit_bytes = limit_bytes
        super().__init__(f"{path} holds more than {limit_bytes} bytes", fix="Check that this is the file meant")


class PeftAdapterError(EdgeRtError, ValueError):
    """A PEFT adapter directory that edge-rt cannot convert."""

    http_status = 400
    exit_code = 4
    error_type = "invalid_adapter"


class AdapterFilesMissing(PeftAdapterError, FileNotFoundError):
    """The PEFT directory lacks ``adapter_config.json`` or ``adapter_model.safetensors``."""

    def __init__(self, directory: str, missing: str, *, fix: str) -> None:
        self.directory = directory
        self.missing = missing
        super().__init__(f"{directory}: {missing}", fix=fix)


class MalformedAdapter(PeftAdapterError):
    """The PEFT files exist but their content is unreadable or inconsistent."""

    def __init__(self, path: str, problem: str, *, fix: str | None = None) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}", fix=fix)


class UnsupportedAdapterFeature(PeftAdapterError, NotImplementedError):
    """The adapter uses a PEFT feature whose math a GGUF LoRA cannot express."""

    def __init__(self, feature: str, value: object, *, fix: str) -> None:
        self.feature = feature
        self.value = value
        super().__init__(f"unsupported PEFT feature {feature}={value!r}", fix=fix)


class IncompatibleAdapter(EdgeRtError, ValueError):
    """The adapter was made for a different base model than the one it is being used with."""

    http_status = 409
    exit_code = 6
    error_type = "incompatible_adapter"

    def __init__(self, message: str, *, fix: str = "Convert the adapter with --base set to the model it was "
                                                     "trained on, and serve it with that model") -> None:
        super().__init__(message, fix=fix)


class UnsupportedArchitecture(IncompatibleAdapter, NotImplementedError):
    """The base model's architecture has no known mapping from Hugging Face module names."""

    def __init__(self, architecture: str, supported: tuple[str, ...]) -> None:
        self.architecture = architecture
        self.supported = supported
        super().__init__(f"base architecture {architecture!r} is not supported by the converter",
                         fix=f"Supported architectures: {', '.join(supported)}")


class InvalidProfile(EdgeRtError, ValueError):
    """A device profile (a shipped file or one the user wrote) breaks the schema; ``field`` is its dotted key."""

    http_status = 400
    exit_code = 2
    error_type = "invalid_profile"

    def __init__(self, source: str, field: str | None, problem: str, *, value: object = None,
                 fix: str = "Fix that key; `edge-rt profiles show jetson` prints a complete, valid profile") -> None:
        self.source = source
        self.field = field
        self.value = value  # None when the key is missing (TOML has no null)
        self.problem = problem
        where = source if field is None else f"{source}: {field}" + ("" if value is None else f" = {value!r}")
        super().__init__(f"{where}: {problem}", fix=fix)


class ProfileNotFound(EdgeRtError, LookupError):
    """No shipped device profile has that name or alias, or the profile file given as a path does not exist."""

    http_status = 404
    exit_code = 2
    error_type = "profile_not_found"

    def __init__(self, name: str, available: tuple[str, ...], *, problem: str = "no such device profile") -> None:
        self.name = name
        self.available = available
        super().__init__(f"{name!r}: {problem}",
                         fix=f"Use one of {', '.join(available)}, or a path to a .toml profile file")


class AdapterNotFound(EdgeRtError, LookupError):
    """No adapter by that name is registered (never silently replaced by the base model)."""

    http_status = 404
    exit_code = 3
    error_type = "adapter_not_found"

    def __init__(self, name: str, known: tuple[str, ...] = ()) -> None:
        self.name = name
        self.known = known
        listing = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "") if known else "none"
        super().__init__(f"unknown adapter {name!r}", fix=f"Known adapters: {listing}")


class BudgetExceeded(EdgeRtError, MemoryError):
    """An adapter cannot be made resident within the adapter memory budget, even after evicting what may go."""

    http_status = 507
    exit_code = 7
    error_type = "budget_exceeded"

    def __init__(self, name: str, *, needed_bytes: int, budget_bytes: int, evictable_bytes: int,
                 held_bytes: int) -> None:
        self.name = name
        self.needed_bytes = needed_bytes
        self.budget_bytes = budget_bytes
        self.evictable_bytes = evictable_bytes
        self.held_bytes = held_bytes
        mib = 1 << 20
        super().__init__(
            f"adapter {name!r} needs {needed_bytes / mib:.1f} MiB but the adapter budget is "
            f"{budget_bytes / mib:.1f} MiB with {held_bytes / mib:.1f} MiB held by pinned or in-use adapters",
            fix="Wait for running requests, unpin adapters, use a smaller adapter or a profile with a larger "
                "runtime_budget_mb (see `edge-rt plan`)")


class ContextOverflow(EdgeRtError, ValueError):
    """The prompt leaves no room to generate in the context window."""

    http_status = 400
    exit_code = 2
    error_type = "context_length_exceeded"

    def __init__(self, *, prompt_tokens: int, context_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.context_tokens = context_tokens
        super().__init__(f"the prompt has {prompt_tokens} tokens but the context holds {context_tokens}",
                         fix="Shorten the prompt, or serve with a larger ctx (profile [compute] ctx)")


class InvalidSettings(EdgeRtError, ValueError):
    """A library setting (engine, converter) outside what it supports; ``field`` names the setting."""

    http_status = 500
    exit_code = 2
    error_type = "invalid_settings"

    def __init__(self, field: str, value: object, problem: str,
                 *, fix: str = "Fix the setting (for a daemon: the profile's [compute] table)") -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field} = {value!r}: {problem}", fix=fix)


class RuntimeClosed(EdgeRtError, RuntimeError):
    """The runtime (its engine) was closed; nothing more runs on it."""

    http_status = 503
    exit_code = 1
    error_type = "runtime_closed"

    def __init__(self) -> None:
        super().__init__("the runtime is closed", fix="Create a new Runtime (or restart the daemon)")


class LlamaCppError(EdgeRtError, RuntimeError):
    """llama.cpp refused an operation edge-rt asked of it (a bug or a resource failure, never bad user input)."""

    http_status = 500
    exit_code = 1
    error_type = "llama_cpp_error"

    def __init__(self, operation: str) -> None:
        self.operation = operation
        super().__init__(f"llama.cpp refused to {operation}", fix="See the daemon's log; restart it if this repeats")


class InvalidTransition(EdgeRtError, RuntimeError):
    """An adapter was asked to move between lifecycle states in an order the lifecycle forbids."""

    http_status = 409
    exit_code = 1
    error_type = "invalid_state"

    def __init__(self, name: str, current: str, requested: str) -> None:
        self.name = name
        self.current = current
        self.requested = requested
        super().__init__(f"adapter {name!r} cannot go from {current} to {requested}",
                         fix="Wait until it is no longer in use, or evict it first")


class BaseDoesNotFit(EdgeRtError, MemoryError):
    """The base model with its KV cache and buffers needs more than the profile's runtime budget."""

    http_status = 507
    exit_code = 7
    error_type = "budget_exceeded"

    def __init__(self, *, needed_bytes: int, budget_bytes: int, kv_cache_bytes: int, profile: str) -> None:
        self.needed_bytes = needed_bytes
        self.budget_bytes = budget_bytes
        self.kv_cache_bytes = kv_cache_bytes
        self.profile = profile
        mib = 1 << 20
        super().__init__(
            f"the base model needs {needed_bytes / mib:.1f} MiB (KV cache {kv_cache_bytes / mib:.1f} MiB) but "
            f"profile {profile!r} allows {budget_bytes / mib:.1f} MiB",
            fix="Use a smaller --ctx, a quantised KV cache (kv_type = \"q8_0\"), a smaller model or another profile")


class InvalidRequest(EdgeRtError, ValueError):
    """An HTTP request body or parameter edge-rt cannot serve; ``param`` names it."""

    http_status = 400
    exit_code = 2
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


class Unauthorized(EdgeRtError, PermissionError):
    """The daemon has an API key and the request did not present it."""

    http_status = 401
    exit_code = 2
    error_type = "authentication_error"

    def __init__(self) -> None:
        super().__init__("missing or wrong API key", fix="Send the header `Authorization: Bearer <key>`")


class QueueFull(EdgeRtError, RuntimeError):
    """Too many requests are already waiting; the client should retry after ``retry_after_s`` seconds."""

    http_status = 503
    exit_code = 1
    error_type = "server_overloaded"

    def __init__(self, *, queued: int, limit: int, retry_after_s: int = 1) -> None:
        self.queued = queued
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(f"{queued} requests are already queued (limit {limit})",
                         fix=f"Retry after {retry_after_s} s")


class DiskFull(EdgeRtError, OSError):
    """An adapter does not fit the adapter cache's disk budget or the free disk space, even after eviction."""

    http_status = 507
    exit_code = 7
    error_type = "disk_full"

    def __init__(self, name: str, *, needed_bytes: int, available_bytes: int, limit: str, held_bytes: int = 0) -> None:
        self.name = name
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        self.limit = limit  # "adapter_cache_mb" or "free disk space"
        self.held_bytes = held_bytes
        mib = 1 << 20
        super().__init__(
            f"adapter {name!r} needs {needed_bytes / mib:.1f} MiB but the {limit} leaves {available_bytes / mib:.1f}"
            f" MiB ({held_bytes / mib:.1f} MiB held by pinned, resident or in-use adapters)",
            fix="Raise [storage] adapter_cache_mb (or --cache-mb), free disk space, or unpin adapters")


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
        super().__init__(source, f"invalid manifest: {where}{problem}",
                         fix="Republish the CDN folder with `edge-rt publish`")


class SignatureInvalid(UntrustedData):
    """The manifest is unsigned, signed by another key, or its signature does not match its content."""

    error_type = "signature_invalid"

    def __init__(self, source: str, problem: str, *, keyid: str) -> None:
        self.keyid = keyid
        super().__init__(source, f"manifest signature: {problem} (trusted key {keyid[:16]})",
                         fix="Check --public-key, or republish with `edge-rt publish --key` and the matching key")


class RollbackRefused(UntrustedData):
    """The CDN offers an older manifest than one this device already trusted (a rollback or freeze attack)."""

    error_type = "manifest_rollback"

    def __init__(self, source: str, *, offered_version: int, trusted_version: int, problem: str | None = None) -> None:
        self.offered_version = offered_version
        self.trusted_version = trusted_version
        super().__init__(source, problem or f"manifest version {offered_version} is older than version "
                         f"{trusted_version} already trusted", fix="Publish a new manifest (versions only grow)")


class ManifestExpired(UntrustedData):
    """The manifest's ``expires`` lies before the device's clock (or the newest time it has already seen)."""

    error_type = "manifest_expired"

    def __init__(self, source: str, *, expires: str, now: str) -> None:
        self.expires = expires
        self.now = now
        super().__init__(source, f"manifest expired at {expires} (device time {now})",
                         fix="Republish the CDN folder (`edge-rt publish` renews expires); check the device clock")


class IntegrityError(UntrustedData):
    """A downloaded blob's sha256 differs from the manifest's; it was deleted before anyone could see it."""

    error_type = "integrity_error"

    def __init__(self, source: str, *, expected_sha256: str, actual_sha256: str) -> None:
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256
        super().__init__(source, f"sha256 {actual_sha256[:16]}... differs from the manifest's "
                         f"{expected_sha256[:16]}...",
                         fix="The CDN or the link corrupts data; republish the adapter or try another network")


class LengthExceeded(UntrustedData):
    """A response is longer than the manifest (or the 1 MiB manifest bound) allows; reading stopped at the limit."""

    error_type = "length_exceeded"

    def __init__(self, source: str, *, limit_bytes: int, received_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.received_bytes = received_bytes
        super().__init__(source, f"sent at least {received_bytes} bytes where {limit_bytes} are allowed",
                         fix="The CDN serves a different file than its manifest lists; republish it")


class TransferFailed(DistributionError, ConnectionError):
    """The CDN could not be reached or refused the request (after retries where retrying makes sense)."""

    def __init__(self, url: str, reason: str, *, status: int | None = None, attempts: int = 1,
                 fix: str = "Check the network and the --cdn URL; cached adapters stay usable with --offline") -> None:
        self.url = url
        self.reason = reason
        self.status = status
        self.attempts = attempts
        super().__init__(f"{url}: {reason} (after {attempts} attempt{'s' if attempts != 1 else ''})", fix=fix)


class SlowRetrieval(TransferFailed, TimeoutError):
    """A download stalled, ran below the minimum throughput, or passed its overall deadline."""

    error_type = "slow_retrieval"


class RemoteNotFound(TransferFailed, FileNotFoundError):
    """The CDN answered 404 for a file its manifest lists (or for the manifest itself)."""

    exit_code = 3
    error_type = "remote_not_found"


class CacheMiss(DistributionError, FileNotFoundError):
    """Offline (``--offline``, ``EDGE_RT_OFFLINE`` or ``HF_HUB_OFFLINE``) and the adapter is not in the cache."""

    http_status = 503
    exit_code = 3
    error_type = "cache_miss"

    def __init__(self, name: str, *, cached: tuple[str, ...]) -> None:
        self.name = name
        self.cached = cached
        listing = ", ".join(cached) if cached else "none"
        super().__init__(f"adapter {name!r} is not cached and the device is offline",
                         fix=f"Sync it while online (`edge-rt sync --adapters {name}`); cached adapters: {listing}")


class ShuttingDown(EdgeRtError, RuntimeError):
    """The daemon is stopping: a queued request was dropped before it ran."""

    http_status = 503
    exit_code = 1
    error_type = "server_shutting_down"

    def __init__(self) -> None:
        super().__init__("the daemon is shutting down", fix="Retry against the restarted daemon")
