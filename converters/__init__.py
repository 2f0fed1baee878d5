"""Converters from Hugging Face PEFT adapters to GGUF LoRA files llama.cpp loads, and LoRA + base → merged model."""

from converters.architectures import SUPPORTED_ARCHITECTURES
from converters.lora_gguf import DEFAULT_OUTTYPE, OUTTYPES, ConversionResult, convert_peft_to_gguf
from converters.merge import MergeResult, merge_adapter
from converters.weight_types import MERGE_OUTTYPES

__all__ = ["DEFAULT_OUTTYPE", "MERGE_OUTTYPES", "OUTTYPES", "SUPPORTED_ARCHITECTURES", "ConversionResult",
           "MergeResult", "convert_peft_to_gguf", "merge_adapter"]
