"""Every GGUF metadata key edge-rt reads or writes, in one namespace: gguf-py's own ``Keys`` where it defines
them, and edge-rt's ``edge_rt.*`` keys beside them."""

from __future__ import annotations

from gguf import Keys

# Defined by GGUF (gguf-py's constants).
ALIGNMENT = Keys.General.ALIGNMENT  # general.alignment
ARCHITECTURE = Keys.General.ARCHITECTURE  # general.architecture
TYPE = Keys.General.TYPE  # general.type: "model" or "adapter"
NAME = Keys.General.NAME  # general.name
BASENAME = Keys.General.BASENAME  # general.basename
FINETUNE = Keys.General.FINETUNE  # general.finetune
SIZE_LABEL = Keys.General.SIZE_LABEL  # general.size_label
VERSION = Keys.General.VERSION  # general.version
DESCRIPTION = Keys.General.DESCRIPTION  # general.description
FILE_TYPE = Keys.General.FILE_TYPE  # general.file_type
CONTEXT_LENGTH = Keys.LLM.CONTEXT_LENGTH  # {arch}.context_length
ADAPTER_TYPE = Keys.Adapter.TYPE  # adapter.type: "lora"
ADAPTER_LORA_ALPHA = Keys.Adapter.LORA_ALPHA  # adapter.lora.alpha
ALORA_INVOCATION_TOKENS = Keys.Adapter.ALORA_INVOCATION_TOKENS  # uint32 array: an activated LoRA
TOKENS = Keys.Tokenizer.LIST  # tokenizer.ggml.tokens
MERGES = Keys.Tokenizer.MERGES  # tokenizer.ggml.merges
TOKENIZER_MODEL = Keys.Tokenizer.MODEL  # tokenizer.ggml.model
CHAT_TEMPLATE = Keys.Tokenizer.CHAT_TEMPLATE  # tokenizer.chat_template

# edge-rt's own: what an adapter was converted for, and what a merged model was made from.
FORMAT = "edge_rt.format_version"
ADAPTER_NAME = "edge_rt.adapter.name"
BASE_FINGERPRINT = "edge_rt.base.fingerprint"
BASE_NAME = "edge_rt.base.name"
PEFT_CONFIG_SHA256 = "edge_rt.peft.config_sha256"
MERGE_PREFIX = "edge_rt.merge."
MERGE_ADAPTER_NAME = "edge_rt.merge.adapter_name"
MERGE_ADAPTER_SHA256 = "edge_rt.merge.adapter_sha256"
MERGE_BASE_FINGERPRINT = "edge_rt.merge.base_fingerprint"
MERGE_BASE_NAME = "edge_rt.merge.base_name"
MERGE_SCALE = "edge_rt.merge.scale"
MERGE_OUTTYPE = "edge_rt.merge.outtype"
