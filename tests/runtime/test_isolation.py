"""KV isolation: what was computed under one adapter set never serves another, even under the same name."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_runtime.profiles import load_profile
from edge_runtime.runtime.core import Runtime
from edge_runtime.runtime.engine import SamplingParams
from edge_runtime.runtime.requests import AdapterRequest

AdapterSpec = tuple[str, float]  # (name, scale): the test data, made AdapterRequests where they run


def adapter_requests(spec: list[AdapterSpec]) -> list[AdapterRequest]:
    return [AdapterRequest(name, scale) for name, scale in spec]

GREEDY = SamplingParams(max_tokens=12)
MESSAGES = [{"role": "user", "content": "List three things a drone needs."}]


@pytest.fixture(scope="module")
def profile_path(make_profile: Callable[..., Path]) -> Path:
    return make_profile("isolation", budget_mb=1024, ctx=512, parallel=4)  # four slots: reuse picks among them


def fresh_output(profile_path: Path, files: dict[str, Path], spec: list[AdapterSpec]) -> str:
    """Greedy output of a brand-new runtime that only ever ran ``spec``."""
    runtime = Runtime(load_profile(str(profile_path)))
    try:
        for name, path in files.items():
            runtime.adapters.add(name, path)
        return runtime.generate(runtime.engine.chat_prompt(MESSAGES), GREEDY, adapters=adapter_requests(spec))[0].text
    finally:
        runtime.close()


@pytest.fixture
def runtime(profile_path: Path) -> Iterator[Runtime]:
    rt = Runtime(load_profile(str(profile_path)))
    yield rt
    rt.close()


def test_switching_adapters_never_reuses_kv_cache(runtime: Runtime, profile_path: Path,
                                                  adapter_files: list[Path]) -> None:
    files = {"a": adapter_files[0], "b": adapter_files[1]}
    for name, path in files.items():
        runtime.adapters.add(name, path)
    sequence: list[list[AdapterSpec]] = [[], [("a", 1.0)], [("b", 1.0)], [("a", 1.0)], [("a", 0.5), ("b", 0.5)], []]
    prompt = runtime.engine.chat_prompt(MESSAGES)
    interleaved = [runtime.generate(prompt, GREEDY, adapters=adapter_requests(spec))[0].text for spec in sequence]
    fresh = {str(spec): fresh_output(profile_path, files, spec) for spec in sequence}
    assert interleaved == [fresh[str(spec)] for spec in sequence]
    assert len(set(interleaved)) == 4  # base, a, b and a+b all differ: a mix-up could not hide


def test_prefix_reuse_is_kept_under_the_same_adapter_set_only(runtime: Runtime, adapter_files: list[Path]) -> None:
    runtime.adapters.add("a", adapter_files[0])
    prompt = runtime.engine.chat_prompt(MESSAGES)
    runtime.generate(prompt, GREEDY, adapters=[AdapterRequest("a", 1.0)])
    runtime.generate(prompt, GREEDY, adapters=[AdapterRequest("a", 1.0)])
    assert runtime.engine.last_reused_tokens == len(prompt) - 2
    # The same adapter at another scale is another computation.
    runtime.generate(prompt, GREEDY, adapters=[AdapterRequest("a", 0.5)])
    assert runtime.engine.last_reused_tokens == 0
    runtime.generate(prompt, GREEDY)
    assert runtime.engine.last_reused_tokens == 0


def test_new_version_under_the_same_name_never_reuses_old_kv(runtime: Runtime, profile_path: Path,
                                                             adapter_files: list[Path], tmp_path: Path) -> None:
    deployed = tmp_path / "assistant.gguf"
    shutil.copy(adapter_files[0], deployed)
    runtime.adapters.add("assistant", deployed)
    prompt = runtime.engine.chat_prompt(MESSAGES)
    old = runtime.generate(prompt, GREEDY, adapters=[AdapterRequest("assistant", 1.0)])[0].text
    # A new version is published under the same name: same prompt, same name, different content.
    assert runtime.adapters.evict("assistant")
    shutil.copy(adapter_files[1], deployed)
    runtime.adapters.add("assistant", deployed)
    new = runtime.generate(prompt, GREEDY, adapters=[AdapterRequest("assistant", 1.0)])[0].text
    assert runtime.engine.last_reused_tokens == 0
    assert new != old
    assert new == fresh_output(profile_path, {"assistant": adapter_files[1]}, [("assistant", 1.0)])


def test_streamed_text_equals_generated_text(runtime: Runtime, adapter_files: list[Path]) -> None:
    runtime.adapters.add("a", adapter_files[2])
    prompt = runtime.engine.chat_prompt(MESSAGES)
    whole = runtime.generate(prompt, GREEDY, adapters=[AdapterRequest("a", 1.0)])[0]
    chunks = list(runtime.stream(prompt, GREEDY, adapters=[AdapterRequest("a", 1.0)]))
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason == "length"
    assert sum(len(c.token_ids) for c in chunks) == whole.completion_tokens == 12


def test_seeded_sampling_repeats_and_differs_across_seeds(runtime: Runtime) -> None:
    prompt = runtime.engine.chat_prompt(MESSAGES)

    def sample(seed: int) -> str:
        return runtime.generate(prompt, SamplingParams(max_tokens=16, temperature=1.2, top_p=0.95, top_k=50,
                                                       seed=seed))[0].text

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_stop_strings_end_generation_before_the_stop_text(runtime: Runtime) -> None:
    prompt = runtime.engine.chat_prompt(MESSAGES)
    full = runtime.generate(prompt, SamplingParams(max_tokens=24))[0].text
    stop = full[5:8]
    stopped = runtime.generate(prompt, SamplingParams(max_tokens=24, stop=(stop,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full[: full.index(stop)]


def test_closing_a_stream_cancels_the_generation(runtime: Runtime) -> None:
    prompt = runtime.engine.chat_prompt(MESSAGES)
    before = runtime.engine.decoded_tokens
    stream = runtime.stream(prompt, SamplingParams(max_tokens=200))
    first = next(stream)
    stream.close()
    assert first.finish_reason is None
    # The next request runs after the cancelled one stopped: it decoded a few tokens, not the 200 asked for.
    assert runtime.generate(prompt, SamplingParams(max_tokens=3))[0].completion_tokens == 3
    assert runtime.engine.decoded_tokens - before < 20
