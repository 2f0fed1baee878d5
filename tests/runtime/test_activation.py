"""Activated LoRA in the runtime: an aLoRA applies from its invocation on, so a prefix the base model (or another
aLoRA) already evaluated is reused, and a prompt without the invocation runs exactly as the base model does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from peft_dirs import ASSISTANT_TURN

from edge_runtime.profiles import load_profile
from edge_runtime.runtime import activation
from edge_runtime.runtime.core import Runtime
from edge_runtime.runtime.engine import SamplingParams
from edge_runtime.runtime.requests import AdapterRequest

AdapterSpec = tuple[str, float]  # (name, scale): the test data, made AdapterRequests where they run


def adapter_requests(spec: list[AdapterSpec]) -> list[AdapterRequest]:
    return [AdapterRequest(name, scale) for name, scale in spec]

GREEDY = SamplingParams(max_tokens=12)
DOCUMENT = " ".join(f"Clause {n}: the supplier delivers {n * 7} units of part {n % 5} by day {n * 3}." for n in
                    range(1, 13))


# -- the plan, without llama.cpp --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fake:
    content_id: str
    invocation: tuple[int, ...] = ()


PLAIN, ALORA, OTHER = Fake("plain"), Fake("alora", (7, 8)), Fake("other", (9,))


def test_invocation_start_is_the_last_occurrence_of_the_whole_sequence() -> None:
    assert activation.invocation_start([1, 7, 8, 2, 7, 8, 3], [7, 8]) == 4
    assert activation.invocation_start([1, 7, 2, 8], [7, 8]) is None
    assert activation.invocation_start([7], [7, 8]) is None  # a sequence cut by the prompt's end is not there
    assert activation.invocation_start([5, 7, 8], [7, 8]) == 1


def test_plan_puts_plain_loras_everywhere_and_each_alora_from_its_invocation() -> None:
    prompt = [1, 2, 9, 3, 7, 8, 4]
    plan = activation.plan(prompt, [(ALORA, 1.0), (PLAIN, 0.5), (OTHER, 2.0)])
    assert [(s.start, s.key) for s in plan.segments] == [
        (0, (("plain", 0.5),)), (2, (("plain", 0.5), ("other", 2.0))),
        (4, (("alora", 1.0), ("plain", 0.5), ("other", 2.0)))]  # the request's order, as llama.cpp applies them
    assert plan.key_at(3) == (("plain", 0.5), ("other", 2.0)) and plan.key_at(50) == plan.segments[-1].key
    assert plan.inert == ()
    inert = activation.plan([1, 2, 3], [(ALORA, 1.0)])
    assert [(s.start, s.key) for s in inert.segments] == [(0, ())] and inert.inert == (ALORA,)
    assert activation.is_inert([1, 2, 3], ALORA.invocation) and not activation.is_inert([1], PLAIN.invocation)


def test_a_prefix_computed_without_adapters_serves_the_base_and_every_alora() -> None:
    document = list(range(100, 140))
    base = activation.plan(document + [5, 6], [])
    aloras = activation.plan(document + [7, 8, 5], [(ALORA, 1.0)])
    assert activation.reusable_prefix(document + [5, 6], base, document + [7, 8, 5], aloras) == 40
    # The aLoRA's own positions serve only the same aLoRA at the same scale, never the base or another scale.
    computed = document + [7, 8, 5, 11, 12]  # its prompt and two generated tokens
    assert activation.reusable_prefix(computed, aloras, document + [7, 8, 5], base) == 40
    assert activation.reusable_prefix(computed, aloras, document + [7, 8, 5, 11, 12, 13],
                                      activation.plan(document + [7, 8, 5, 11, 12, 13], [(ALORA, 0.5)])) == 40
    again = document + [7, 8, 5, 11, 12, 13]
    # Its own answer serves a follow-up under the same aLoRA (minus one: never resume at a segment's last token).
    assert activation.reusable_prefix(computed, aloras, again, activation.plan(again, [(ALORA, 1.0)])) == 44
    # A plain LoRA computes every position: nothing the base computed serves it.
    assert activation.reusable_prefix(document + [5, 6], base, document + [5, 6, 1],
                                      activation.plan(document + [5, 6, 1], [(PLAIN, 1.0)])) == 0


def test_a_segment_is_never_resumed_at_its_last_token() -> None:
    base = activation.plan(list(range(10)), [])
    assert activation.reusable_prefix(list(range(10)), base, list(range(10)), base) == 8  # two tokens re-evaluated
    # Reusing 9 of the 10 prefix tokens would leave one prefix token as a batch of its own: keep 8.
    cached = list(range(9)) + [99]
    prompt = list(range(10)) + [7, 8]
    assert activation.reusable_prefix(cached, base, prompt, activation.plan(prompt, [(ALORA, 1.0)])) == 8
    # A one-token segment is evaluated alone in a fresh run too: resuming at it is fine.
    prompt = list(range(10)) + [9]
    assert activation.reusable_prefix(list(range(10)), base, prompt, activation.plan(prompt, [(OTHER, 1.0)])) == 10


def test_what_is_left_of_a_long_segment_is_evaluated_as_a_large_batch_as_in_a_fresh_run() -> None:
    document = list(range(1000, 1300))
    base = activation.plan(document, [])
    prompt = document[:290] + [5, 6, 7]  # shares 290 tokens, then differs: 3 new tokens would be a small batch
    assert activation.reusable_prefix(document, base, prompt, activation.plan(prompt, [])) == 293 - 64
    # The base segment before an invocation is reused whole: the aLoRA's own segment is evaluated whole anyway.
    invoked = document + [7, 8, 5]
    assert activation.reusable_prefix(document, base, invoked, activation.plan(invoked, [(ALORA, 1.0)])) == 300


def test_a_prefix_is_reused_only_where_it_was_computed_in_the_batch_class_a_fresh_run_uses() -> None:
    # Hostile review of issue 19: with an f16 KV cache, a short prompt after a long one sharing its first 24 tokens
    # (the chat template) reused them from the long prompt's large batch and got other logprobs than fresh.
    document = list(range(1000, 1300))
    short = document[:24] + [5, 6, 7, 8, 9]
    base = activation.plan(document, [])
    assert activation.reusable_prefix(document, base, short, activation.plan(short, [])) == 0
    # A generated token was computed by a decode step: a prompt repeating the answer evaluates it again.
    asked, answer = list(range(20)), [90, 91, 92, 93, 94]
    follow_up = asked + answer + [7, 8, 9]
    cached_plan = activation.plan(asked, [])
    assert activation.reusable_prefix(asked + answer, cached_plan, follow_up, activation.plan(follow_up, []),
                                      cached_prompt=len(asked)) == len(asked)
    assert activation.reusable_prefix(asked + answer, cached_plan, follow_up, activation.plan(follow_up, [])) == 25
    # The same long prompt again still reuses all but its last large batch.
    assert activation.reusable_prefix(document, base, document, base) == 300 - 64


@pytest.mark.parametrize("start, end, limit, expected", [
    (0, 300, 512, [(0, 300)]),
    (0, 520, 512, [(0, 260), (260, 520)]),  # not 512 + 8: a remainder of 8 would change the batch class
    (10, 1035, 512, [(10, 352), (352, 694), (694, 1035)]),
    (5, 6, 512, [(5, 6)]),
])
def test_batches_split_evenly_within_the_limit(start: int, end: int, limit: int,
                                               expected: list[tuple[int, int]]) -> None:
    assert activation.batches(start, end, limit) == expected


# -- the runtime on the real SmolLM2 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profile_path(make_profile: Callable[..., Path]) -> Path:
    return make_profile("activation", budget_mb=1024, ctx=1024)


@pytest.fixture(scope="module")
def files(alora_files: list[Path], adapter_files: list[Path]) -> dict[str, Path]:
    """Three aLoRAs and a plain LoRA, by name."""
    return {path.stem: path for path in alora_files} | {"plain": adapter_files[0]}


def started(profile_path: Path, files: dict[str, Path]) -> Runtime:
    rt = Runtime(load_profile(str(profile_path)))
    for name, path in files.items():
        rt.adapters.add(name, path)
    return rt


@pytest.fixture
def runtime(profile_path: Path, files: dict[str, Path]) -> Iterator[Runtime]:
    rt = started(profile_path, files)
    yield rt
    rt.close()


def ask(runtime: Runtime, question: str) -> list[int]:
    return runtime.engine.chat_prompt([{"role": "system", "content": DOCUMENT}, {"role": "user", "content": question}])


def fresh_output(profile_path: Path, files: dict[str, Path], prompt: list[int], spec: list[AdapterSpec]) -> str:
    """Greedy output of a brand-new runtime that only ever ran ``spec`` on ``prompt``."""
    rt = started(profile_path, files)
    try:
        return rt.generate(prompt, GREEDY, adapters=adapter_requests(spec))[0].text
    finally:
        rt.close()


def test_an_alora_after_the_base_evaluates_only_from_its_invocation(runtime: Runtime, profile_path: Path,
                                                                    files: dict[str, Path]) -> None:
    prompt = ask(runtime, "Which clause delivers the most units?")
    assert prompt[-4:] == ASSISTANT_TURN and len(prompt) > 250
    base = runtime.generate(prompt, GREEDY)[0].text
    before = runtime.engine.evaluated_tokens
    result, applied = runtime.generate(prompt, GREEDY, adapters=[AdapterRequest("router", 1.0)])
    assert runtime.engine.evaluated_tokens - before == 4  # the invocation; the document came from the base's KV
    assert runtime.engine.last_reused_tokens == len(prompt) - 4
    assert [(a.name, a.inert) for a in applied] == [("router", False)]
    assert result.text != base  # the adapter changed the answer: reuse could not hide a mix-up
    assert result.text == fresh_output(profile_path, files, prompt, [("router", 1.0)])


def test_a_pipeline_of_aloras_over_one_document_evaluates_it_once(runtime: Runtime, profile_path: Path,
                                                                  files: dict[str, Path]) -> None:
    questions = {"router": "Which team handles this?", "json-extract": "Give the clauses as JSON.",
                 "legal-review": "Is clause 4 enforceable?"}
    document_tokens = len(ask(runtime, ""))
    outputs, evaluated = {}, []
    for name, question in questions.items():
        prompt, before = ask(runtime, question), runtime.engine.evaluated_tokens
        outputs[name] = (prompt, runtime.generate(prompt, GREEDY, adapters=[AdapterRequest(name, 1.0)])[0].text)
        evaluated.append(runtime.engine.evaluated_tokens - before)
    prompts = [prompt for prompt, _ in outputs.values()]
    assert evaluated[0] == len(prompts[0])
    for prompt, count in zip(prompts[1:], evaluated[1:]):
        # The document came from the first request's KV: only the question, and at most one large batch of the
        # prefix before it (evaluated in the batch class a fresh run uses), were evaluated again.
        assert len(prompt) - document_tokens <= count <= len(prompt) - document_tokens + activation.LARGE_BATCH
    assert sum(evaluated) < 2 * document_tokens  # one prefill of the document, not three
    for name, (prompt, text) in outputs.items():
        assert text == fresh_output(profile_path, files, prompt, [(name, 1.0)])


def test_without_its_invocation_an_alora_is_inert_and_answers_as_the_base(runtime: Runtime) -> None:
    prompt = runtime.engine.tokenize(f"{DOCUMENT}\nThe clause with the most units is")
    assert activation.invocation_start(prompt, ASSISTANT_TURN) is None
    result, applied = runtime.generate(prompt, GREEDY, adapters=[AdapterRequest("router", 1.0)])
    assert [(a.name, a.inert) for a in applied] == [("router", True)]
    base = runtime.generate(prompt, GREEDY)[0]
    # The inert request computed the base's KV: the base reuses it.
    assert runtime.engine.last_reused_tokens == len(prompt) - activation.LARGE_BATCH
    assert result.token_ids == base.token_ids and result.text == base.text


def test_switching_between_base_alora_and_plain_lora_never_reuses_kv_computed_under_another(
        runtime: Runtime, profile_path: Path, files: dict[str, Path]) -> None:
    prompt = ask(runtime, "Summarise clause 3.")
    sequence: list[list[AdapterSpec]] = [[("router", 1.0)], [], [("plain", 1.0)], [("router", 1.0)],
                                         [("router", 1.0), ("plain", 1.0)], [("router", 0.5)], []]
    interleaved = [runtime.generate(prompt, GREEDY, adapters=adapter_requests(spec))[0].text for spec in sequence]
    assert len(set(interleaved)) == 5  # base, router, plain, router+plain and router at 0.5 all differ
    assert interleaved == [fresh_output(profile_path, files, prompt, spec) for spec in sequence]
