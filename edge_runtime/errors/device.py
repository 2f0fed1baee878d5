"""Errors of the device side and the daemon: files, names, profiles, budgets, requests."""

from __future__ import annotations

import os

from edge_runtime.errors.base import EdgeRtError

__all__ = [
    "AdapterNotFound",
    "AddressInUse",
    "BaseDoesNotFit",
    "BodyTimeout",
    "BudgetExceeded",
    "CacheBusy",
    "ContextOverflow",
    "DiskFull",
    "DownloadWaitTimeout",
    "FileTooLarge",
    "Forbidden",
    "GGUFNotFound",
    "GenerationTimeout",
    "GrammarTooComplex",
    "IncompatibleAdapter",
    "InvalidGGUF",
    "InvalidName",
    "InvalidProfile",
    "InvalidRequest",
    "InvalidSettings",
    "InvalidTransition",
    "LlamaCppError",
    "ModelNotFound",
    "NothingToPublish",
    "MemoryPressure",
    "ProfileNotFound",
    "PublishRefused",
    "QueueFull",
    "RuntimeClosed",
    "ShuttingDown",
    "SourceUnavailable",
    "Unauthorized",
]


def absolute(path: str) -> str:
    """``path`` as an absolute path for messages (a daemon's or a script's working folder is not the reader's);
    URLs and empty strings unchanged."""
    return path if not path or "://" in path else os.path.abspath(path)


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
        self.path = absolute(path)
        self.reason = reason
        super().__init__(
            f"{self.path} is not a readable GGUF file: {reason}",
            fix="Pass a .gguf file written by llama.cpp's converters or by `edge-rt convert`",
        )


class GGUFNotFound(InvalidGGUF, FileNotFoundError):
    """A file named as GGUF does not exist."""

    http_status = 404
    exit_code = 3
    error_type = "file_not_found"

    def __init__(self, path: str) -> None:
        self.path = absolute(path)
        EdgeRtError.__init__(self, f"{self.path}: no such file", fix="Check the path")
        self.reason = "no such file"


class AddressInUse(EdgeRtError, OSError):
    """The daemon cannot listen on its address: another process has the port, or the address is not this host's."""

    http_status = 500
    exit_code = 10
    error_type = "address_in_use"

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        super().__init__(
            f"cannot listen on {host}:{port}: {reason}",
            fix="Stop what uses the port (`ss -ltnp`), or pass another --port",
        )


class SourceUnavailable(EdgeRtError, ConnectionError):
    """A remote source (hf://) could not be resolved: offline without a cached copy, not found, or refused."""

    http_status = 502
    exit_code = 5
    error_type = "source_unavailable"

    def __init__(self, source: str, reason: str, *, fix: str | None = None) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"cannot fetch {source}: {reason}", fix=fix)


class InvalidAddress(SourceUnavailable, ValueError):
    """An address (``oci://...``) is malformed: a usage mistake, found before anything is fetched or pushed."""

    http_status = 400
    exit_code = 2
    error_type = "invalid_address"

    def __init__(self, source: str, reason: str, *, fix: str | None = None) -> None:
        super().__init__(source, reason, fix=fix)
        EdgeRtError.__init__(self, f"{source} is not a usable address: {reason}", fix=fix)


class InvalidName(EdgeRtError, ValueError):
    """A user-supplied name that would become part of a path or a key does not match the allowed pattern."""

    http_status = 400
    exit_code = 2
    error_type = "invalid_name"

    def __init__(self, name: str, pattern: str) -> None:
        self.name = name
        self.pattern = pattern
        super().__init__(
            f"invalid name {name!r}", fix=f"Names must match {pattern} (letters, digits, '.', '_', '-'; no paths)"
        )


class FileTooLarge(EdgeRtError, ValueError):
    """A file holds more bytes than edge-rt reads of its kind (reads of files others control are bounded)."""

    http_status = 400
    exit_code = 4
    error_type = "file_too_large"

    def __init__(self, path: str, *, limit_bytes: int) -> None:
        self.path = path
        self.limit_bytes = limit_bytes
        super().__init__(f"{path} holds more than {limit_bytes} bytes", fix="Check that this is the file meant")


