"""Converters from Hugging Face PEFT adapters to GGUF LoRA files llama.cpp loads."""

from converters.architectures import SUPPORTED_ARCHITECTURES
from converters.lora_gguf import DEFAULT_OUTTYPE, OUTTYPES, ConversionResult, convert_peft_to_gguf

__all__ = ["DEFAULT_OUTTYPE", "OUTTYPES", "SUPPORTED_ARCHITECTURES", "ConversionResult", "convert_peft_to_gguf"]
