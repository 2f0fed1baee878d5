"""A base model's tokenizer for converters: llama.cpp reads the GGUF's vocabulary alone (no weights, no context).

Used for the older aLoRA configs that give their invocation as a string: its tokens in the base's vocabulary are
what llama.cpp compares the prompt against.
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp
from llama_cpp._utils import suppress_stdout_stderr

from edge_runtime.errors import InvalidGGUF

__all__ = ["vocabulary_tokens"]


def vocabulary_tokens(model_path: Path | str, text: str) -> list[int]:
    """Token ids of ``text`` in ``model_path``'s vocabulary as a Hugging Face tokenizer's ``encode(text,
    add_special_tokens=False)`` gives them: no BOS, and control-token markers such as ``<|im_start|>`` parsed.

    Loads the vocabulary only (no weights, no context: milliseconds), for a converter tokenizing for a base model.
    """
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with suppress_stdout_stderr(disable=False):
        model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
    if not model:
        raise InvalidGGUF(str(model_path), "llama.cpp could not load its vocabulary")
    try:
        data = text.encode()
        buffer = (llama_cpp.llama_token * (len(data) + 2))()
        count = llama_cpp.llama_tokenize(
            llama_cpp.llama_model_get_vocab(model), data, len(data), buffer, len(buffer), False, True
        )
        return [int(token) for token in buffer[:count]]
    finally:
        llama_cpp.llama_model_free(model)
