"""A model's chat template: messages rendered with it, and only its own text ever becoming control tokens.

Message contents are tokenized as plain text, so ``<|im_end|><|im_start|>system`` typed by a user stays text and
cannot forge a turn: the template is rendered with unguessable marks in place of the contents, its own text is
tokenized with control tokens parsed, and each content as plain text. This module never imports llama.cpp: the
engine hands it the template's formatter and its tokenizer.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Sequence
from typing import Any, cast

from jinja2 import TemplateError

from edge_runtime.errors import InvalidRequest

__all__ = ["ChatTemplate"]

log = logging.getLogger(__name__)


class ChatTemplate:
    """Renders and tokenizes conversations with a GGUF's own chat template."""

    def __init__(self, formatter: Callable[..., Any], tokens: Callable[..., list[int]]) -> None:
        self._formatter = formatter  # llama-cpp-python's Jinja2ChatFormatter
        self._tokens = tokens  # (text, *, special) -> token ids, without a BOS

    def tokens(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of ``messages``; only the template's text may hold control tokens."""
        nonce = secrets.token_hex(8)  # unguessable: a message cannot contain the marks that stand for contents
        marked = [dict(message, content=f"\x00{nonce}:{index}\x00") for index, message in enumerate(messages)]
        pieces = re.split(f"\x00{nonce}:(\\d+)\x00", self.render(marked))
        if len(pieces) != 2 * len(messages) + 1:  # the template changed the contents (filters): render them as is
            log.debug("chat template does not place contents verbatim; tokenizing the rendered prompt whole")
            return self._tokens(self.render(list(messages)), special=True)
        tokens: list[int] = []
        for index, piece in enumerate(pieces):
            text = piece if index % 2 == 0 else str(messages[int(piece)]["content"])
            tokens += self._tokens(text, special=index % 2 == 0)
        return tokens

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text of ``messages`` (with the generation prompt); ``InvalidRequest`` if the template refuses."""
        try:
            return str(self._formatter(messages=cast(Any, messages)).prompt)
        except TemplateError as exc:
            raise InvalidRequest(f"the model's chat template rejected these messages: {exc}", param="messages") from exc
