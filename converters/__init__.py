"""Converters from Hugging Face PEFT adapters to GGUF LoRA files llama.cpp loads, and LoRA + base → merged model.

Names load on first use: importing this package loads neither safetensors nor numpy.
"""

from __future__ import annotations

from typing import Any

from edge_runtime.lazy import lazy_attributes

__all__ = ["ADAPTER_OUTTYPES", "DEFAULT_OUTTYPE", "MERGE_OUTTYPES", "OUTTYPES", "SUPPORTED_ARCHITECTURES",
           "ConversionResult", "MergeResult", "convert_peft_to_gguf", "merge_adapter"]

_LAZY = {"SUPPORTED_ARCHITECTURES": "architectures", "DEFAULT_OUTTYPE": "lora_gguf", "OUTTYPES": "weight_types",
         "ConversionResult": "lora_gguf", "convert_peft_to_gguf": "lora_gguf", "MergeResult": "merge",
         "merge_adapter": "merge", "MERGE_OUTTYPES": "weight_types", "ADAPTER_OUTTYPES": "lora_gguf"}

_load = lazy_attributes(__name__, {name: f".{module}" for name, module in _LAZY.items()})


def __getattr__(name: str) -> Any:
    return _load(name)
