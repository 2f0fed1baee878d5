"""Grammar work is bounded: what llama.cpp's sampler would keep is measured before a grammar is accepted, and a
deadline or a cancel ends even a token whose grammar work would take minutes. Real llama.cpp on SmolLM2."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
from schemas import nested_anyof
from llama_cpp import llama_grammar

from edge_runtime.errors import GenerationTimeout, GrammarTooComplex
from edge_runtime.runtime import activation
from edge_runtime.runtime import grammar as grammar_module
from edge_runtime.runtime.engine import Engine, EngineSettings
from edge_runtime.runtime.generation import Chunk, SamplingParams
from edge_runtime.runtime.grammar import parse_stack_peak, stack_limit


@pytest.fixture(scope="module")
def engine(base_model: Path) -> Iterator[Engine]:
    running = Engine(base_model, EngineSettings(n_ctx=512, n_threads=2))
    yield running
    running.close()


def raw_grammar(schema: dict[str, Any]) -> str:
    return llama_grammar.json_schema_to_gbnf(json.dumps(schema))


def test_the_22_level_nested_anyof_schema_is_refused_with_a_typed_error(engine: Engine) -> None:
    # Issue 18 item 1: it passed every check, then held the one generation worker for hours (26 s/token at level 13).
    schema = nested_anyof(22)
    assert 3000 < len(json.dumps(schema)) < 5000  # the 4 KB of the report
    with pytest.raises(GrammarTooComplex) as refused:
        engine.json_grammar(schema)
    assert refused.value.param == "response_format" and refused.value.http_status == 400
    assert refused.value.stacks > refused.value.limit == stack_limit(engine.n_vocab)
    assert "anyOf/oneOf branches start differently" in str(refused.value)


def test_a_long_unambiguous_prefix_does_not_hide_the_nested_anyof_from_the_measure(engine: Engine) -> None:
    # From the hostile review of #18: 14 enums of 10 random 20-letter strings before the 22-level schema used up the
    # search's bounds from the root (peak 11, search cut off), so the schema was accepted and a token took 37 s.
    import random

    rng = random.Random(1)
    schema = nested_anyof(22)
    properties: dict[str, Any] = {
        f"p{i}": {"enum": ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(20)) for _ in range(10)]}
        for i in range(14)
    }
    properties["b"] = {"$ref": "#/$defs/l22"}
    hidden = {"$defs": schema["$defs"], "type": "object", "properties": properties, "required": sorted(properties)}
    parser = grammar_module._GbnfParser(raw_grammar(hidden))
    rules = parser.parse()
    limit = stack_limit(engine.n_vocab)
    from_root, complete = grammar_module._explore(  # what the measure saw before: the search from the root alone
        rules, parser.names["root"], stop_at=limit + 1, states=grammar_module.EXPLORE_STATES,
        budget=[grammar_module.EXPLORE_WORK])
    assert from_root <= limit and not complete  # cut off by its bounds before the costly part
    with pytest.raises(GrammarTooComplex) as refused:
        engine.json_grammar(hidden)
    assert refused.value.stacks > refused.value.limit == limit


def test_long_repetitions_within_the_limits_are_measured_not_a_500(engine: Engine) -> None:
    # From the hostile review of #18: maxItems 600 or maxLength 500 made the GBNF parser recurse past Python's frame
    # limit (RecursionError: a 500 to the client) although both are within MAX_REPEAT.
    for schema in ({"type": "array", "items": {"type": "integer"}, "maxItems": 600},
                   {"type": "object", "properties": {"a": {"type": "string", "maxLength": 1000}}}):
        assert "root ::=" in engine.json_grammar(schema)


def test_each_level_of_nesting_doubles_the_parse_states_the_measure_finds() -> None:
    peaks = [parse_stack_peak(raw_grammar(nested_anyof(levels)), stop_at=10**6)[0] for levels in range(1, 6)]
    assert [b / a for a, b in zip(peaks, peaks[1:])] == [2.0, 2.0, 2.0, 2.0], peaks


def test_an_enum_of_1800_strings_sharing_a_prefix_is_refused_and_a_short_one_is_served(engine: Engine) -> None:
    # Issue 18 item 1: 400 ms/token (0.2 ms without a grammar) with every value one parse stack.
    with pytest.raises(GrammarTooComplex) as refused:
        engine.json_grammar({"enum": [f"customer-account-{i:04d}" for i in range(1800)]})
    assert refused.value.stacks >= 1800
    grammar = engine.json_grammar({"enum": [f"customer-account-{i:04d}" for i in range(40)]})
    prompt = engine.chat_prompt([{"role": "user", "content": "Pick an account."}])
    result = engine.generate(prompt, SamplingParams(max_tokens=20, grammar=grammar))
    assert json.loads(result.text) in {f"customer-account-{i:04d}" for i in range(40)}


ORDINARY = {"type": "object", "required": ["name", "tags", "address"], "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    "kind": {"enum": ["person", "company", "other"]},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string",
                                                                                   "pattern": "^[0-9]{5}$"}}},
    "score": {"anyOf": [{"type": "number"}, {"type": "null"}]}}}


def test_ordinary_grammars_stay_far_below_the_limit() -> None:
    limit = stack_limit(49152)
    for grammar in (llama_grammar.JSON_GBNF, raw_grammar(ORDINARY)):
        peak, _ = parse_stack_peak(grammar, stop_at=limit + 1)
        assert peak <= limit // 4, peak


def test_accepted_grammars_give_the_answers_llama_cpps_own_grammar_sampler_gives(engine: Engine) -> None:
    # The engine applies the grammar in slices of the vocabulary (so a cancel can end a token), before the sampler
    # chain; the masks are llama.cpp's own, so greedy and seeded answers are those of one llama.cpp chain with the
    # grammar in it (as llama-cpp-python's Llama.generate(grammar=...) builds it), sampled by llama_sampler_sample.
    prompt = engine.chat_prompt([{"role": "user", "content": "Describe a customer as JSON."}])
    for schema, params in ((None, SamplingParams(max_tokens=48)), (ORDINARY, SamplingParams(max_tokens=64)),
                           (ORDINARY, SamplingParams(max_tokens=48, temperature=0.9, seed=7, top_p=0.9))):
        grammar = engine.json_grammar(schema)
        engine.clear_cache()  # both evaluate the whole prompt (a reused prefix may round differently)
        ours = engine.generate(prompt, dataclasses.replace(params, grammar=grammar))
        theirs = engine._call(_llama_cpp_grammar_tokens, engine, prompt, params, grammar, len(ours.token_ids))
        assert ours.token_ids == theirs and len(theirs) > 5


def _llama_cpp_grammar_tokens(engine: Engine, prompt: list[int], params: SamplingParams, grammar: str,
                              count: int) -> list[int]:
    """Tokens of llama.cpp's own chain (penalties, grammar, then greedy or top-k/typical/top-p/min-p/temp/dist),
    sampled with llama_sampler_sample in a free sequence of the engine's context."""
    engine._clear_cache()
    slot = next(s for s in engine._slots if s.owner is None)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    add(chain, llama_cpp.llama_sampler_init_penalties(engine.n_vocab, 64, 1.0, params.frequency_penalty,
                                                      params.presence_penalty))
    add(chain, llama_cpp.llama_sampler_init_grammar(engine._vocab, grammar.encode(), b"root"))
    if params.temperature == 0.0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
        add(chain, llama_cpp.llama_sampler_init_typical(1.0, 1))
        add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        add(chain, llama_cpp.llama_sampler_init_min_p(0.0, 1))
        add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
        add(chain, llama_cpp.llama_sampler_init_dist(params.seed))
    try:
        for start, stop in activation.batches(0, len(prompt), engine._prompt_batch):
            engine._decode([(slot.seq_id, pos, prompt[pos], pos == len(prompt) - 1) for pos in range(start, stop)])
        tokens: list[int] = []
        while len(tokens) < count:
            tokens.append(int(llama_cpp.llama_sampler_sample(chain, engine._ctx.ctx, -1)))
            engine._decode([(slot.seq_id, len(prompt) + len(tokens) - 1, tokens[-1], True)])
        return tokens
    finally:
        llama_cpp.llama_sampler_free(chain)
        engine._truncate(slot, 0)


