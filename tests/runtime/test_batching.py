"""Several sequences in one context: answers do not depend on what else runs, turns are fair, prompts are shared.

Real llama.cpp on SmolLM2 and Gemma 3 270M: each request's tokens alone (nothing else in the engine) equal its tokens
when it runs batched beside others — same adapter, other adapters, an aLoRA, a grammar, seeded sampling.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_runtime.profiles import load_profile
from edge_runtime.runtime.core import Runtime
from edge_runtime.runtime.engine import Engine
from edge_runtime.runtime.generation import Chunk, SamplingParams
from edge_runtime.runtime.requests import AdapterRequest
from edge_runtime.runtime.turns import next_turn

GREEDY = SamplingParams(max_tokens=24)
Ad = AdapterRequest  # short, for the tables of requests below


@dataclass
class Collected:
    """Everything one generation delivered, in order, and the engine step each chunk arrived at."""

    chunks: list[Chunk] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)


Request = tuple[list[int], SamplingParams, list[AdapterRequest]]


@contextmanager
def engine_paused(engine: Engine) -> Iterator[None]:
    """Hold the engine's worker so that everything started meanwhile is admitted at one step boundary."""
    gate = threading.Event()
    engine._submit(gate.wait)
    try:
        yield
    finally:
        gate.set()


def run_together(runtime: Runtime, requests: list[Request]) -> list[Collected]:
    """Start every request at the same step boundary and wait for all of them."""
    results = [Collected() for _ in requests]

    def deliver_to(result: Collected) -> Callable[[Chunk | BaseException], None]:
        def deliver(item: Chunk | BaseException) -> None:
            if isinstance(item, BaseException):
                result.error = item
                result.done.set()
                return
            result.chunks.append(item)
            result.steps.append(runtime.engine.steps)
            if item.finish_reason is not None:
                result.done.set()
        return deliver

    for _, _, adapters in requests:  # loading runs on the engine's worker: before it is paused
        for adapter in adapters:
            runtime.adapters.ensure_resident(adapter.name)
    with engine_paused(runtime.engine):
        for (prompt, params, adapters), result in zip(requests, results):
            runtime.start(prompt, params, adapters=adapters, cancel=threading.Event(), deliver=deliver_to(result))
    for result in results:
        assert result.done.wait(3600)  # a guard against a hang only: the machine may be very busy
        assert result.error is None, result.error
    return results


def run_alone(runtime: Runtime, requests: list[Request]) -> list[list[int]]:
    """Each request's tokens with nothing else in the engine, every prompt evaluated from its first token."""
    alone = []
    for prompt, params, adapters in requests:
        runtime.engine.clear_cache()
        alone.append(runtime.generate(prompt, params, adapters=adapters)[0].token_ids)
    return alone


@pytest.fixture(scope="module")
def smol(make_profile: Callable[..., Path], adapter_files: list[Path], alora_files: list[Path]) -> Iterator[Runtime]:
    runtime = Runtime(load_profile(str(make_profile("batching", budget_mb=2048, ctx=1024, parallel=4))))
    for name, path in zip(["a", "b", "c", "d"], adapter_files):
        runtime.adapters.add(name, path)
    runtime.adapters.add("router", alora_files[0])
    yield runtime
    runtime.close()


def chat(runtime: Runtime, text: str) -> list[int]:
    return runtime.engine.chat_prompt([{"role": "user", "content": text}])


