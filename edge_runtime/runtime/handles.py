"""AdapterHandle: one LoRA adapter in llama.cpp's memory, with what keys its KV (its content) and activates it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_runtime.errors import InvalidTransition


class AdapterHandle:
    """A LoRA adapter loaded into llama.cpp's memory (a ``llama_adapter_lora *``)."""

    def __init__(
        self, pointer: Any, path: Path, content_id: str, invocation: tuple[int, ...] = (), *, float_weights: bool = True
    ) -> None:
        self._pointer: Any = pointer
        self.path = path
        self.content_id = content_id  # its sha256: the KV cache knows adapters by content, never by name
        self.invocation = invocation  # an aLoRA's invocation tokens (it applies from them on); () for a plain LoRA
        self.float_weights = float_weights  # f32/f16/bf16 matrices: decoded one row per llama_decode under llamafile

    @property
    def pointer(self) -> Any:
        """The raw llama.cpp pointer; raises once the adapter has been freed."""
        if self._pointer is None:
            raise InvalidTransition(str(self.path), "freed", "used")
        return self._pointer

    @property
    def freed(self) -> bool:
        """True once ``Engine.free_adapter`` released it."""
        return self._pointer is None


AdapterSet = Sequence[tuple[AdapterHandle, float]]
