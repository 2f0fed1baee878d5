"""A merged model changes the logits as the PEFT adapter does, on SmolLM2 (llama, Q4_1) and Gemma 3 270M (Q4_K_M).

The reference and thresholds are the converter's (test_converter_fidelity.py): transformers loads the GGUF
dequantised, PEFT wraps it with random LoRA weights and gives the logit change. edge-rt converts the saved adapter,
merges it into the same GGUF, and llama.cpp evaluates the same tokens on the merged model and on the base. The
merged model's change must match PEFT's (correlation > 0.98, relative error < 0.2). On SmolLM2 the adapters are
the converter's (lora_B × 2); Gemma amplifies a large change chaotically, so there each adapter's lora_B gain is
calibrated from the PEFT side to a logit change of std 3.5 (~10x the Q4_K_M-vs-float32 difference), as the
converter's Gemma fidelity tests do. Merged into the base dequantised to F32, the change must agree to rounding.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_converter_fidelity import (  # noqa: E402  (after the reference stack's importorskip)
    ALL_LINEAR,
    PROMPT,
    agreement,
    assert_matches_peft,
    hf_model_from_gguf,
    make_peft_adapter,
)

from converters import convert_peft_to_gguf  # noqa: E402
from converters.merge import merge_adapter  # noqa: E402
from edge_runtime.runtime.engine import Engine, EngineSettings  # noqa: E402

# One thread per engine: several engines live in this process one after the other (README "Benchmarks").
SETTINGS = EngineSettings(n_ctx=128, n_batch=128, n_ubatch=128, n_threads=1, logits_all=True)
GEMMA_TARGET_DELTA_STD = 3.5


@dataclass(frozen=True)
class Reference:
    """One base model: its GGUF, transformers' float32 load of it, and both base logits for the prompt."""

    name: str
    model: Path
    hf: Any
    tokens: list[int]
    hf_base: np.ndarray
    llama_base: np.ndarray
    target_delta_std: float | None  # calibrate lora_B to this PEFT logit change; None: the converter's B_GAIN


def llama_logits(model: Path, tokens: list[int]) -> np.ndarray:
    engine = Engine(model, SETTINGS)
    try:
        return engine.logits(tokens)
    finally:
        engine.close()


