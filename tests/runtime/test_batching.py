"""Several sequences in one context: answers do not depend on what else runs, turns are fair, prompts are shared.

Real llama.cpp on SmolLM2 and Gemma 3 270M: each request's tokens alone (nothing else in the engine) equal its tokens
when it runs batched beside others — same adapter, other adapters, an aLoRA, a grammar, seeded sampling.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from schemas import nested_anyof
from scripted_governor import alternating_governor

from edge_runtime.errors import GenerationTimeout
from edge_runtime.profiles import load_profile
from edge_runtime.runtime import grammar as grammar_module
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
    runtime.engine.turn_s = 0.0  # a new turn every step: the orders asserted below do not depend on timing
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


def test_batched_answers_under_a_thread_count_changing_every_step_equal_one_thread_alone(
        make_profile: Callable[..., Path], adapter_files: list[Path], alora_files: list[Path]) -> None:
    # Load never changes an answer: with a q8_0 KV cache (the shipped profiles') the governor may change the thread
    # count at any step, and eight requests batched four at a time under a governor that changes it before every
    # step get the tokens each one gets alone on one thread.
    answers = []
    for threads in (1, 2):
        profile = make_profile(f"q8-batching-{threads}", budget_mb=2048, ctx=1024, parallel=4, threads=threads,
                               kv_type="q8_0")
        runtime = Runtime(load_profile(str(profile)))
        try:
            for name, path in zip(["a", "b", "c", "d"], adapter_files):
                runtime.adapters.add(name, path)
            runtime.adapters.add("router", alora_files[0])
            requests = mixed_requests(runtime)
            if threads == 1:
                answers.append(run_alone(runtime, requests))
                continue
            runtime.engine.governor = alternating_governor(runtime.engine)
            answers.append([r.tokens for r in run_together(runtime, requests)])
            engine = runtime.engine
            assert engine.governor.changes > 20  # the count changed at (nearly) every step
            assert engine.decode_step_tokens > engine.decode_steps  # and the steps carried several sequences
        finally:
            runtime.close()
    assert answers[0] == answers[1]
    assert len({tuple(t) for t in answers[0]}) == len(answers[0])


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


def test_the_counters_tell_sequences_per_step_from_rows_per_llama_decode(smol: Runtime) -> None:
    # A step serves every decoding sequence of one set, but exact answers may need fewer rows per llama_decode:
    # f32 adapter weights on a LLAMAFILE build go one row at a time, SmolLM2's Q4_1 base batches on any build. The
    # status page and /metrics said "4 together" for both; decode_calls and last_batch_rows tell them apart.
    import llama_cpp

    llamafile = b"LLAMAFILE = 1" in llama_cpp.llama_print_system_info()
    prompts = ["Name a fruit.", "Name a river.", "Name a city.", "Name a tool."]
    engine = smol.engine
    for adapters, rows in (([], 4), ([Ad("c", 1.0)], 1 if llamafile else 4)):
        steps, tokens, calls = engine.decode_steps, engine.decode_step_tokens, engine.decode_calls
        requests: list[Request] = [(chat(smol, p), SamplingParams(max_tokens=12), adapters) for p in prompts]
        results = run_together(smol, requests)
        step_tokens, step_count = engine.decode_step_tokens - tokens, engine.decode_steps - steps
        assert step_tokens >= sum(len(r.tokens) - 1 for r in results)  # the first token came with the prompt batch
        assert step_count < step_tokens  # steps served several sequences either way
        assert engine.decode_calls - calls == (step_tokens if rows == 1 else step_count)
        assert engine.last_batch_rows == min(rows, engine.last_batch_size)
def test_a_long_sequence_over_an_f16_kv_cache_gets_the_same_logprobs_batched_as_alone(smol: Runtime) -> None:
    # With an f16 KV cache (the smol profile's) llama.cpp's CPU flash attention splits a lone query's 512+ cells
    # into per-thread chunks, and computes several sequences' queries unsplit: a request past position 256 got other
    # logits batched than alone (58 of 60 logprobs changed, by up to 0.02) until such a sequence decoded alone.
    assert smol.engine.settings.kv_type == "f16"
    document = " ".join(f"Line {i}: the river flows past the mill and the miller counts sacks of grain."
                        for i in range(22))
    long = chat(smol, document + "\nSummarise the text above.")
    assert len(long) > 400
    params = SamplingParams(max_tokens=40, logprobs=1)
    smol.engine.clear_cache()
    alone = smol.generate(long, params)[0]
    requests: list[Request] = [(long, params, []), (chat(smol, "Tell me a long story about a dragon."),
                                                    SamplingParams(max_tokens=120), []),
                               (chat(smol, "Name a colour."), SamplingParams(max_tokens=120), [])]
    smol.engine.clear_cache()
    steps, tokens = smol.engine.decode_steps, smol.engine.decode_step_tokens
    together = run_together(smol, requests)[0]
    assert together.tokens == alone.token_ids
    assert [e.logprob for c in together.chunks for e in c.logprobs] == [e.logprob for e in alone.logprobs]
    assert smol.engine.decode_step_tokens - tokens > smol.engine.decode_steps - steps  # the short ones batched


def test_a_short_prompt_after_a_long_one_sharing_its_start_gets_its_fresh_answer(smol: Runtime) -> None:
    # Hostile review of issue 19: with an f16 KV cache (the smol profile's) a short chat prompt reused the chat
    # template's first tokens from a long prompt's KV, computed in a large batch (flash attention tiles 64+
    # queries), and got other logprobs than fresh (-1.587 vs -1.524 at its first token).
    document = " ".join(f"Entry {i}: pump at station {i} reported pressure {(i * 7) % 50} bar at noon."
                        for i in range(40))
    long, short = chat(smol, document), chat(smol, "Tell me a story.")
    params = SamplingParams(max_tokens=24, logprobs=0)
    smol.engine.clear_cache()
    fresh = smol.generate(short, params)[0]
    smol.engine.clear_cache()
    smol.generate(long, SamplingParams(max_tokens=1))
    after = smol.generate(short, params)[0]
    assert after.token_ids == fresh.token_ids
    assert [e.logprob for e in after.logprobs] == [e.logprob for e in fresh.logprobs]
    again = smol.generate(short, params)[0]  # its own prefix, computed in its own class of batch, still serves it
    assert smol.engine.last_reused_tokens == len(short) - 2
    assert [e.logprob for e in again.logprobs] == [e.logprob for e in fresh.logprobs]


def test_each_client_on_its_own_adapter_gets_a_first_token_before_any_finishes(smol: Runtime) -> None:
    requests: list[Request] = [(chat(smol, "Describe the sea."), SamplingParams(max_tokens=20), [Ad(name)])
                               for name in ["a", "b", "c", "d"]]
    alone = run_alone(smol, requests)
    results = run_together(smol, requests)
    assert [r.tokens for r in results] == alone
    assert max(r.steps[0] for r in results) < min(r.steps[-1] for r in results)


def test_a_turn_keeps_one_adapter_set_applied_for_consecutive_steps(smol: Runtime) -> None:
    # Switching the applied set costs llama.cpp a graph reserve, so a turn serves one set for turn_s seconds. Turns
    # of a step each switch at nearly every step; endless turns serve each set until its request ends: the same
    # answers either way, with a switch per set instead of per step.
    requests: list[Request] = [(chat(smol, "Describe the sea."), SamplingParams(max_tokens=20), [Ad(name)])
                               for name in ["a", "b", "c", "d"]]
    alone = run_alone(smol, requests)
    switches = []
    try:
        for turn_s in (0.0, float("inf")):
            smol.engine.turn_s = turn_s
            before = smol.engine.switches
            results = run_together(smol, requests)
            assert [r.tokens for r in results] == alone
            switches.append(smol.engine.switches - before)
    finally:
        smol.engine.turn_s = 0.0
    assert switches[0] >= 4 * 20 - 4  # every decode step of four sets changed the applied set...
    assert switches[1] <= 4  # ...or only when one set's request ended
    # With endless turns the first set served had its whole answer before the last one served began.
    assert min(r.steps[-1] for r in results) < max(r.steps[0] for r in results)


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
    at_end: list[tuple[int, int]] = []  # (sequences running, requests not yet done) when the cancel reached its caller

    def deliver_to(index: int) -> Callable[[Chunk | BaseException], None]:
        def deliver(item: Chunk | BaseException) -> None:  # on the engine's thread, between its steps' work
            assert isinstance(item, Chunk)
            results[index].chunks.append(item)
            if len(results[index].chunks) == 3 and index == 1:
                cancels[1].set()  # the client went away after its third chunk
            if item.finish_reason == "cancelled":
                at_end.append((smol.engine.running_sequences, sum(not r.done.is_set() for r in results) - 1))
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
    # Its sequence was free before its caller heard of the end, while the others were still running.
    (running, others), = at_end
    assert running == others and others >= 1
    assert [results[i].tokens for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]
    assert smol.engine.running_sequences == 0
    assert all(version.users == 0 for adapter in smol.adapters._adapters.values()
               for version in [adapter.current] if version is not None)


@pytest.fixture
def slow_grammar(smol: Runtime, monkeypatch: pytest.MonkeyPatch) -> str:
    """A grammar whose tokens take llama.cpp's sampler seconds each (12 nested anyOf levels), let through the
    measure by a raised limit: what a grammar the measure misjudged would cost (as in test_grammar_bounds)."""
    monkeypatch.setattr(grammar_module, "MAX_STACK_WORK", 1 << 40)
    return smol.engine.json_grammar(nested_anyof(12))


def start_beside_others(runtime: Runtime, grammar_request: Request, cancel: threading.Event,
                        others: list[Request]) -> tuple[Collected, list[Collected]]:
    """Start a grammar request and ``others`` at one step boundary; the grammar request's results come first."""
    results = [Collected() for _ in range(1 + len(others))]

    def deliver_to(result: Collected) -> Callable[[Chunk | BaseException], None]:
        def deliver(item: Chunk | BaseException) -> None:
            result.steps.append(runtime.engine.steps)
            if isinstance(item, BaseException):
                result.error = item
            else:
                result.chunks.append(item)
            if isinstance(item, BaseException) or item.finish_reason is not None:
                result.done.set()
        return deliver

    with engine_paused(runtime.engine):
        for index, (prompt, params, adapters) in enumerate([grammar_request, *others]):
            runtime.start(prompt, params, adapters=adapters, cancel=cancel if index == 0 else threading.Event(),
                          deliver=deliver_to(results[index]))
    return results[0], results[1:]


