"""One generation running in the engine: the prompt batches it still has to evaluate, the token it sampled last,
and the text it has produced (stop strings, the token budget, UTF-8 split across tokens).

Plain state and text handling, no llama.cpp: the engine evaluates, samples and hands the results in here.
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edge_runtime.errors import GenerationTimeout
from edge_runtime.runtime import activation
from edge_runtime.runtime.generation import Chunk, SamplingParams, TokenLogprob
from edge_runtime.runtime.handles import AdapterHandle
from edge_runtime.runtime.stops import StopMatcher

__all__ = ["AdapterTuple", "PromptBatch", "Running"]
log = logging.getLogger(__name__)

AdapterTuple = tuple[tuple[AdapterHandle, float], ...]


@dataclass(frozen=True)
class PromptBatch:
    """Prompt positions ``start``..``stop`` (exclusive) evaluated in one ``llama_decode`` under ``adapters``."""

    start: int
    stop: int
    adapters: AdapterTuple
    key: activation.Key


class Running:
    """A generation in the engine: one llama.cpp sequence id (``slot``) while it runs, and its own sampler."""

    def __init__(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        adapters: AdapterTuple,
        *,
        cancel: threading.Event,
        deliver: Callable[[Chunk | BaseException], None],
        arrival: int,
    ) -> None:
        self.prompt = list(prompt)
        self.params = params
        self.plan = activation.plan(self.prompt, adapters)
        self.cancel = cancel
        self._deliver = deliver
        self.arrival = arrival  # admission order: the older sequence goes first among equals
        self.work: deque[PromptBatch] = deque()
        self.pending: int | None = None  # the token sampled last, not yet evaluated
        self.produced = 0
        self.budget = 0
        self.reused = 0  # prompt tokens taken from the KV cache
        self.slot: int | None = None
        self.leader: Running | None = None  # a sequence whose prompt evaluation this one waits for, to share it
        self.sampler: Any = None  # the llama.cpp sampler chain (the engine frees it)
        self.grammar: Any = None  # the llama.cpp grammar sampler, applied before the chain (the engine frees it)
        self.finished = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(params.stop)

    def deliver(self, item: Chunk | BaseException) -> None:
        """Hand ``item`` to the caller; a failing consumer is logged and never stops the engine's other work."""
        try:
            self._deliver(item)
        except Exception:
            log.exception("the consumer of a generation failed on %r", item)

    @property
    def final(self) -> activation.Segment[AdapterHandle]:
        """The segment generated tokens are computed under (the prompt's last)."""
        return self.plan.segments[-1]

    @property
    def next_key(self) -> activation.Key:
        """The adapter set the sequence's next evaluation runs under."""
        return self.work[0].key if self.work else self.final.key

    @property
    def next_adapters(self) -> AdapterTuple:
        """The (handle, scale) pairs of ``next_key``."""
        return self.work[0].adapters if self.work else self.final.adapters

    def plan_prefill(self, keep: int, limit: int, n_ctx: int) -> None:
        """Queue the prompt batches after the ``keep`` reused positions, at most ``limit`` tokens each (the same
        batches whatever else runs: a position's KV is reproducible only within one class of batch)."""
        self.reused = keep
        self.budget = min(self.params.max_tokens, n_ctx - len(self.prompt))
        for segment, end in self.plan.spans(len(self.prompt)):
            if end > keep:
                for start, stop in activation.batches(max(keep, segment.start), end, limit):
                    self.work.append(PromptBatch(start, stop, segment.adapters, segment.key))

    def accept(
        self, token: int, piece: bytes, *, end_of_generation: bool, logprobs: tuple[TokenLogprob, ...] = ()
    ) -> Chunk:
        """The chunk for a sampled ``token`` (its text ``piece``); marks the sequence finished when it ends."""
        if end_of_generation:
            return self._finish(Chunk(self._stops.flush(), finish_reason="stop"))
        self.produced += 1
        text, stopped = self._stops.feed(self._decoder.decode(piece))
        if stopped:
            return self._finish(Chunk(text, (token,), finish_reason="stop", logprobs=logprobs))
        if self.produced >= self.budget:
            return self._finish(Chunk(text + self._stops.flush(), (token,), finish_reason="length", logprobs=logprobs))
        self.pending = token
        return Chunk(text, (token,), logprobs=logprobs)

    def interrupted(self) -> bool:
        """Cancelled by its caller or past its deadline: the engine ends it at its next check."""
        deadline = self.params.deadline
        return self.cancel.is_set() or (deadline is not None and time.monotonic() > deadline)

    def ending(self) -> Chunk | BaseException:
        """What ends an interrupted generation: the cancelled chunk, or ``GenerationTimeout`` past its deadline."""
        if self.cancel.is_set() or self.params.deadline is None:
            return self.cancelled()
        self._finish(Chunk(""))
        return GenerationTimeout(deadline_s=self.params.deadline, completion_tokens=self.produced)

    def cancelled(self) -> Chunk:
        """The last chunk of a generation stopped by its caller."""
        return self._finish(Chunk("", finish_reason="cancelled"))

    def _finish(self, chunk: Chunk) -> Chunk:
        self.finished = True
        self.pending = None
        return chunk
