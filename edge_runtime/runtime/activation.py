"""Activated LoRA: which adapters compute each prompt position, and how much of the KV cache a prompt may reuse.

An aLoRA adapter (an invocation token sequence in its GGUF) changes nothing before the last occurrence of that
sequence in the prompt: PEFT applies it from the first invocation token on (the invocation included) and not at
all when the prompt lacks it. So a prompt is computed in segments, each under its own adapter set: the plain
LoRAs everywhere, each aLoRA from its own invocation on. A position's KV is keyed by the set that computed it
(each adapter's content digest and scale, never its name), so a prefix computed without adapters serves the base
and every aLoRA, and anything computed with an adapter serves only that same adapter set.

Pure functions over token ids: the engine feeds them what its cache holds and evaluates what they say to.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

LARGE_BATCH = 64
"""llama.cpp's CPU build computes a batch of 64 tokens or more with other kernels (other rounding) than a smaller
one, and a single token differently again: a position's KV is reproducible only within the same class of batch
(measured on SmolLM2 Q4_1: logits move by up to ~1.4 between classes, by 0.0 within one)."""

Key = tuple[tuple[str, float], ...]
"""An adapter set as the KV cache knows it: (content digest, scale) per adapter, in application order."""


class Activatable(Protocol):
    """What the plan needs of an adapter: its content digest and its invocation tokens (empty: a plain LoRA)."""

    @property
    def content_id(self) -> str: ...

    @property
    def invocation(self) -> tuple[int, ...]: ...


A = TypeVar("A", bound=Activatable)


@dataclass(frozen=True)
class Segment(Generic[A]):
    """Prompt positions from ``start`` on (up to the next segment's start) computed under ``adapters``."""

    start: int
    adapters: tuple[tuple[A, float], ...]

    @property
    def key(self) -> Key:
        """The adapter set as the KV cache knows it."""
        return tuple((adapter.content_id, float(scale)) for adapter, scale in self.adapters)


@dataclass(frozen=True)
class Plan(Generic[A]):
    """The adapter set of every position: ``segments`` start at 0 in increasing order; the last runs on forever
    (generated tokens are computed under it). ``inert`` holds the aLoRAs whose invocation the prompt lacks."""

    segments: tuple[Segment[A], ...]
    inert: tuple[A, ...] = ()

    def key_at(self, position: int) -> Key:
        """The key of the adapter set that computes ``position``."""
        index = bisect.bisect_right([s.start for s in self.segments], position) - 1
        return self.segments[max(index, 0)].key

    def spans(self, length: int) -> list[tuple[Segment[A], int]]:
        """Each segment with the position it ends at (exclusive) within a prompt of ``length`` tokens."""
        ends = [s.start for s in self.segments[1:]] + [length]
        return list(zip(self.segments, ends))


def invocation_start(prompt: Sequence[int], invocation: Sequence[int]) -> int | None:
    """Where the last occurrence of ``invocation`` in ``prompt`` starts, or None (PEFT's calculate_alora_offsets)."""
    size = len(invocation)
    if size == 0:
        return None
    first, wanted = invocation[0], list(invocation)
    for start in range(len(prompt) - size, -1, -1):
        if prompt[start] == first and list(prompt[start : start + size]) == wanted:
            return start
    return None


def is_inert(prompt: Sequence[int], invocation: Sequence[int]) -> bool:
    """True for an aLoRA whose invocation ``prompt`` lacks: it changes nothing (a plain LoRA is never inert)."""
    return bool(invocation) and invocation_start(prompt, invocation) is None


def plan(prompt: Sequence[int], adapters: Sequence[tuple[A, float]]) -> Plan[A]:
    """Segments of ``prompt``: plain LoRAs from 0, each aLoRA from its last invocation, aLoRAs without one inert."""
    starts: list[tuple[int, A, float]] = []
    inert: list[A] = []
    for adapter, scale in adapters:
        start = invocation_start(prompt, adapter.invocation) if adapter.invocation else 0
        if start is None:
            inert.append(adapter)
        else:
            starts.append((start, adapter, scale))
    boundaries = sorted({0, *(start for start, _, _ in starts)})
    segments = tuple(Segment(b, tuple((a, s) for start, a, s in starts if start <= b)) for b in boundaries)
    return Plan(segments, tuple(inert))


def batch_class(length: int) -> int:
    """The class of batch a fresh run evaluates a segment of ``length`` prompt tokens in: 0 one token (as a decode
    step evaluates a generated token), 1 a small batch, 2 a large one (``LARGE_BATCH`` tokens or more)."""
    return 0 if length <= 1 else 2 if length >= LARGE_BATCH else 1


def class_at(plan: Plan[A], evaluated: int, position: int) -> int:
    """The class of batch that computed ``position`` of a sequence whose first ``evaluated`` positions are its prompt
    (computed as a fresh run of ``plan`` computes them) and the rest generated tokens (one token per decode step)."""
    if position >= evaluated:
        return 0
    for segment, end in plan.spans(evaluated):
        if segment.start <= position < end:
            return batch_class(end - segment.start)
    return 0


def reusable_prefix(
    cached: Sequence[int], cached_plan: Plan[A], prompt: Sequence[int], wanted: Plan[A], *, cached_prompt: int = -1
) -> int:
    """Tokens of ``prompt`` whose cached KV may serve it: same tokens, computed under the same adapter sets, in the
    same class of batch a fresh run of ``prompt`` computes them in (``cached_prompt``: how many of the ``cached``
    positions were its prompt, the rest being generated tokens; -1: all of them).

    At least one token is left to evaluate (the logits to sample from), and what is left of a segment is evaluated
    in the class of batch a fresh run uses for it (``LARGE_BATCH``): at least 64 tokens of a segment that long, at
    least two of a shorter one. Cached runs then reproduce fresh ones bit for bit.
    """
    limit = min(len(cached), len(prompt) - 1)
    common = 0
    while common < limit and cached[common] == prompt[common]:
        common += 1
    for boundary in sorted({s.start for s in cached_plan.segments} | {s.start for s in wanted.segments}):
        if boundary >= common:
            break
        if cached_plan.key_at(boundary) != wanted.key_at(boundary):
            common = boundary
            break
    # A position's KV is reproducible only within one class of batch: a prefix a long prompt computed in a large
    # batch does not serve a short prompt, nor does a generated token's serve a prompt (with an f16 KV cache
    # llama.cpp's flash attention tiles 64+ queries and not fewer: a 35-token prompt's logprobs moved by 0.06).
    evaluated = len(cached) if cached_prompt < 0 else cached_prompt
    changes = {evaluated} | {s.start for s in cached_plan.segments} | {s.start for s in wanted.segments}
    for boundary in sorted(changes):
        if boundary >= common:
            break
        if class_at(cached_plan, evaluated, boundary) != class_at(wanted, len(prompt), boundary):
            common = boundary
            break
    for segment, end in wanted.spans(len(prompt)):
        if segment.start <= common < end:
            length = end - segment.start
            left = LARGE_BATCH if length >= LARGE_BATCH else min(2, length)
            return min(common, end - left)
    return common


def batches(start: int, end: int, limit: int) -> list[tuple[int, int]]:
    """Positions ``start``..``end`` as batches of at most ``limit`` tokens, of sizes differing by at most one (no
    short remainder batch: every batch of a long segment stays in the large class)."""
    count = max(1, -(-(end - start) // limit))
    size, extra = divmod(end - start, count)
    bounds = [start]
    for index in range(count):
        bounds.append(bounds[-1] + size + (1 if index < extra else 0))
    return list(zip(bounds, bounds[1:]))