def mixed_requests(runtime: Runtime) -> list[Request]:
    grammar = runtime.engine.json_grammar()
    return [
        (chat(runtime, "List three things a drone needs."), GREEDY, []),
        (chat(runtime, "Write a haiku about rivers."), GREEDY, [Ad("a", 1.0)]),
        (chat(runtime, "What is the capital of France?"), GREEDY, [Ad("a", 1.0)]),  # same adapter as the one above
        (chat(runtime, "List three things a drone needs."), GREEDY, [Ad("b", 1.0)]),
        (chat(runtime, "Route this: the battery is low."), GREEDY, [Ad("router", 1.0)]),  # an aLoRA, invoked
        (chat(runtime, "Give me a person as JSON."), SamplingParams(max_tokens=24, grammar=grammar), []),
        (chat(runtime, "Tell me a story."), SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=11),
         [Ad("a", 0.5), Ad("b", 0.5)]),
        (chat(runtime, "Name a colour."), SamplingParams(max_tokens=24, logprobs=2, presence_penalty=1.5), []),
    ]


def test_every_answer_is_the_same_alone_and_batched_beside_others_on_smollm2(smol: Runtime) -> None:
    requests = mixed_requests(smol)
    alone = run_alone(smol, requests)
    steps, tokens = smol.engine.decode_steps, smol.engine.decode_step_tokens
    together = run_together(smol, requests)
    assert [r.tokens for r in together] == alone
    assert len({tuple(t) for t in alone}) == len(alone)  # eight different answers: a mix-up could not hide
    # They did run batched: decode steps carried several sequences, and eight requests shared four slots.
    assert smol.engine.decode_step_tokens - tokens > smol.engine.decode_steps - steps
    assert smol.engine.parallel == 4


def test_four_sequences_on_one_adapter_decode_in_one_batch(smol: Runtime) -> None:
    prompts = ["Name a fruit.", "Name a river.", "Name a city.", "Name a tool."]
    requests: list[Request] = [(chat(smol, p), SamplingParams(max_tokens=16), [Ad("c", 1.0)]) for p in prompts]
    alone = run_alone(smol, requests)
    results = run_together(smol, requests)
    assert [r.tokens for r in results] == alone
    # Every request got its first token at the step its prompt was done, before any of them finished.
    first_steps = [r.steps[0] for r in results]
    last_steps = [r.steps[-1] for r in results]
    assert max(first_steps) < min(last_steps)


def test_each_client_on_its_own_adapter_gets_a_first_token_before_any_finishes(smol: Runtime) -> None:
    requests: list[Request] = [(chat(smol, "Describe the sea."), SamplingParams(max_tokens=20), [Ad(name)])
                               for name in ["a", "b", "c", "d"]]
    alone = run_alone(smol, requests)
    results = run_together(smol, requests)
    assert [r.tokens for r in results] == alone
    assert max(r.steps[0] for r in results) < min(r.steps[-1] for r in results)


def test_base_and_three_aloras_over_one_document_evaluate_it_once(make_profile: Callable[..., Path],
                                                                    alora_files: list[Path]) -> None:
    runtime = Runtime(load_profile(str(make_profile("alora-share", budget_mb=2048, ctx=2048, parallel=4))))
    try:
        for name, path in zip(["router", "json", "legal"], alora_files):
            runtime.adapters.add(name, path)
        document = "The river towns traded salt, wool and timber along the valley for centuries. " * 70
        prompt = chat(runtime, document + "\nSummarise the document.")
        assert len(prompt) > 1000
        requests: list[Request] = [(prompt, SamplingParams(max_tokens=8), adapters) for adapters in
                                   ([], [Ad("router", 1.0)], [Ad("json", 1.0)], [Ad("legal", 1.0)])]
        before = runtime.engine.evaluated_tokens
        together = run_together(runtime, requests)
        evaluated = runtime.engine.evaluated_tokens - before
        invocation = len([1, 520, 9531, 198])  # each aLoRA's own part: its invocation (the assistant turn) on
        assert evaluated == len(prompt) + 3 * invocation
        assert runtime.engine.shared_tokens >= 3 * (len(prompt) - invocation)
        assert [r.tokens for r in together] == run_alone(runtime, requests)
        assert len({tuple(r.tokens) for r in together}) == 4
    finally:
        runtime.close()


