"""The memory plan on Gemma 3 270M: sliding-window KV layers, a 262k vocabulary, Q4_K_M weights.

llama.cpp's own buffer sizes pin the KV term; the whole plan is checked against the RSS of a fresh process that
loads Gemma through the runtime, fills a micro-batch and generates with adapters (tests/rss_probe.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_budget import run_probe

from edge_runtime.gguf.header import read_header
from edge_runtime.profiles import load_profile
from edge_runtime.runtime import budget
from edge_runtime.runtime.plan import plan_for

MIB = 1 << 20
# llama.cpp's context log, one line per KV cache (iSWA: one for the 3 global layers, one for the 15 sliding ones).
_KV_LINE = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB \( *(\d+) cells, +(\d+) layers")
_LLAMA_KV_SIZES = """
import sys, llama_cpp, gguf
kv = gguf.GGMLQuantizationType[sys.argv[3].upper()].value
llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=1, n_threads_batch=1, flash_attn=True,
                type_k=kv, type_v=kv, use_mmap=True, verbose=True)
"""


def llama_cpp_kv_caches(model: Path, ctx: int, kv_type: str) -> list[tuple[float, int, int]]:
    """(MiB, cells, layers) of each KV cache llama.cpp creates for a context like the engine's."""
    completed = subprocess.run([sys.executable, "-c", _LLAMA_KV_SIZES, str(model), str(ctx), kv_type],
                               capture_output=True, text=True, timeout=300, check=True)
    return [(float(m[1]), int(m[2]), int(m[3])) for m in _KV_LINE.finditer(completed.stderr)]


def test_gemma_shape_is_read_from_its_header(gemma_model: Path) -> None:
    shape = budget.model_shape(gemma_model)
    # 18 layers, 1 KV head of 256 (K) + 256 (V), hidden 640, MLP 2048, Gemma 3's 262,144-token vocabulary.
    assert (shape.architecture, shape.n_layers, shape.kv_width) == ("gemma3", 18, 512)
    assert (shape.n_embd, shape.n_ff, shape.n_vocab, shape.context_length) == (640, 2048, 262144, 32768)
    assert shape.tensor_bytes == sum(t.n_bytes for t in read_header(gemma_model).tensors) == 246_587_904
    # Its 27 Q4_K tensors (12.7 MiB) get a second, repacked copy for llama.cpp's AVX2 kernels; no BPE merges.
    assert (shape.repacked_bytes, shape.n_merges) == (13_271_040, 0)


@pytest.mark.parametrize("ctx, kv_type", [(2048, "f16"), (4096, "q8_0")])
def test_kv_cache_term_equals_llama_cpp_caches_sliding_window_layers_included(gemma_model: Path, ctx: int,
                                                                               kv_type: str) -> None:
    caches = llama_cpp_kv_caches(gemma_model, ctx, kv_type)
    # Two caches (global layers 5, 11, 17 and the 15 sliding-window ones), both ctx cells: the full-size SWA cache.
    assert sorted(layers for _, _, layers in caches) == [3, 15]
    assert {cells for _, cells, _ in caches} == {ctx}
    predicted = budget.kv_cache_bytes(budget.model_shape(gemma_model), ctx, kv_type) / MIB
    assert predicted == pytest.approx(sum(mib for mib, _, _ in caches), abs=0.02)
    assert budget.kv_cache_bytes(budget.model_shape(gemma_model), 2048, "f16") == 36 * MIB


def test_compute_term_counts_the_mask_and_the_vocabulary(gemma_model: Path) -> None:
    shape = budget.model_shape(gemma_model)
    activations = 512 * (16 + 12) * (640 + 2048)
    assert budget.compute_bytes(shape, 512, 2048) == activations + 2048 * 512 * 2 + 262144 * 28  # 43 MiB
    assert budget.compute_bytes(shape, 512, 8192) - budget.compute_bytes(shape, 512, 2048) == 6 * MIB


@pytest.mark.parametrize("ctx", [2048, 8192])
def test_gemma_plan_never_under_predicts_measured_rss(make_profile: Callable[..., Path], gemma_model: Path,
                                                      gemma_adapter_files: list[Path], ctx: int) -> None:
    profile = make_profile(f"gemma-{ctx}", budget_mb=2048, ctx=ctx, threads=1)
    result = run_probe(profile, gemma_adapter_files, model=gemma_model)
    plan = result["plan"]
    assert plan == plan_for(load_profile(str(profile)), gemma_model).as_dict()
    assert result["long_prompt_tokens"] >= 512  # a full micro-batch touched the compute buffers
    assert result["resident_adapter_bytes"] == sum(budget.adapter_resident_bytes(p) for p in gemma_adapter_files)
    # The probe serves no HTTP: the plan's request buffers (for the daemon's request bodies) stay unused.
    predicted = plan["fixed_bytes"] - plan["request_buffer_bytes"] + result["resident_adapter_bytes"]
    measured = max(result["final_rss_bytes"], result["peak_rss_bytes"])
    assert measured <= predicted <= 1.10 * measured, (measured / MIB, predicted / MIB)
    assert all(texts[0] != result["base_text"] for texts in result["outputs"].values())
