"""The tensor types edge-rt writes, by the names users pass as ``--outtype`` (gguf-py's GGMLQuantizationType
names, lower-cased). Names only, so the CLI lists them without loading the converters."""

from __future__ import annotations

__all__ = ["ADAPTER_OUTTYPES", "AUTO", "BASE", "DEFAULT_ADAPTER_OUTTYPE", "MERGE_OUTTYPES", "TENSOR_OUTTYPES"]

ADAPTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # what `convert` writes a LoRA's A and B in
DEFAULT_ADAPTER_OUTTYPE = "f16"
TENSOR_OUTTYPES = (*ADAPTER_OUTTYPES, "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0")  # a merged tensor's
AUTO = "auto"  # per tensor: the most compact type that keeps the adapter's change (merge --outtype auto)
BASE = "base"  # per tensor: the base tensor's own type
MERGE_OUTTYPES = (AUTO, BASE, *TENSOR_OUTTYPES)
