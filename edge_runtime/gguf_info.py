"""Facts read from GGUF files: what a file is, the base-model fingerprint, and edge-rt's adapter metadata keys.

The fingerprint identifies a base model's lineage (architecture, hyper-parameters, vocabulary, tensor names and
shapes, and the model's base name/fine-tune/size labels) and deliberately ignores quantisation: a LoRA trained on
a model applies to every quantisation of it. It reads metadata only, so it costs milliseconds on multi-GB files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edge_runtime.errors import InvalidGGUF

KEY_FORMAT = "edge_rt.format_version"
KEY_ADAPTER_NAME = "edge_rt.adapter.name"
KEY_BASE_FINGERPRINT = "edge_rt.base.fingerprint"
KEY_BASE_NAME = "edge_rt.base.name"
KEY_PEFT_CONFIG_SHA256 = "edge_rt.peft.config_sha256"
FORMAT_VERSION = 1

_FINGERPRINT_GENERAL_KEYS = ("general.architecture", "general.basename", "general.finetune", "general.size_label",
                             "general.version")
_FINGERPRINT_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens")


@dataclass(frozen=True)
class TensorSummary:
    """One tensor's name, GGML type name and dimensions in GGUF order (ne[0] first)."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    n_bytes: int


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
    tensors: tuple[TensorSummary, ...] = field(repr=False)
    fingerprint: str | None  # a base model's own fingerprint; None for adapters

    @property
    def is_adapter(self) -> bool:
        """True for LoRA adapter files."""
        return self.kind == "adapter"

    @property
    def lora_ranks(self) -> tuple[int, ...]:
        """Distinct LoRA ranks of an adapter's tensors (ne[1] of each lora_a)."""
        return tuple(sorted({t.shape[1] for t in self.tensors if t.name.endswith(".lora_a")}))

    @property
    def lora_alpha(self) -> float | None:
        """``adapter.lora.alpha`` of an adapter file."""
        value = self.metadata.get(gguf.Keys.Adapter.LORA_ALPHA)
        return None if value is None else float(value)

    @property
    def base_fingerprint(self) -> str | None:
        """For an adapter: the fingerprint of the base model it was converted against."""
        value = self.metadata.get(KEY_BASE_FINGERPRINT)
        return None if value is None else str(value)

    @property
    def context_length(self) -> int | None:
        """The model's trained context length in tokens."""
        value = self.metadata.get(f"{self.architecture}.context_length")
        return None if value is None else int(value)

    @property
    def quantization(self) -> str | None:
        """The base model's ``general.file_type`` as a name such as ``MOSTLY_Q4_1``."""
        value = self.metadata.get("general.file_type")
        if value is None:
            return None
        try:
            return gguf.LlamaFileType(int(value)).name
        except ValueError:
            return f"file_type {value}"


def open_reader(path: Path | str) -> gguf.GGUFReader:
    """Open ``path`` with gguf's memory-mapped reader; raise ``InvalidGGUF`` when it is not a GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidGGUF(str(path), "no such file")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise InvalidGGUF(str(path), "the file does not start with the GGUF magic bytes")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, KeyError) as exc:
        raise InvalidGGUF(str(path), f"truncated or corrupt ({exc})") from exc


def field_value(reader_field: gguf.ReaderField) -> Any:
    """The Python value of one GGUF metadata field (str, int, float, bool or list)."""
    return reader_field.contents()


def read_metadata(reader: gguf.GGUFReader, *, skip_large_arrays: bool = True) -> dict[str, Any]:
    """All metadata fields as Python values; arrays over 64 entries become a ``<array of N>`` note by default."""
    result: dict[str, Any] = {}
    for key, reader_field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if skip_large_arrays and reader_field.types and reader_field.types[0] == gguf.GGUFValueType.ARRAY \
                and len(reader_field.data) > 64:
            result[key] = f"<array of {len(reader_field.data)}>"
            continue
        result[key] = field_value(reader_field)
    return result


def base_fingerprint(reader: gguf.GGUFReader) -> str:
    """sha256 (hex) of a base model's identity: lineage labels, hyper-parameters, vocabulary, tensor shapes."""
    arch = str(field_value(reader.fields["general.architecture"]))
    digest = hashlib.sha256(b"edge-rt base fingerprint v1\n")
    keys = [k for k in reader.fields if k in _FINGERPRINT_GENERAL_KEYS or k in _FINGERPRINT_TOKENIZER_KEYS
            or k.startswith(f"{arch}.")]
    for key in sorted(keys):
        reader_field = reader.fields[key]
        digest.update(key.encode() + b"\0" + bytes(str([int(t) for t in reader_field.types]), "ascii"))
        for index in reader_field.data:
            digest.update(np.ascontiguousarray(reader_field.parts[index]).tobytes())
    for tensor in sorted(reader.tensors, key=lambda t: t.name):
        digest.update(f"{tensor.name}:{','.join(str(int(d)) for d in tensor.shape)}\n".encode())
    return digest.hexdigest()


def read_info(path: Path | str) -> GGUFInfo:
    """Read what ``inspect`` shows about ``path``: kind, architecture, tensors, sizes and identity."""
    path = Path(path)
    reader = open_reader(path)
    metadata = read_metadata(reader)
    architecture = str(metadata.get("general.architecture", ""))
    if not architecture:
        raise InvalidGGUF(str(path), "general.architecture is missing")
    kind = "adapter" if metadata.get("general.type") == "adapter" else "model"
    tensors = tuple(TensorSummary(name=t.name, type_name=t.tensor_type.name,
                                  shape=tuple(int(d) for d in t.shape), n_bytes=int(t.n_bytes))
                    for t in reader.tensors)
    return GGUFInfo(
        path=path, size_bytes=path.stat().st_size, kind=kind, architecture=architecture,
        name=str(metadata.get(KEY_ADAPTER_NAME) or metadata.get("general.name") or path.stem),
        tensor_count=len(tensors), tensor_bytes=sum(t.n_bytes for t in tensors),
        parameter_count=sum(int(t.n_elements) for t in reader.tensors),
        metadata=metadata, tensors=tensors,
        fingerprint=None if kind == "adapter" else base_fingerprint(reader),
    )
