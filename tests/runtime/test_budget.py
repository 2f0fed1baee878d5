"""The memory plan predicts measured RSS, and a running runtime stays inside its profile's budget.

RSS is measured in a fresh process (tests/rss_probe.py) so the test runner's own memory does not count.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.gguf.header import read_header
from edge_runtime.profiles import load_profile
from edge_runtime.runtime import budget
from edge_runtime.runtime.plan import plan_for

MIB = 1 << 20
PROBE = Path(__file__).parent.parent / "rss_probe.py"


def run_probe(profile: Path, adapters: list[Path], *, rounds: int = 1, model: Path | None = None) -> dict[str, Any]:
    model_args = [] if model is None else ["--model", str(model)]
    completed = subprocess.run([sys.executable, str(PROBE), "--profile", str(profile), "--rounds", str(rounds),
                                *model_args, *map(str, adapters)], capture_output=True, text=True, timeout=600,
                               check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def test_kv_cache_term_is_llama_cpp_formula_for_smollm2(base_model: Path) -> None:
    shape = budget.model_shape(base_model)
    # 30 layers × (3 KV heads × (64 + 64)) × 2048 tokens × 2 bytes = 45 MiB, what llama.cpp reports.
    assert (shape.n_layers, shape.kv_width, shape.n_vocab) == (30, 384, 49152)
    assert budget.kv_cache_bytes(shape, 2048, "f16") == 45 * MIB
    assert budget.kv_cache_bytes(shape, 2048, "q8_0") == int(2048 * 30 * 384 * 34 / 32)
    assert shape.tensor_bytes == sum(t.n_bytes for t in read_header(base_model).tensors)


@pytest.mark.parametrize("parallel", [1, 4])
def test_plan_predicts_measured_rss_within_ten_percent(make_profile: Callable[..., Path], adapter_files: list[Path],
                                                       parallel: int) -> None:
    profile = make_profile(f"roomy-{parallel}", budget_mb=1024, parallel=parallel)
    result = run_probe(profile, adapter_files[:3])
    # The probe serves no HTTP: the plan's request buffers (for the daemon's request bodies) stay unused.
    plan = result["plan"]
    predicted = plan["fixed_bytes"] - plan["request_buffer_bytes"] + result["resident_adapter_bytes"]
    assert result["long_prompt_tokens"] >= 512  # a full micro-batch touched the compute buffers
    assert result["resident_adapter_bytes"] == sum(budget.adapter_resident_bytes(p) for p in adapter_files[:3])
    measured = max(result["final_rss_bytes"], result["peak_rss_bytes"])
    assert measured <= predicted <= 1.10 * measured, (measured / MIB, predicted / MIB)


def test_churn_through_more_adapters_than_fit_stays_under_budget(base_model: Path, make_profile: Callable[..., Path],
                                                                  adapter_files: list[Path]) -> None:
    fits = 2
    adapter_bytes = budget.adapter_resident_bytes(adapter_files[0])
    sizing = plan_for(load_profile(str(make_profile("sizing", budget_mb=4096))), base_model)
    # Exactly `fits` adapters fit: the budget leaves room for two and a half.
    budget_mb = math.floor((sizing.fixed_bytes + fits * adapter_bytes + adapter_bytes // 2) / MIB)
    profile = make_profile("tight", budget_mb=budget_mb)
    assert plan_for(load_profile(str(profile)), base_model).adapters_that_fit(adapter_bytes) == fits

    result = run_probe(profile, adapter_files, rounds=3)  # N + 3 adapters, 15 generations

    assert result["samples"] > 100
    assert result["peak_rss_bytes"] <= budget_mb * MIB, (result["peak_rss_bytes"] / MIB, budget_mb)
    assert result["max_resident_count"] <= fits
    assert result["loads"] == 15 and result["evictions"] == 13
    for name, texts in result["outputs"].items():
        # Reloaded after eviction, each adapter gives exactly its first greedy output.
        assert len(set(texts)) == 1, (name, texts)
        assert texts[0] != result["base_text"]
    assert len({texts[0] for texts in result["outputs"].values()}) == len(adapter_files)


def test_base_that_does_not_fit_is_reported_with_the_terms(base_model: Path,
                                                          make_profile: Callable[..., Path]) -> None:
    plan = plan_for(load_profile(str(make_profile("tiny", budget_mb=128))), base_model)
    assert not plan.fits
    assert plan.adapter_budget_bytes == 128 * MIB - plan.fixed_bytes < 0
    assert plan.adapters_that_fit(10 * MIB) == 0


@pytest.mark.parametrize("ctx, kv_type, expected_mib", [(512, "f16", 11.25), (8192, "f16", 180.0),
                                                         (2048, "q4_0", 12.65625)])
def test_kv_cache_scales_with_ctx_and_type(base_model: Path, ctx: int, kv_type: str, expected_mib: float) -> None:
    assert budget.kv_cache_bytes(budget.model_shape(base_model), ctx, kv_type) / MIB == pytest.approx(expected_mib)


def test_trimming_freed_memory_spawns_no_process_after_the_first_time() -> None:
    # Issue 18 item 13: ctypes.util.find_library("c") ran `/sbin/ldconfig -p` (a fork of the daemon) on every trim.
    spawned: list[str] = []
    watching = [False]

    def hook(event: str, args: tuple[object, ...]) -> None:
        if watching[0] and event in ("subprocess.Popen", "os.posix_spawn", "os.fork", "os.exec"):
            spawned.append(event)

    budget.release_freed_memory()  # resolves libc once
    sys.addaudithook(hook)
    watching[0] = True
    try:
        for _ in range(3):
            budget.release_freed_memory()
    finally:
        watching[0] = False
    assert spawned == []