def test_a_batched_grammar_request_ends_inside_its_token_when_cancelled(smol: Runtime, slow_grammar: str) -> None:
    # Issue 18's cancel inside a token, now beside other sequences: the cancelled sequence stops part-way through
    # its grammar work, within the decode step under way; the sequences decoded beside it are unchanged.
    others: list[Request] = [(chat(smol, "Name a fruit."), SamplingParams(max_tokens=12), []),
                             (chat(smol, "Name a river."), SamplingParams(max_tokens=12), [])]
    alone = run_alone(smol, others)
    slices, interrupts = smol.engine.grammar_slices, smol.engine.grammar_interrupts
    cancel = threading.Event()
    grammar_request: Request = (smol.engine.tokenize("["), SamplingParams(max_tokens=64, grammar=slow_grammar), [])
    mine, theirs = start_beside_others(smol, grammar_request, cancel, others)
    while smol.engine.grammar_slices == slices:  # its grammar work has begun (a hang guard below bounds the rest)
        assert not mine.done.wait(0.01)
    at_cancel_step = smol.engine.steps
    cancel.set()
    at_cancel = smol.engine.grammar_slices
    for result in (mine, *theirs):
        assert result.done.wait(3600)  # a guard against a hang only
    assert mine.error is None and mine.chunks[-1].finish_reason == "cancelled" and len(mine.tokens) < 64
    assert smol.engine.grammar_interrupts == interrupts + 1  # it stopped part-way through a token's vocabulary
    assert smol.engine.grammar_slices - at_cancel <= 1  # at most the slice under way when the cancel came
    assert mine.steps[-1] <= at_cancel_step + 1  # in the step under way, or at the next one's start
    assert [r.tokens for r in theirs] == alone and all(r.error is None for r in theirs)
    assert smol.engine.running_sequences == 0