@pytest.fixture
def slow_grammar(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> str:
    """A grammar whose first tokens take llama.cpp's sampler seconds each (12 nested levels), let through the measure
    by a raised limit: what a grammar the measure misjudged would cost."""
    monkeypatch.setattr(grammar_module, "MAX_STACK_WORK", 1 << 40)
    return engine.json_grammar(nested_anyof(12))


def test_a_deadline_ends_a_generation_inside_a_token_and_the_engine_serves_the_next(engine: Engine,
                                                                                    slow_grammar: str) -> None:
    prompt = engine.tokenize("[")
    interrupts = engine.grammar_interrupts
    with pytest.raises(GenerationTimeout) as late:  # the deeper the nesting, the slower each token: it is reached
        engine.generate(prompt, SamplingParams(max_tokens=64, grammar=slow_grammar, deadline=time.monotonic() + 0.5))
    assert late.value.completion_tokens < 64 and late.value.http_status == 504
    assert engine.grammar_interrupts == interrupts + 1  # it stopped part-way through the vocabulary
    assert engine.generate(prompt, SamplingParams(max_tokens=3)).completion_tokens == 3


def test_a_cancel_frees_the_worker_within_the_token_being_sampled(engine: Engine, slow_grammar: str) -> None:
    # A disconnect did not free the worker: cancellation was checked between tokens only (SIGTERM took 36 s).
    cancel = threading.Event()
    chunks: list[Chunk] = []
    slices = engine.grammar_slices
    interrupts = engine.grammar_interrupts

    def run() -> None:
        chunks.extend(engine.stream(engine.tokenize("["), SamplingParams(max_tokens=64, grammar=slow_grammar),
                                    cancel=cancel))

    worker = threading.Thread(target=run)
    worker.start()
    while engine.grammar_slices == slices:  # the grammar work has begun
        time.sleep(0.01)
    cancel.set()
    at_cancel = engine.grammar_slices
    worker.join(timeout=600)
    assert not worker.is_alive()
    assert chunks[-1].finish_reason == "cancelled" and len(chunks) < 64  # (how many tokens came first: the path's)
    assert engine.grammar_interrupts == interrupts + 1  # it stopped part-way through a token's vocabulary
    assert engine.grammar_slices - at_cancel <= 1  # at most the slice under way when the cancel came
    assert engine.generate(engine.tokenize("Hi"), SamplingParams(max_tokens=2)).completion_tokens == 2
