"""What a generation asks for and what ran: adapters by name and scale, checked once where a request is parsed.

Plain data, no llama.cpp: the daemon's request parser builds these without loading the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.names import validate_name

__all__ = ["MAX_COMPOSED_ADAPTERS", "AdapterRequest", "AppliedAdapter"]

MAX_COMPOSED_ADAPTERS = 4  # adapters one generation may compose


@dataclass(frozen=True)
class AdapterRequest:
    """One adapter a generation asks for: its name (checked here, once, where a request is parsed) and the scale
    its update is applied at."""

    name: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        validate_name(self.name)


@dataclass(frozen=True)
class AppliedAdapter:
    """What actually ran: an adapter's name, content digest and scale; ``inert`` for an aLoRA whose invocation the
    prompt lacks (it changed nothing: the answer is the base model's)."""

    name: str
    sha256: str
    scale: float
    inert: bool = False
