"""Typed errors: one class per failure a user can act on.

Every error carries the offending value, the limit it broke and the fix, and declares the HTTP status and the
CLI exit code it maps to. Only the CLI (``cli/common.py``) and the daemon's error answers (``serve/responses.py``,
and the log line of ``serve/middleware.py``) read those two ClassVars.

The tree::

    EdgeRtError                                  (Exception)
    ├── ModelNotFound                            (FileNotFoundError)   the base model file is missing
    ├── InvalidGGUF                              (ValueError)          not a GGUF file, or a corrupt one
    │   └── GGUFNotFound                         (FileNotFoundError)   no such file
    ├── AddressInUse                             (OSError)             the daemon cannot listen on its port
    ├── SourceUnavailable                        (ConnectionError)     an hf:// source could not be resolved
    │   └── InvalidAddress                       (ValueError)          a malformed oci:// address (exit 2)
    ├── InvalidName                              (ValueError)          a name that would become a path is unsafe
    ├── FileTooLarge                             (ValueError)          a file holds more than edge-rt reads of it
    ├── PeftAdapterError  (converters/errors.py) (ValueError)        a PEFT directory edge-rt cannot read
    │   ├── AdapterFilesMissing                  (FileNotFoundError)   adapter_config.json / safetensors missing
    │   ├── MalformedAdapter                                           unreadable JSON, corrupt tensors, rank mismatch
    │   └── UnsupportedAdapterFeature            (NotImplementedError) DoRA, biases, modules_to_save, ...
    ├── AdapterNotFound                          (LookupError)         no adapter by that name is known
    ├── BudgetExceeded                           (MemoryError)         an adapter cannot fit the memory budget
    ├── BaseDoesNotFit                           (MemoryError)         the base model alone exceeds the budget
    ├── AdaptersDoNotFit                         (MemoryError)         listed adapters exceed the adapter budget
    ├── ContextOverflow                          (ValueError)          the prompt does not fit the context
    ├── NothingToPublish                         (ValueError)          a publish would withdraw every adapter
    ├── PublishRefused                           (ValueError)          unsigned over signed, or a renamed file
    ├── InvalidSettings                          (ValueError)          a library setting it does not support
    ├── RuntimeClosed                            (RuntimeError)        the runtime was closed before the call
    ├── LlamaCppError                            (RuntimeError)        llama.cpp refused an operation
    ├── InvalidTransition                        (RuntimeError)        an adapter lifecycle step out of order
    ├── InvalidRequest                           (ValueError)          a request body or parameter is malformed
    │   └── GrammarTooComplex                                          its grammar keeps too many parse states
    ├── GenerationTimeout                        (TimeoutError)        a generation passed its deadline (504)
    ├── DownloadWaitTimeout                      (TimeoutError)        the deadline passed during a download (504)
    ├── BodyTimeout                              (TimeoutError)        the body did not arrive in time (408)
    ├── Forbidden                                (PermissionError)     cross-site or rebound-host request (403)
    ├── Unauthorized                             (PermissionError)     the API key is missing or wrong
    ├── QueueFull                                (RuntimeError)        the request queue is at its bound
    ├── MemoryPressure                           (MemoryError)         RSS over the budget: load is shed (503)
    ├── ShuttingDown                             (RuntimeError)        the daemon stopped before serving it
    ├── CacheBusy                                (TimeoutError)        another process held the cache lock too long
    ├── IncompatibleAdapter                      (ValueError)          the adapter does not fit this base model
    │   └── UnsupportedArchitecture  (converters/errors.py) (NotImplementedError) no name mapping for the base
    ├── InvalidProfile                           (ValueError)          a device profile breaks the schema
    ├── ProfileNotFound                          (LookupError)         no device profile by that name or path
    ├── DiskFull                                 (OSError)             the adapter cache's disk budget or disk is full
    ├── UnsupportedDestination                   (ValueError)          publish --out with a scheme edge-rt lacks
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
        │   ├── RedirectRefused                                        a redirect loop, non-http, or to a private net
        │   ├── RemoteNotFound                   (FileNotFoundError)   404 for a listed file
        │   └── RegistryAuthFailed               (PermissionError)     a registry refused the credentials
        └── CacheMiss                            (FileNotFoundError)   offline and not cached
"""

from __future__ import annotations

from edge_runtime.errors.base import EdgeRtError
from edge_runtime.errors.device import (
    AdapterNotFound,
    AdaptersDoNotFit,
    AddressInUse,
    BaseDoesNotFit,
    BodyTimeout,
    BudgetExceeded,
    CacheBusy,
    ContextOverflow,
    DiskFull,
    DownloadWaitTimeout,
    FileTooLarge,
    Forbidden,
    GenerationTimeout,
    GGUFNotFound,
    GrammarTooComplex,
    IncompatibleAdapter,
    InvalidAddress,
    InvalidGGUF,
    InvalidName,
    InvalidProfile,
    InvalidRequest,
    InvalidSettings,
    InvalidTransition,
    LlamaCppError,
    MemoryPressure,
    ModelNotFound,
    NothingToPublish,
    ProfileNotFound,
    PublishRefused,
    QueueFull,
    RuntimeClosed,
    ShuttingDown,
    SourceUnavailable,
    Unauthorized,
)
from edge_runtime.errors.distribution import (
    CacheMiss,
    DistributionError,
    IntegrityError,
    InvalidManifest,
    LengthExceeded,
    ManifestExpired,
    RedirectRefused,
    RegistryAuthFailed,
    RemoteNotFound,
    RollbackRefused,
    SignatureInvalid,
    SlowRetrieval,
    TransferFailed,
    UnsupportedDestination,
    UntrustedData,
)

__all__ = [
    "AdapterNotFound",
    "AdaptersDoNotFit",
    "AddressInUse",
    "BaseDoesNotFit",
    "BodyTimeout",
    "BudgetExceeded",
    "CacheBusy",
    "CacheMiss",
    "ContextOverflow",
    "DiskFull",
    "DownloadWaitTimeout",
    "DistributionError",
    "EdgeRtError",
    "FileTooLarge",
    "Forbidden",
    "GenerationTimeout",
    "GGUFNotFound",
    "GrammarTooComplex",
    "IncompatibleAdapter",
    "IntegrityError",
    "InvalidGGUF",
    "InvalidManifest",
    "InvalidName",
    "InvalidProfile",
    "InvalidRequest",
    "InvalidSettings",
    "InvalidTransition",
    "LengthExceeded",
    "LlamaCppError",
    "ManifestExpired",
    "MemoryPressure",
    "ModelNotFound",
    "NothingToPublish",
    "ProfileNotFound",
    "PublishRefused",
    "QueueFull",
    "RedirectRefused",
    "RegistryAuthFailed",
    "RemoteNotFound",
    "RollbackRefused",
    "RuntimeClosed",
    "ShuttingDown",
    "SignatureInvalid",
    "SlowRetrieval",
    "SourceUnavailable",
    "InvalidAddress",
    "TransferFailed",
    "Unauthorized",
    "UnsupportedDestination",
    "UntrustedData",
]
