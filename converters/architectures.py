"""What the converter needs from the base GGUF: tensor names and shapes, attention layout, fingerprint.

Names come from gguf's per-architecture map (Hugging Face module path → GGUF tensor name). llama.cpp's HF → GGUF
conversion reorders the rows of q_proj/k_proj for llama-family models (interleaved RoPE); a LoRA's B matrix gets
the same reordering, because permuting the rows of W = B·A is permuting the rows of B.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from converters.errors import UnsupportedArchitecture
from edge_runtime.errors import IncompatibleAdapter, InvalidGGUF
from edge_runtime.gguf import keys
from edge_runtime.gguf.header import GGUFHeader, read_header
from edge_runtime.gguf.info import base_fingerprint

# Architecture name in the GGUF → whether llama.cpp's converter permuted q/k rows.
PERMUTES_QK: dict[str, bool] = {
    "llama": True,
    "qwen2": False,
    "qwen3": False,
    "gemma2": False,
    "gemma3": False,
    "phi3": False,
}
SUPPORTED_ARCHITECTURES = tuple(PERMUTES_QK)
_ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


@dataclass(frozen=True)
class BaseModelLayout:
    """The parts of a base GGUF that decide how a LoRA maps onto it."""

    path: str
    architecture: str
    name: str
    block_count: int
    head_count: int
    head_count_kv: int
    tensor_shapes: dict[str, tuple[int, ...]]  # GGUF order: ne[0] (input features) first
    fingerprint: str
    tensor_map: gguf.TensorNameMap

    def gguf_name(self, module: str) -> str:
        """The GGUF weight tensor adapted by Hugging Face module ``module``, e.g. ``blk.3.attn_q.weight``."""
        for candidate in _module_spellings(module):
            name = self.tensor_map.get_name(f"{candidate}.weight", try_suffixes=(".weight",))
            if name is not None and name in self.tensor_shapes:
                return name
        raise IncompatibleAdapter(
            f"target module {module!r} has no tensor in the base model {self.name!r} ({self.architecture})",
            fix="Remove it from target_modules (the base may tie lm_head to the embeddings), or pass the base "
            "model the adapter was trained on",
        )

    def check_shape(self, module: str, gguf_name: str, lora_a: np.ndarray, lora_b: np.ndarray) -> None:
        """Raise ``IncompatibleAdapter`` unless B·A has the base tensor's shape (wrong base model otherwise)."""
        n_in, n_out = self.tensor_shapes[gguf_name][:2]
        if lora_a.shape[1] != n_in or lora_b.shape[0] != n_out:
            raise IncompatibleAdapter(
                f"module {module!r}: the adapter maps {lora_a.shape[1]} → {lora_b.shape[0]} features but the base "
                f"tensor {gguf_name} maps {n_in} → {n_out}; the adapter was trained for another base model"
            )

    def arrange_lora_b(self, gguf_name: str, lora_b: np.ndarray) -> np.ndarray:
        """``lora_b`` with its rows in the order llama.cpp stores the base tensor's rows."""
        if not PERMUTES_QK[self.architecture]:
            return lora_b
        if gguf_name.endswith("attn_q.weight"):
            return _permute_rows(lora_b, self.head_count)
        if gguf_name.endswith("attn_k.weight"):
            return _permute_rows(lora_b, self.head_count_kv)
        return lora_b


def read_base_layout(path: str) -> BaseModelLayout:
    """Read the base GGUF's header (no tensor data); refuse adapters and unknown architectures."""
    header = read_header(path)
    if header.value(keys.TYPE) == "adapter":
        raise InvalidGGUF(path, "this is a LoRA adapter, not a base model")
    architecture = str(header.value(keys.ARCHITECTURE, ""))
    if architecture not in PERMUTES_QK:
        raise UnsupportedArchitecture(architecture or "<missing>", SUPPORTED_ARCHITECTURES)
    block_count = _int_field(header, f"{architecture}.block_count")
    head_count = _int_field(header, f"{architecture}.attention.head_count")
    kv_key = f"{architecture}.attention.head_count_kv"
    head_count_kv = _int_field(header, kv_key) if kv_key in header.fields else head_count
    return BaseModelLayout(
        path=path,
        architecture=architecture,
        name=str(header.value(keys.NAME, architecture)),
        block_count=block_count,
        head_count=head_count,
        head_count_kv=head_count_kv,
        tensor_shapes={t.name: t.shape for t in header.tensors},
        fingerprint=base_fingerprint(header),
        tensor_map=gguf.get_tensor_name_map(_ARCH_BY_NAME[architecture], block_count),
    )


def _permute_rows(matrix: np.ndarray, n_head: int) -> np.ndarray:
    # Same reordering as llama.cpp's LlamaModel.permute, applied to the output rows only.
    rows = matrix.shape[0]
    return matrix.reshape(n_head, 2, rows // n_head // 2, *matrix.shape[1:]).swapaxes(1, 2).reshape(matrix.shape)


def _module_spellings(module: str) -> list[str]:
    # Multimodal checkpoints nest the text model under `language_model`; llama.cpp names it as the plain model.
    spellings = [module]
    for nested, plain in (
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.", ""),
    ):
        if module.startswith(nested):
            spellings.append(plain + module[len(nested) :])
    return spellings


def _int_field(header: GGUFHeader, key: str) -> int:
    value = header.value(key)
    if value is None:
        raise InvalidGGUF(str(header.path), f"metadata key {key} is missing")
    if isinstance(value, list):
        raise InvalidGGUF(str(header.path), f"{key} varies per layer, which the converter does not support")
    return int(value)