class IncompatibleAdapter(EdgeRtError, ValueError):
    """The adapter was made for a different base model than the one it is being used with."""

    http_status = 409
    exit_code = 6
    error_type = "incompatible_adapter"

    def __init__(
        self,
        message: str,
        *,
        fix: str = "Convert the adapter with --base set to the model it was trained on, and serve it with that model",
    ) -> None:
        super().__init__(message, fix=fix)


class InvalidProfile(EdgeRtError, ValueError):
    """A device profile (a shipped file or one the user wrote) breaks the schema; ``field`` is its dotted key."""

    http_status = 400
    exit_code = 2
    error_type = "invalid_profile"

    def __init__(
        self,
        source: str,
        field: str | None,
        problem: str,
        *,
        value: object = None,
        fix: str = "Fix that key; `edge-rt profiles show jetson` prints a complete, valid profile",
    ) -> None:
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
        super().__init__(
            f"{name!r}: {problem}", fix=f"Use one of {', '.join(available)}, or a path to a .toml profile file"
        )


class AdapterNotFound(EdgeRtError, LookupError):
    """No adapter by that name is registered (never silently replaced by the base model)."""

    http_status = 404
    exit_code = 3
    error_type = "adapter_not_found"

    def __init__(
        self, name: str, known: tuple[str, ...] = (), *, base: str | None = None, refused: str | None = None
    ) -> None:
        self.name = name
        self.known = known
        self.base = base
        self.refused = refused  # why a file or CDN entry of that name is not served (another base, unreadable...)
        listing = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "") if known else "none"
        also = f"; the base model is {base!r} (or 'base')" if base else ""
        if refused is not None:
            super().__init__(f"adapter {name!r} is not served: {refused}", fix=f"Known adapters: {listing}{also}")
            return
        super().__init__(f"unknown adapter {name!r}", fix=f"Known adapters: {listing}{also}")


class BudgetExceeded(EdgeRtError, MemoryError):
    """An adapter cannot be made resident within the adapter memory budget, even after evicting what may go."""

    http_status = 507
    exit_code = 7
    error_type = "budget_exceeded"

    def __init__(
        self, name: str, *, needed_bytes: int, budget_bytes: int, evictable_bytes: int, held_bytes: int
    ) -> None:
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
            "runtime_budget_mb (see `edge-rt plan`)",
        )


class ContextOverflow(EdgeRtError, ValueError):
    """The prompt leaves no room to generate in the context window."""

    http_status = 400
    exit_code = 2
    error_type = "context_length_exceeded"

    def __init__(self, *, prompt_tokens: int, context_tokens: int, prompt_bytes: int | None = None) -> None:
        self.prompt_tokens = prompt_tokens  # a lower bound when ``prompt_bytes`` is given (it was not tokenized)
        self.context_tokens = context_tokens
        self.prompt_bytes = prompt_bytes
        size = (
            f"{prompt_tokens} tokens"
            if prompt_bytes is None
            else f"{prompt_bytes} bytes (at least {prompt_tokens} tokens)"
        )
        super().__init__(
            f"the prompt has {size} but the context holds {context_tokens}",
            fix="Shorten the prompt, or serve with a larger ctx (profile [compute] ctx)",
        )


class NothingToPublish(EdgeRtError, ValueError):
    """A publish would offer no adapter at all (every device would drop what the CDN offered before)."""

    http_status = 400
    exit_code = 2
    error_type = "nothing_to_publish"

    def __init__(self, source: str, *, withdrawn: int) -> None:
        self.source = source
        self.withdrawn = withdrawn
        super().__init__(
            f"{source} holds no NAME.gguf adapter: publishing it would withdraw all {withdrawn} adapters "
            "the CDN offers now",
            fix="Check the folder, or pass --allow-empty to withdraw everything",
        )


class PublishRefused(EdgeRtError, ValueError):
    """A publish that would mislead devices: an unsigned manifest over a signed one (every pinned device would refuse
    all updates), or a file whose adapter name inside differs from its file name."""

    http_status = 400
    exit_code = 2
    error_type = "publish_refused"

    def __init__(self, target: str, reason: str, *, fix: str) -> None:
        self.target = target
        self.reason = reason
        super().__init__(f"not publishing {target}: {reason}", fix=fix)


