"""The converter's errors: a PEFT directory it cannot read, or a base architecture it cannot map.

They belong to the tree drawn in ``edge_runtime/errors/__init__.py`` (under ``EdgeRtError`` and
``IncompatibleAdapter``).
"""

from __future__ import annotations

from edge_runtime.errors import EdgeRtError, IncompatibleAdapter

__all__ = [
    "AdapterFilesMissing",
    "MalformedAdapter",
    "PeftAdapterError",
    "UnsupportedAdapterFeature",
    "UnsupportedArchitecture",
]


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


class UnsupportedArchitecture(IncompatibleAdapter, NotImplementedError):
    """The base model's architecture has no known mapping from Hugging Face module names."""

    def __init__(self, architecture: str, supported: tuple[str, ...]) -> None:
        self.architecture = architecture
        self.supported = supported
        super().__init__(
            f"base architecture {architecture!r} is not supported by the converter",
            fix=f"Supported architectures: {', '.join(supported)}",
        )