def make_reference_adapter(reference: Reference, directory: Path, *, seed: int, save_dtype: Any = None,
                           **config: Any) -> np.ndarray:
    """A saved PEFT LoRA for ``reference`` (lora_B scaled as it asks) and PEFT's logits for its tokens."""
    calibrate = None if reference.target_delta_std is None else (reference.hf_base, reference.target_delta_std)
    return make_peft_adapter(reference.hf, directory, reference.tokens, seed=seed, save_dtype=save_dtype,
                             calibrate=calibrate, **config)


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def reference(request: pytest.FixtureRequest) -> Iterator[Reference]:
    model: Path = request.getfixturevalue("base_model" if request.param == "smollm2" else "gemma_model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores; the results do not depend on it
    hf = hf_model_from_gguf(model)
    engine = Engine(model, SETTINGS)
    try:
        # Gemma is trained with <bos> first; SmolLM2's converter fidelity tests run without it.
        tokens = engine.tokenize(PROMPT, add_bos=request.param == "gemma3")
        llama_base = engine.logits(tokens)
    finally:
        engine.close()
    with torch.no_grad():
        hf_base = hf(torch.tensor([tokens])).logits[0].numpy()
    target = GEMMA_TARGET_DELTA_STD if request.param == "gemma3" else None
    yield Reference(request.param, model, hf, tokens, hf_base, llama_base, target_delta_std=target)
    torch.set_num_threads(threads)


@pytest.fixture
def check(tmp_path: Path, reference: Reference) -> Any:
    """Build a PEFT adapter from config, convert and merge it per outtype; return {outtype: (peft, merged) delta}."""

    def run(*, outtypes: tuple[str, ...] = ("auto",), seed: int = 0, save_dtype: Any = None, base: Path | None = None,
            **config: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        peft_dir = tmp_path / f"peft-{seed}"
        peft_logits = make_reference_adapter(reference, peft_dir, seed=seed, save_dtype=save_dtype, **config)
        peft_delta = peft_logits - reference.hf_base
        # The adapter must dominate the quantisation noise, or the comparison proves nothing.
        assert np.std(peft_delta) > 3 * np.std(reference.llama_base - reference.hf_base)
        adapter = convert_peft_to_gguf(peft_dir, base=reference.model, output=tmp_path / f"a-{seed}.gguf",
                                       outtype="f32").output
        deltas = {}
        llama_base = reference.llama_base if base is None else llama_logits(base, reference.tokens)
        for outtype in outtypes:
            merged = merge_adapter(adapter, base=base or reference.model, output=tmp_path / f"merged-{outtype}.gguf",
                                   outtype=outtype).output
            deltas[outtype] = (peft_delta, llama_logits(merged, reference.tokens) - llama_base)
            merged.unlink()
        return deltas

    return run


def test_merged_query_key_adapter_matches_peft(check: Any) -> None:
    assert_matches_peft(*check(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"])["auto"])


def test_merged_all_linear_layers_adapter_matches_peft(check: Any) -> None:
    assert_matches_peft(*check(r=4, lora_alpha=8, target_modules=ALL_LINEAR, seed=1)["auto"])


def test_merged_rslora_adapter_matches_peft(check: Any) -> None:
    assert_matches_peft(*check(r=16, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
                               seed=2)["auto"])


def test_merged_rank_and_alpha_patterns_match_peft(check: Any) -> None:
    assert_matches_peft(*check(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                               rank_pattern={"v_proj": 2, "layers.3.self_attn.q_proj": 16},
                               alpha_pattern={"down_proj": 64, "k_proj": 2}, seed=3)["auto"])


# Each model's converter fidelity case for layers_to_transform (Gemma's is the Gemma converter tests' combined one).
# On Gemma's Q4_K_M file the harness has little margin: q/o of layers [0, 7, 17] measured 0.976 / 0.206 merged.
LAYERS_CASES: dict[str, dict[str, Any]] = {
    "smollm2": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "o_proj"], "layers_to_transform": [0, 7, 29]},
    "gemma3": {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "o_proj", "down_proj"],
               "rank_pattern": {"k_proj": 2, "layers.5.self_attn.q_proj": 16}, "alpha_pattern": {"down_proj": 64},
               "layers_to_transform": [0, 5, 11, 17]},
}


def test_merged_layers_to_transform_adapter_matches_peft(check: Any, reference: Reference) -> None:
    assert_matches_peft(*check(**LAYERS_CASES[reference.name], seed=4)["auto"])


def test_merged_bf16_adapter_matches_peft(check: Any) -> None:
    assert_matches_peft(*check(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"],
                               save_dtype=torch.bfloat16, seed=5)["auto"])


def test_auto_f32_and_f16_output_types_match_peft(check: Any) -> None:
    deltas = check(r=16, lora_alpha=32, target_modules=ALL_LINEAR, seed=6, outtypes=("auto", "f32", "f16"))
    for outtype, (peft_delta, merged_delta) in deltas.items():
        correlation, relative_error = agreement(peft_delta, merged_delta)
        assert correlation > 0.98 and relative_error < 0.2, (outtype, correlation, relative_error)


def test_merged_into_the_base_dequantised_to_f32_the_change_agrees_to_rounding(
        check: Any, reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Identical weights on both sides (transformers dequantises the same GGUF): only float rounding remains, so a
    # wrong scale, orientation or row order of B·A, even by a few percent, fails this.
    import llama_cpp

    exact = tmp_path_factory.mktemp("f32") / f"{reference.model.stem}.f32.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.allow_requantize = llama_cpp.LLAMA_FTYPE_ALL_F32, 1, True
    assert llama_cpp.llama_model_quantize(str(reference.model).encode(), str(exact).encode(),
                                          ctypes.byref(params)) == 0
    peft_delta, merged_delta = check(r=8, lora_alpha=16, target_modules=ALL_LINEAR, seed=7, base=exact,
                                     outtypes=("f32",))["f32"]
    correlation, relative_error = agreement(peft_delta, merged_delta)
    assert correlation > 0.9999 and relative_error < 0.02, (correlation, relative_error)