def test_a_cancelled_sequence_frees_its_slot_and_leaves_the_others_answers_unchanged(smol: Runtime) -> None:
    requests = mixed_requests(smol)[:4]
    alone = run_alone(smol, requests)
    results = [Collected() for _ in requests]
    cancels = [threading.Event() for _ in requests]

    def deliver_to(index: int) -> Callable[[Chunk | BaseException], None]:
        def deliver(item: Chunk | BaseException) -> None:
            assert isinstance(item, Chunk)
            results[index].chunks.append(item)
            if len(results[index].chunks) == 3 and index == 1:
                cancels[1].set()  # the client went away after its third chunk
            if item.finish_reason is not None:
                results[index].done.set()
        return deliver

    with engine_paused(smol.engine):
        for index, (prompt, params, adapters) in enumerate(requests):
            smol.start(prompt, params, adapters=adapters, cancel=cancels[index], deliver=deliver_to(index))
    for result in results:
        assert result.done.wait(3600)  # a guard against a hang only: the machine may be very busy
    assert results[1].chunks[-1].finish_reason == "cancelled"
    assert len(results[1].tokens) < len(alone[1])
    assert [results[i].tokens for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]
    assert smol.engine.running_sequences == 0
    assert all(version.users == 0 for adapter in smol.adapters._adapters.values()
               for version in [adapter.current] if version is not None)


def test_more_requests_than_slots_wait_and_all_finish(smol: Runtime) -> None:
    requests: list[Request] = [(chat(smol, f"Count to {n}."), SamplingParams(max_tokens=6), []) for n in range(10)]
    results = run_together(smol, requests)
    assert [len(r.tokens) for r in results] == [6] * 10
    assert [r.chunks[-1].finish_reason for r in results] == ["length"] * 10


def test_same_answers_alone_and_batched_on_gemma(make_profile: Callable[..., Path], gemma_model: Path,
                                                 gemma_adapter_files: list[Path]) -> None:
    profile = load_profile(str(make_profile("gemma-batching", budget_mb=2048, ctx=1024, parallel=4)))
    runtime = Runtime(profile, model=gemma_model)
    try:
        runtime.adapters.add("legal", gemma_adapter_files[0])
        runtime.adapters.add("brand", gemma_adapter_files[1])
        grammar = runtime.engine.json_grammar()

        def text(words: str) -> list[int]:  # this GGUF carries no chat template: plain prompts
            return runtime.engine.tokenize(words)

        requests: list[Request] = [
            (text("Three things a drone needs are"), GREEDY, []),
            (text("A haiku about rivers:"), GREEDY, [Ad("legal", 1.0)]),
            (text("The capital of France is"), GREEDY, [Ad("legal", 1.0)]),
            (text("A person as JSON:"), SamplingParams(max_tokens=24, grammar=grammar), [Ad("brand", 1.0)]),
            (text("Once upon a time"), SamplingParams(max_tokens=24, temperature=0.9, seed=3), []),
            (text("The history of the region begins with"), GREEDY, []),
            (text("Rivers and towns:"), GREEDY, []),
        ]
        alone = run_alone(runtime, requests)
        together = run_together(runtime, requests)
        assert [r.tokens for r in together] == alone
        assert len({tuple(t) for t in alone}) == len(alone)
    finally:
        runtime.close()


def test_turns_alternate_between_adapter_sets_and_never_starve_one() -> None:
    last: dict[str, int] = {}
    served = []
    for step in range(12):
        waiting = {"busy": 0, "late": 5} if step < 6 else {"busy": 0, "late": 5, "third": 9}
        key = next_turn(waiting, last)
        assert key is not None
        last[key] = step
        served.append(key)
    assert served[:6] == ["busy", "late"] * 3  # the older set first, then strictly alternating
    assert served[6:9] == ["third", "busy", "late"]  # a newcomer is served before sets already served
    assert all(len(set(served[i:i + 3])) == 3 for i in range(6, 10))  # three sets: each once every three steps
    assert next_turn({}, last) is None