def test_a_batched_grammar_request_past_its_deadline_ends_with_a_timeout(smol: Runtime, slow_grammar: str) -> None:
    others: list[Request] = [(chat(smol, "Name a city."), SamplingParams(max_tokens=12), []),
                             (chat(smol, "Name a tool."), SamplingParams(max_tokens=12), [Ad("a", 1.0)])]
    alone = run_alone(smol, others)
    smol.adapters.ensure_resident("a")
    interrupts = smol.engine.grammar_interrupts
    deadline = time.monotonic() + 3.0  # the slow grammar's first tokens take seconds each: it is passed inside one
    grammar_request: Request = (smol.engine.tokenize("["),
                                SamplingParams(max_tokens=64, grammar=slow_grammar, deadline=deadline), [])
    mine, theirs = start_beside_others(smol, grammar_request, threading.Event(), others)
    while time.monotonic() <= deadline:
        time.sleep(0.05)
    past_deadline_step = smol.engine.steps  # a step at or after the one under way when the deadline passed
    for result in (mine, *theirs):
        assert result.done.wait(3600)  # a guard against a hang only
    assert isinstance(mine.error, GenerationTimeout) and mine.error.http_status == 504
    assert mine.error.completion_tokens == len(mine.tokens) < 64
    assert smol.engine.grammar_interrupts == interrupts + 1
    assert mine.steps[-1] <= past_deadline_step + 1
    assert [r.tokens for r in theirs] == alone and all(r.error is None for r in theirs)
    assert smol.engine.running_sequences == 0


