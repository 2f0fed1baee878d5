"""What one generation asks for and gives back: sampling settings, chunks of text, token log-probabilities.

Plain data and arithmetic (numpy), no llama.cpp: the engine fills these in on its worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's chat limit)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request; temperature 0 is greedy.

    ``presence_penalty`` and ``frequency_penalty`` (OpenAI's, -2..2) go to llama.cpp's penalties sampler, which
    counts the last 64 generated tokens. ``grammar`` is GBNF text (from ``Engine.json_grammar``) the output must
    follow. ``logprobs`` None computes nothing; n >= 0 gives each generated token's log-probability and its n most
    likely alternatives. ``deadline`` (``time.monotonic()`` seconds) ends the generation with ``GenerationTimeout``
    when passed, even inside one token's grammar work.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: str | None = None
    logprobs: int | None = None
    deadline: float | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A token, its bytes and its log-probability (natural log) under the model; ``top``: the likeliest tokens."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """A piece of generated text; the last chunk of a generation carries ``finish_reason``."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asked for them


@dataclass
class Generation:
    """The collected result of a non-streamed generation."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


def token_logprob(logits: np.ndarray, token: int, alternatives: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """``token``'s log-probability under one position's ``logits``, with the ``alternatives`` likeliest tokens."""
    logprobs = log_softmax(logits)
    top = tuple(TokenLogprob(t, piece(t), float(logprobs[t])) for t in most_likely(logprobs, alternatives))
    return TokenLogprob(token, piece(token), float(logprobs[token]), top)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log probabilities of one position's logits (float64, so that exp() of them sums to 1)."""
    shifted = logits.astype(np.float64) - float(np.max(logits))
    return shifted - float(np.log(np.sum(np.exp(shifted))))


def most_likely(logprobs: np.ndarray, count: int) -> list[int]:
    """The ``count`` tokens of highest log-probability, most likely first (ties: lower token id first)."""
    count = min(count, len(logprobs))
    if count <= 0:
        return []
    candidates = np.argpartition(-logprobs, count - 1)[:count]
    return sorted((int(t) for t in candidates), key=lambda t: (-float(logprobs[t]), t))