class InvalidSettings(EdgeRtError, ValueError):
    """A library setting (engine, converter) outside what it supports; ``field`` names the setting."""

    http_status = 500
    exit_code = 2
    error_type = "invalid_settings"

    def __init__(
        self,
        field: str,
        value: object,
        problem: str,
        *,
        fix: str = "Fix the setting (for a daemon: the profile's [compute] table)",
    ) -> None:
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

    def __init__(
        self,
        name: str,
        current: str,
        requested: str,
        *,
        fix: str = "Wait until it is no longer in use, or evict it first",
    ) -> None:
        self.name = name
        self.current = current
        self.requested = requested
        super().__init__(f"adapter {name!r} cannot go from {current} to {requested}", fix=fix)


class BaseDoesNotFit(EdgeRtError, MemoryError):
    """The base model with its KV cache and buffers needs more than the profile's runtime budget."""

    http_status = 507
    exit_code = 7
    error_type = "budget_exceeded"

    def __init__(
        self, *, needed_bytes: int, budget_bytes: int, kv_cache_bytes: int, profile: str, parallel: int = 1
    ) -> None:
        self.needed_bytes = needed_bytes
        self.budget_bytes = budget_bytes
        self.kv_cache_bytes = kv_cache_bytes
        self.profile = profile
        self.parallel = parallel
        mib = 1 << 20
        sequences = f" for {parallel} sequences" if parallel > 1 else ""
        fewer = "fewer --parallel sequences (each holds a whole context of KV cache), " if parallel > 1 else ""
        super().__init__(
            f"the base model with its process, KV cache, buffers and request buffers needs {needed_bytes / mib:.1f} "
            f"MiB (KV cache {kv_cache_bytes / mib:.1f} MiB{sequences}) but profile {profile!r} allows "
            f"{budget_bytes / mib:.1f} MiB",
            fix=f'Use {fewer}a smaller --ctx, a quantised KV cache (kv_type = "q8_0"), smaller request limits '
            "(--max-body-kb, --max-queue, --max-connections), a smaller model or another profile",
        )


class AdaptersDoNotFit(EdgeRtError, MemoryError):
    """Adapters listed to be resident together need more than the adapter budget a profile leaves (``edge-rt plan``)."""

    http_status = 507
    exit_code = 7
    error_type = "budget_exceeded"

    def __init__(self, *, count: int, needed_bytes: int, budget_bytes: int, profile: str) -> None:
        self.count = count
        self.needed_bytes = needed_bytes
        self.budget_bytes = budget_bytes
        self.profile = profile
        mib = 1 << 20
        super().__init__(
            f"the {count} listed adapters need {needed_bytes / mib:.1f} MiB resident together but profile {profile!r} "
            f"leaves {budget_bytes / mib:.1f} MiB for adapters",
            fix="Serve fewer at once (the daemon evicts the least recently used), lower their rank, or use a smaller "
            "--ctx or a profile with a larger runtime_budget_mb",
        )


class InvalidRequest(EdgeRtError, ValueError):
    """An HTTP request body or parameter edge-rt cannot serve; ``param`` names it."""

    http_status = 400
    exit_code = 2
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


class GrammarTooComplex(InvalidRequest):
    """A response format whose grammar would make llama.cpp's sampler keep too many parse stacks (each one is a pass
    over the vocabulary on every token): an ambiguous schema such as nested ``anyOf`` branches that start alike."""

    def __init__(self, *, stacks: int, limit: int) -> None:
        self.stacks = stacks
        self.limit = limit
        super().__init__(
            f"response_format's grammar reaches {stacks} parse states at once (at most {limit} for this "
            "model's vocabulary); make anyOf/oneOf branches start differently, or use fewer enum values "
            "sharing a prefix",
            param="response_format",
        )


class GenerationTimeout(EdgeRtError, TimeoutError):
    """A generation ran past its request's deadline; the engine stopped it inside the token it was computing."""

    http_status = 504
    exit_code = 1
    error_type = "timeout"

    def __init__(self, *, deadline_s: float, completion_tokens: int) -> None:
        self.deadline_s = deadline_s  # time.monotonic() seconds
        self.completion_tokens = completion_tokens
        super().__init__(
            f"the generation passed its deadline (the daemon's --request-timeout) after {completion_tokens} tokens",
            fix="Ask for fewer tokens, use a simpler response_format, or raise the request timeout",
        )