def test_the_decode_pace_counts_every_sequences_decoded_tokens_once(smol: Runtime) -> None:
    # The busy-device pace (#20) counted tokens between one stream's chunks; with sequences decoded together it is
    # fed by the engine's decode steps: each generated token after a request's first (sampled with its prompt) once.
    assert smol.engine.on_decode_step == smol.pace.step
    steps: list[tuple[int, float]] = []
    smol.engine.on_decode_step = lambda tokens, seconds: steps.append((tokens, seconds))
    try:
        requests: list[Request] = [(chat(smol, f"Count to {n}."), SamplingParams(max_tokens=6), []) for n in range(4)]
        results = run_together(smol, requests)
    finally:
        smol.engine.on_decode_step = smol.pace.step
    assert [r.chunks[-1].finish_reason for r in results] == ["length"] * 4  # so each had 5 decode steps
    assert sum(tokens for tokens, _ in steps) == sum(len(r.tokens) - 1 for r in results) == 4 * 5
    assert max(tokens for tokens, _ in steps) > 1 and all(seconds > 0 for _, seconds in steps)


def test_more_requests_than_slots_wait_and_all_finish(smol: Runtime) -> None:
    requests: list[Request] = [(chat(smol, f"Count to {n}."), SamplingParams(max_tokens=6), []) for n in range(10)]
    results = run_together(smol, requests)
    assert [len(r.tokens) for r in results] == [6] * 10
    assert [r.chunks[-1].finish_reason for r in results] == ["length"] * 10


def gemma_alora(runtime: Runtime, gemma_model: Path, folder: Path) -> Path:
    """A Gemma 3 270M aLoRA (all linear layers, rank 16, f32, a gain of 3 so that it visibly changes greedy output)
    invoked by "\nAnswer:", converted from a PEFT folder as a user would."""
    from peft_dirs import GEMMA_SHAPES, lora_tensors, write_peft_dir

    from converters import convert_peft_to_gguf

    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    tensors = {k: v * 3 for k, v in lora_tensors(linear, rank=16, layers=range(18), seed=120,
                                                   shapes=GEMMA_SHAPES).items()}
    invocation = runtime.engine.tokenize("\nAnswer:", add_bos=False)
    peft_dir = write_peft_dir(folder / "peft-gemma-router", tensors=tensors, r=16, lora_alpha=32,
                              target_modules=linear, base_model_name_or_path="google/gemma-3-270m",
                              alora_invocation_tokens=invocation)
    return convert_peft_to_gguf(peft_dir, base=gemma_model, output=folder / "gemma-router.gguf",
                                outtype="f32").output


def test_same_answers_alone_and_batched_on_gemma(make_profile: Callable[..., Path], gemma_model: Path,
                                                 gemma_adapter_files: list[Path], tmp_path: Path) -> None:
    profile = load_profile(str(make_profile("gemma-batching", budget_mb=2048, ctx=1024, parallel=4)))
    runtime = Runtime(profile, model=gemma_model)
    try:
        runtime.adapters.add("legal", gemma_adapter_files[0])
        runtime.adapters.add("brand", gemma_adapter_files[1])
        runtime.adapters.add("router", gemma_alora(runtime, gemma_model, tmp_path))
        grammar = runtime.engine.json_grammar()

        def text(words: str) -> list[int]:  # this GGUF carries no chat template: plain prompts
            return runtime.engine.tokenize(words)

        question = "The river towns traded salt, wool and timber along the valley. Where did the timber go?\nAnswer:"

        requests: list[Request] = [
            (text("Three things a drone needs are"), GREEDY, []),
            (text("A haiku about rivers:"), GREEDY, [Ad("legal", 1.0)]),
            (text("The capital of France is"), GREEDY, [Ad("legal", 1.0)]),
            (text("A person as JSON:"), SamplingParams(max_tokens=24, grammar=grammar), [Ad("brand", 1.0)]),
            (text("Once upon a time"), SamplingParams(max_tokens=24, temperature=0.9, seed=3), []),
            (text("The history of the region begins with"), GREEDY, []),
            (text("Rivers and towns:"), GREEDY, []),
            (text(question), GREEDY, []),  # the base model and an aLoRA over one prompt: its part before the
            (text(question), GREEDY, [Ad("router", 1.0)]),  # invocation is computed once, shared between them
        ]
        alone = run_alone(runtime, requests)
        together = run_together(runtime, requests)
        assert [r.tokens for r in together] == alone
        assert len({tuple(t) for t in alone}) == len(alone)  # the aLoRA's answer is not the base model's
        # The aLoRA request, admitted last, took the prompt's part before its invocation from the base request's KV
        # (copied with seq_cp, or in the slot the base request left): only the invocation's few tokens were its own.
        assert runtime.engine.last_reused_tokens >= len(text(question)) - 8
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
    # A turn that still has time goes on while its set has work, whoever else waits; then the least recent set.
    assert next_turn({"busy": 0, "late": 5}, {"busy": 7, "late": 6}, current="busy") == "busy"
    assert next_turn({"late": 5}, {"busy": 7, "late": 6}, current="busy") == "late"
    assert next_turn({"busy": 0, "late": 5}, {"busy": 7, "late": 6}) == "late"
