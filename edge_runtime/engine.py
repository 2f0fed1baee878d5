"""The engine: the one resident base model and its context. The only module that imports llama_cpp.

The base model is memory-mapped once (``Llama(lora_path=...)`` would turn mmap off, so adapters go through the
low-level ``llama_adapter_lora_init`` / ``llama_set_adapters_lora`` / ``llama_adapter_lora_free`` calls).
llama.cpp leaves KV-cache consistency to the caller: ``llama_set_adapters_lora`` never touches the cache and
llama-cpp-python reuses prefixes by tokens alone. The engine therefore keys every evaluated token on the active
adapter set (content digest and scale) and drops the cache whenever that key changes.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from edge_runtime.errors import EdgeRtError, InvalidGGUF

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    """How the base model and its context are set up (from a device profile, or defaults)."""

    n_ctx: int = 2048
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int = 0
    logits_all: bool = False  # keep every position's logits (evaluation only: costs n_ctx × vocab × 4 bytes)
    seed: int = 0


class AdapterHandle:
    """A LoRA adapter loaded into llama.cpp's memory (a ``llama_adapter_lora *``)."""

    def __init__(self, pointer: Any, path: Path, content_id: str) -> None:
        self._pointer: Any = pointer
        self.path = path
        self.content_id = content_id

    @property
    def pointer(self) -> Any:
        """The raw llama.cpp pointer; raises once the adapter has been freed."""
        if self._pointer is None:
            raise EdgeRtError(f"adapter {self.path} was already freed")
        return self._pointer

    @property
    def freed(self) -> bool:
        """True once ``Engine.free_adapter`` released it."""
        return self._pointer is None


ActiveSet = tuple[tuple[AdapterHandle, float], ...]


class Engine:
    """One llama.cpp model and context, with adapters switched in and out without reloading the model."""

    def __init__(self, model_path: Path | str, settings: EngineSettings | None = None) -> None:
        self.settings = settings or EngineSettings()
        self.model_path = Path(model_path)
        n_gpu_layers = self.settings.n_gpu_layers
        if n_gpu_layers and not llama_cpp.llama_supports_gpu_offload():
            log.warning("this llama.cpp build cannot offload to a GPU; running all layers on the CPU")
            n_gpu_layers = 0
        try:
            self._llama = llama_cpp.Llama(
                model_path=str(self.model_path), n_ctx=self.settings.n_ctx, n_batch=self.settings.n_batch,
                n_threads=self.settings.n_threads, n_gpu_layers=n_gpu_layers, use_mmap=True,
                logits_all=self.settings.logits_all, seed=self.settings.seed, verbose=False,
            )
        except ValueError as exc:
            raise InvalidGGUF(str(self.model_path), f"llama.cpp could not load it ({exc})") from exc
        self._active: ActiveSet = ()
        self._active_key: tuple[tuple[str, float], ...] = ()

    # -- adapters -------------------------------------------------------------------------------------------------

    def load_adapter(self, path: Path | str, *, content_id: str) -> AdapterHandle:
        """Load a GGUF LoRA into memory (not yet active); ``content_id`` (its sha256) keys KV-cache reuse."""
        pointer = llama_cpp.llama_adapter_lora_init(self._llama.model, str(path).encode())
        if not pointer:
            raise InvalidGGUF(str(path), "llama.cpp refused the LoRA adapter (see its log for the tensor at fault)")
        return AdapterHandle(pointer, Path(path), content_id)

    def free_adapter(self, handle: AdapterHandle) -> None:
        """Release an adapter's memory, detaching it from the context first (freeing an attached one is a bug)."""
        if handle.freed:
            return
        if any(active is handle for active, _ in self._active):
            self.set_adapters(tuple((h, s) for h, s in self._active if h is not handle))
        llama_cpp.llama_adapter_lora_free(handle.pointer)
        handle._pointer = None

    def set_adapters(self, adapters: Sequence[tuple[AdapterHandle, float]]) -> bool:
        """Make ``adapters`` (handle, scale) the active set; return True when that changed what the model computes."""
        key = tuple((h.content_id, float(s)) for h, s in adapters)
        if key == self._active_key:
            return False
        count = len(adapters)
        pointers = (llama_cpp.llama_adapter_lora_p_ctypes * max(count, 1))(*[h.pointer for h, _ in adapters])
        scales = (ctypes.c_float * max(count, 1))(*[float(s) for _, s in adapters])
        if llama_cpp.llama_set_adapters_lora(self._llama.ctx, pointers if count else None, count,
                                             scales if count else None) != 0:
            raise EdgeRtError("llama.cpp refused the adapter set")
        self._active = tuple(adapters)
        self._active_key = key
        # KV computed under the previous set must never serve this one.
        self._llama.reset()
        return True

    @property
    def active_key(self) -> tuple[tuple[str, float], ...]:
        """The active adapter set as (content id, scale) pairs."""
        return self._active_key

    # -- evaluation -----------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of ``text`` in the base model's vocabulary."""
        return list(self._llama.tokenize(text.encode(), add_bos=add_bos, special=special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens`` (invalid UTF-8 sequences replaced)."""
        return self._llama.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits (n_tokens × vocab, float32) of ``tokens`` evaluated from an empty cache under the active set."""
        if not self.settings.logits_all:
            raise EdgeRtError("logits() needs EngineSettings(logits_all=True)")
        self._llama.reset()
        self._llama.eval(list(tokens))
        return np.array(self._llama.scores[: len(tokens)], dtype=np.float32, copy=True)

    @property
    def n_vocab(self) -> int:
        """Vocabulary size of the base model."""
        return int(self._llama.n_vocab())

    @property
    def n_ctx(self) -> int:
        """Context length in tokens the context was created with."""
        return int(self._llama.n_ctx())

    def close(self) -> None:
        """Free the context and the model (adapters must be freed first by their owner)."""
        self.set_adapters(())
        self._llama.close()