class DownloadWaitTimeout(EdgeRtError, TimeoutError):
    """A request's deadline passed while the adapters it asked for were still downloading (the downloads go on)."""

    http_status = 504
    exit_code = 1
    error_type = "timeout"

    def __init__(self, *, adapters: list[str], timeout_s: float) -> None:
        self.adapters = adapters
        self.timeout_s = timeout_s
        super().__init__(
            f"the request passed its deadline (the daemon's --request-timeout, {timeout_s:g} s) while adapter "
            f"{', '.join(adapters)} was still downloading; the download goes on",
            fix="Retry once the adapter is cached (GET /v1/adapters shows its state), or raise --request-timeout",
        )


class BodyTimeout(EdgeRtError, TimeoutError):
    """A client sent its headers, then not its whole body within the read timeout (the connection is closed)."""

    http_status = 408
    exit_code = 1
    error_type = "request_timeout"

    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(
            f"the request body did not arrive within {timeout_s:g} s",
            fix="Send the whole body at once; the connection was closed",
        )


class Forbidden(EdgeRtError, PermissionError):
    """A request a browser was tricked into sending: another site's origin, or a host name that is not this one."""

    http_status = 403
    exit_code = 2
    error_type = "forbidden"

    def __init__(self, reason: str) -> None:
        super().__init__(reason, fix="Call the daemon from a program, or from its own status page")


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

    def __init__(
        self,
        *,
        queued: int,
        limit: int,
        retry_after_s: int = 1,
        waited_s: float | None = None,
        grammar_bytes: int | None = None,
        grammar_limit: int | None = None,
    ) -> None:
        self.queued = queued
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.waited_s = waited_s
        self.grammar_bytes = grammar_bytes
        message = (
            f"{queued} requests are already queued (limit {limit})"
            if waited_s is None
            else f"the request waited {waited_s:g} s for its body to be read while others were read ({queued} waiting)"
        )
        if grammar_bytes is not None:
            message = (
                f"queued requests already hold {grammar_bytes} bytes of response_format grammars (limit "
                f"{grammar_limit})"
            )
        super().__init__(message, fix=f"Retry after {retry_after_s} s")


class MemoryPressure(EdgeRtError, MemoryError):
    """The daemon's measured RSS is over its runtime budget: new completions wait ``retry_after_s`` seconds."""

    http_status = 503
    exit_code = 1
    error_type = "server_overloaded"

    def __init__(self, *, rss_bytes: int, budget_bytes: int, retry_after_s: int = 1) -> None:
        self.rss_bytes = rss_bytes
        self.budget_bytes = budget_bytes
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the daemon uses {rss_bytes / 2**20:.1f} MiB, over its runtime budget of {budget_bytes / 2**20:.1f} MiB",
            fix=f"Retry after {retry_after_s} s",
        )


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
            fix="Raise [storage] adapter_cache_mb (or --cache-mb), free disk space, or unpin adapters",
        )


class CacheBusy(EdgeRtError, TimeoutError):
    """Another process held the adapter cache's lock for longer than the wait allows, or the wait was interrupted by
    a shutdown; ``holder_pid`` is the process the lock file names (None when it names none)."""

    http_status = 503
    exit_code = 1
    error_type = "cache_busy"

    def __init__(self, lock: str, *, holder_pid: int | None, waited_s: float, interrupted: bool = False) -> None:
        self.lock = lock
        self.holder_pid = holder_pid
        self.waited_s = waited_s
        self.interrupted = interrupted
        holder = f"process {holder_pid}" if holder_pid is not None else "another process"
        why = "the wait was interrupted (shutting down)" if interrupted else f"waited {waited_s:g} s"
        super().__init__(
            f"{holder} holds the cache lock {lock}: {why}",
            fix=f"If {holder} is stopped (Ctrl-Z), resume or end it"
            f"{f' (kill -CONT {holder_pid} / kill {holder_pid})' if holder_pid else ''}, then retry; "
            "EDGE_RT_CACHE_LOCK_TIMEOUT_S sets the wait",
        )


class ShuttingDown(EdgeRtError, RuntimeError):
    """The daemon is stopping: a queued request was dropped before it ran."""

    http_status = 503
    exit_code = 1
    error_type = "server_shutting_down"

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail  # what the request was waiting for when the shutdown came (a download...)
        super().__init__(
            "the daemon is shutting down" + (f": {detail}" if detail else ""), fix="Retry against the restarted daemon"
        )
