"""Answers never depend on load: llama.cpp's results are the same at every thread count where edge-rt changes it,
and the one llama.cpp operation whose result depends on it is pinned down.

llama.cpp's CPU flash attention decodes one token over an f16 (or f32) KV cache of 512 cells or more by splitting
the cells into one chunk per thread and merging the partial softmaxes (``ggml_compute_forward_flash_attn_ext_f16``'s
split-KV path): 1 and 2 threads round differently there, and only there. A quantised KV cache never takes that
path, so with one every step gives the same bits at any thread count, and the engine's governor may shed threads
while the device is busy; with an f16 cache the thread count stays fixed.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from scripted_governor import alternating_governor

from edge_runtime.profiles import load_profile
from edge_runtime.runtime.core import Runtime
from edge_runtime.runtime.engine import Engine, SamplingParams
from edge_runtime.runtime.plan import EngineSettings
from edge_runtime.runtime.requests import AdapterRequest

LOG = "The maintenance log of drone 7 lists battery swaps, motor checks and firmware updates. "
SPIN = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end: pass"


def greedy(engine: Engine, prompt: list[int], adapters: tuple = (), tokens: int = 16) -> tuple[list[int], list[float]]:
    result = engine.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0.0, logprobs=1), adapters=adapters)
    return result.token_ids, [entry.logprob for entry in result.logprobs]


def test_only_flash_attention_past_512_kv_cells_depends_on_the_thread_count(base_model: Path) -> None:
    outputs = {}
    for threads in (1, 2):
        engine = Engine(base_model, EngineSettings(n_ctx=2048, n_threads=threads))
        assert not engine.governor.enabled  # an f16 cache: the count is fixed
        try:
            short, long = engine.tokenize(LOG * 2), engine.tokenize(LOG * 40)
            assert len(short) + 16 <= 256 and len(long) > 512  # KV views of 256 and of >= 768 cells
            outputs[threads] = (greedy(engine, short), greedy(engine, long))
        finally:
            engine.close()
    (short_1, long_1), (short_2, long_2) = outputs[1], outputs[2]
    assert short_1 == short_2  # tokens and their log-probabilities, bit for bit
    assert long_1[1] != long_2[1]  # the split-KV decode rounds otherwise: the reason threads are fixed


@pytest.fixture(params=["smollm2", "gemma"])
def model_and_adapter(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    if request.param == "smollm2":
        return request.getfixturevalue("base_model"), request.getfixturevalue("adapter_files")[0]
    return request.getfixturevalue("gemma_model"), request.getfixturevalue("gemma_adapter_files")[0]


def test_a_quantised_kv_cache_gives_the_same_bits_at_every_thread_count_and_across_changes(
        model_and_adapter: tuple[Path, Path]) -> None:
    # Tokens and log-probabilities, bit for bit: fixed 1 thread, fixed 2 threads, and 2 threads whose governor
    # changes the count at every step; short and long prompts (a KV view of 256 and of >= 768 cells), with and
    # without an adapter, on both models.
    model, adapter = model_and_adapter
    outputs = []
    for threads, alternate in ((1, False), (2, False), (2, True)):
        engine = Engine(model, EngineSettings(n_ctx=2048, n_threads=threads, kv_type="q8_0"))
        try:
            assert engine.governor.enabled == (threads > 1)
            if alternate:
                engine.governor = alternating_governor(engine)
            handle = engine.load_adapter(adapter, content_id="a")
            short, long = engine.tokenize(LOG * 2), engine.tokenize(LOG * 40)
            assert len(short) + 16 <= 256 and len(long) > 512
            answers = []
            for adapters in ((), ((handle, 1.0),)):
                answers += [greedy(engine, short, adapters), greedy(engine, long, adapters)]
            if alternate:  # it really changed the count before every step but each generation's first
                steps = engine.governor._read.count  # type: ignore[attr-defined]
                assert steps > 4 * 8 and engine.governor.changes == steps - 4
            outputs.append(answers)
        finally:
            engine.close()
    assert outputs[0] == outputs[1] == outputs[2]
    assert len({tuple(tokens) for tokens, _ in outputs[0]}) == 4  # the adapter changes both answers


@contextmanager
def busy_neighbours(count: int) -> Iterator[None]:
    """``count`` CPU-bound processes beside the test (each ends by itself after 10 minutes at the latest)."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]
    try:
        yield
    finally:
        for process in spinners:
            process.kill()
            process.wait()


@contextmanager
def tokenizing(runtime: Runtime) -> Iterator[None]:
    """A megabyte-class tokenization looping beside the generation, as a queued request's body would be."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            runtime.engine.tokenize(LOG * 2000)

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_greedy_answers_are_the_same_alone_and_beside_busy_processes(
        model_and_adapter: tuple[Path, Path], make_profile: Callable[..., Path], kv_type: str) -> None:
    # f16: the thread count stays fixed; q8_0: the governor sheds threads beside the busy processes (one per usable
    # core, so the engine's threads must wait for a CPU) and the answers stay the same.
    model, adapter = model_and_adapter
    profile = make_profile(f"threads-{kv_type}", budget_mb=2048, threads=2, kv_type=kv_type)
    runtime = Runtime(load_profile(str(profile)), model=model)
    governor = runtime.engine.governor
    try:
        runtime.adapters.add("a", adapter)
        prompts = [runtime.engine.tokenize(LOG * 2), runtime.engine.tokenize(LOG * 40)]  # KV < 256 and > 512 cells
        cases = [(prompt, adapters) for prompt in prompts for adapters in ([], [AdapterRequest("a", 1.0)])]

        def answers() -> list[list[int]]:
            params = SamplingParams(max_tokens=8, temperature=0.0)
            return [runtime.generate(prompt, params, adapters=adapters)[0].token_ids for prompt, adapters in cases]

        alone = answers()
        shed_before = governor.shed_steps
        with busy_neighbours(max(2, runtime.cores.usable)):
            beside_neighbours = answers()
        shed_beside = governor.shed_steps - shed_before
        with tokenizing(runtime):
            beside_tokenization = answers()
        assert runtime.engine.threads == min(2, runtime.cores.usable)
    finally:
        runtime.close()
    assert governor.enabled == (kv_type == "q8_0" and runtime.engine.threads > 1)
    if governor.enabled:
        assert shed_beside > 0 and governor.changes >= 1  # it did run fewer threads while the device was busy
    else:
        assert governor.shed_steps == 0 and governor.changes == 0
    assert beside_neighbours == alone and beside_tokenization == alone
    assert len({tuple(tokens) for tokens in alone}) == 4  # the adapter changes both answers: a mix-up could not hide
