"""Converters from Hugging Face PEFT adapters to GGUF LoRA files llama.cpp loads, and LoRA + base → merged model.

Names load on first use: importing this package loads neither safetensors nor numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_runtime.lazy import lazy_attributes

__all__ = [
    "ADAPTER_OUTTYPES",
    "DEFAULT_OUTTYPE",
    "MERGE_OUTTYPES",
    "OUTTYPES",
    "SUPPORTED_ARCHITECTURES",
    "ConversionResult",
    "MergeResult",
    "convert_peft_to_gguf",
    "merge_adapter",
]

if TYPE_CHECKING:  # the names as type checkers see them; at run time _LAZY loads each on first use
    from converters.architectures import SUPPORTED_ARCHITECTURES
    from converters.lora_gguf import DEFAULT_OUTTYPE, OUTTYPES, ConversionResult, convert_peft_to_gguf
    from converters.merge import MergeResult, merge_adapter
    from edge_runtime.gguf.outtypes import ADAPTER_OUTTYPES, MERGE_OUTTYPES

_LAZY = {
    "SUPPORTED_ARCHITECTURES": "architectures",
    "DEFAULT_OUTTYPE": "lora_gguf",
    "OUTTYPES": "lora_gguf",
    "ConversionResult": "lora_gguf",
    "convert_peft_to_gguf": "lora_gguf",
    "MergeResult": "merge",
    "merge_adapter": "merge",
    "MERGE_OUTTYPES": "edge_runtime.gguf.outtypes",
    "ADAPTER_OUTTYPES": "edge_runtime.gguf.outtypes",
}

_load = lazy_attributes(__name__, _LAZY)


def __getattr__(name: str) -> Any:
    return _load(name)
