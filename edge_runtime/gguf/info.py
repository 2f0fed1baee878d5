"""Facts read from GGUF files: what a file is and the base-model fingerprint (the keys are in ``keys.py``).

The fingerprint identifies a base model's lineage (architecture, hyper-parameters, vocabulary, tensor names and
shapes, and the model's base name/fine-tune/size labels) and deliberately ignores quantisation: a LoRA trained on
a model applies to every quantisation of it. It reads the header only, so it costs milliseconds on multi-GB files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edge_runtime.errors import InvalidGGUF
from edge_runtime.gguf import keys
from edge_runtime.gguf.header import GGUFHeader, HeaderTensor, read_header

FORMAT_VERSION = 1  # of edge-rt's adapter metadata (keys.FORMAT)

_FINGERPRINT_GENERAL_KEYS = (keys.ARCHITECTURE, keys.BASENAME, keys.FINETUNE, keys.SIZE_LABEL, keys.VERSION)
_FINGERPRINT_TOKENIZER_KEYS = (keys.TOKENIZER_MODEL, keys.TOKENS)


@dataclass(frozen=True)
class GGUFInfo:
    """What ``inspect`` reports about a GGUF file (a base model or a LoRA adapter)."""

    path: Path
    size_bytes: int
    kind: str  # "adapter" or "model"
    architecture: str
    name: str
    tensor_count: int
    tensor_bytes: int
    parameter_count: int
    metadata: dict[str, Any] = field(repr=False)
    tensors: tuple[HeaderTensor, ...] = field(repr=False)
    fingerprint: str | None  # a base model's own fingerprint; None for adapters
    invocation_tokens: tuple[int, ...] = ()  # an aLoRA's invocation sequence; () for a plain LoRA or a model

    @property
    def is_adapter(self) -> bool:
        """True for LoRA adapter files."""
        return self.kind == "adapter"

    @property
    def lora_ranks(self) -> tuple[int, ...]:
        """Distinct LoRA ranks of an adapter's tensors (ne[1] of each lora_a)."""
        return tuple(sorted({t.shape[1] for t in self.tensors if t.name.endswith(".lora_a")}))

    @property
    def tensor_types(self) -> tuple[str, ...]:
        """Distinct GGML type names of the tensors, e.g. ``("F16", "Q8_0")``."""
        return tuple(sorted({t.ggml_type.name for t in self.tensors}))

    @property
    def lora_alpha(self) -> float | None:
        """``adapter.lora.alpha`` of an adapter file."""
        value = self.metadata.get(gguf.Keys.Adapter.LORA_ALPHA)
        return None if value is None else float(value)

    @property
    def base_fingerprint(self) -> str | None:
        """For an adapter: the fingerprint of the base model it was converted against."""
        value = self.metadata.get(keys.BASE_FINGERPRINT)
        return None if value is None else str(value)

    @property
    def merged_from(self) -> dict[str, Any]:
        """For a model made by ``edge-rt merge``: its ``edge_rt.merge.*`` keys without the prefix; else empty."""
        return {
            key.removeprefix(keys.MERGE_PREFIX): value
            for key, value in self.metadata.items()
            if key.startswith(keys.MERGE_PREFIX)
        }

    @property
    def context_length(self) -> int | None:
        """The model's trained context length in tokens."""
        value = self.metadata.get(keys.CONTEXT_LENGTH.format(arch=self.architecture))
        return None if value is None else int(value)

    @property
    def quantization(self) -> str | None:
        """The base model's ``general.file_type`` as a name such as ``MOSTLY_Q4_1``."""
        value = self.metadata.get(keys.FILE_TYPE)
        if value is None:
            return None
        try:
            return gguf.LlamaFileType(int(value)).name
        except ValueError:
            return f"file_type {value}"


def read_metadata(header: GGUFHeader) -> dict[str, Any]:
    """All metadata values; arrays too long to decode become a ``<array of N>`` note."""
    return {key: f"<array of {f.count}>" if f.value is None else f.value for key, f in header.fields.items()}


def base_fingerprint(header: GGUFHeader) -> str:
    """sha256 (hex) of a base model's identity: lineage labels, hyper-parameters, vocabulary, tensor shapes."""
    arch = str(header.value(keys.ARCHITECTURE, ""))
    if not arch:
        raise InvalidGGUF(str(header.path), "general.architecture is missing")
    digest = hashlib.sha256(b"edge-rt base fingerprint v1\n")
    identity = [
        k
        for k in header.fields
        if k in _FINGERPRINT_GENERAL_KEYS or k in _FINGERPRINT_TOKENIZER_KEYS or k.startswith(f"{arch}.")
    ]
    for key in sorted(identity):
        item = header.fields[key]
        digest.update(f"{key}:{int(item.value_type)}:{len(item.raw)}\n".encode())
        digest.update(item.raw)
    for tensor in sorted(header.tensors, key=lambda t: t.name):
        digest.update(f"{tensor.name}:{','.join(map(str, tensor.shape))}\n".encode())
    return digest.hexdigest()


def read_info(path: Path | str) -> GGUFInfo:
    """Read what ``inspect`` shows about ``path``: kind, architecture, tensors, sizes and identity."""
    path = Path(path)
    header = read_header(path)
    metadata = read_metadata(header)
    architecture = str(metadata.get(keys.ARCHITECTURE, ""))
    if not architecture:
        raise InvalidGGUF(str(path), "general.architecture is missing")
    kind = "adapter" if metadata.get(keys.TYPE) == "adapter" else "model"
    return GGUFInfo(
        path=path,
        size_bytes=path.stat().st_size,
        kind=kind,
        architecture=architecture,
        name=str(metadata.get(keys.ADAPTER_NAME) or metadata.get(keys.NAME) or path.stem),
        tensor_count=len(header.tensors),
        tensor_bytes=sum(t.n_bytes for t in header.tensors),
        parameter_count=sum(t.n_elements for t in header.tensors),
        metadata=metadata,
        tensors=header.tensors,
        fingerprint=None if kind == "adapter" else base_fingerprint(header),
        invocation_tokens=invocation_tokens(header),
    )


MAX_INVOCATION_TOKENS = 8192  # longer than any context edge-rt serves; real invocations are a few tokens
INVOCATION_TOKEN_BYTES = 48  # memory per invocation token once loaded: llama.cpp's copy and the handle's Python tuple


def check_invocation_length(source: str, count: int, limit: int = MAX_INVOCATION_TOKENS) -> None:
    """Raise ``InvalidGGUF`` for an aLoRA invocation of more than ``limit`` tokens: no prompt can contain it, and a
    16M-token one cost 180 MiB of RSS that no budget counted."""
    if count > limit:
        raise InvalidGGUF(
            source, f"its aLoRA invocation is {count} tokens long (at most {limit}: a prompt must be able to hold it)"
        )


def invocation_tokens(header: GGUFHeader) -> tuple[int, ...]:
    """An aLoRA's ``adapter.alora.invocation_tokens`` (at most ``MAX_INVOCATION_TOKENS``); () when absent."""
    found = header.fields.get(keys.ALORA_INVOCATION_TOKENS)
    if found is None:
        return ()
    if found.value_type != gguf.GGUFValueType.ARRAY or found.item_type != gguf.GGUFValueType.UINT32:
        raise InvalidGGUF(str(header.path), f"{keys.ALORA_INVOCATION_TOKENS} is not an array of uint32")
    check_invocation_length(str(header.path), found.count)
    if found.value is not None:
        return tuple(int(token) for token in found.value)
    return tuple(int(token) for token in np.frombuffer(found.raw, dtype="<u4", offset=12))  # after type and count
