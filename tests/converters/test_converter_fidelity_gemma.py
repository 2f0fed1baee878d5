"""A converted adapter computes what the PEFT adapter computes, on Gemma 3 270M (gemma3) as on SmolLM2 (llama).

The harness of test_converter_fidelity.py (its helpers and reference): transformers loads the real Gemma 3 270M
Q4_K_M GGUF dequantised, PEFT wraps it with random LoRA weights, edge-rt converts the saved adapter, and llama.cpp
evaluates the same token ids with and without it. Gemma differs from llama where a converter could go wrong: no
q/k row permutation, q/k norms after the projections, 256-wide heads (q_proj 640 → 1024, k/v_proj 640 → 256,
o_proj 1024 → 640), a 262k vocabulary.

llama.cpp runs two files. The Q4_K_M file itself, with the SmolLM2 harness's thresholds (correlation > 0.98,
relative error < 0.2): on Gemma its kernels differ from float32 by 0.37 logit-std, so that check has little
margin and cannot see a scale error under ~20%. And the same weights dequantised to F32 by llama.cpp, what
transformers computes with: there the two implementations agree to 0.006 logit-std, so every converter detail is
held to rounding precision (correlation > 0.9999, relative error < 0.02).
"""

from __future__ import annotations

from collections.abc import Iterator
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
    llama_logits_with,
    make_peft_adapter,
)

from converters import architectures, convert_peft_to_gguf  # noqa: E402
from edge_runtime.runtime.engine import Engine, EngineSettings  # noqa: E402

# The PEFT logit change each adapter is scaled to (its standard deviation over every position and token): ~10x the
# 0.37 logit-std difference between llama.cpp's Q4_K_M kernels and transformers' float32 weights on this prompt.
# Gemma has no single gain that suits every adapter as SmolLM2's B_GAIN does: a q/k-only LoRA needs ~0.7 to reach
# it, all-linear ~0.2, and past ~2x that the perturbed attention amplifies the quantisation difference chaotically
# (correlation 0.85-0.95 for an all-linear LoRA at gain 0.7-1.4, whatever the converter does). So each adapter's
# lora_B gain is found from the PEFT reference alone, before llama.cpp runs it.
TARGET_DELTA_STD = 3.5


@pytest.fixture(scope="module")
def gemma_exact(tmp_path_factory: pytest.TempPathFactory, gemma_model: Path) -> Path:
    """The Q4_K_M Gemma dequantised to an F32 GGUF by llama.cpp: the weights transformers computes with."""
    import ctypes

    import llama_cpp

    out = tmp_path_factory.mktemp("gemma-f32") / "gemma-3-270m-f32.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.allow_requantize = llama_cpp.LLAMA_FTYPE_ALL_F32, 1, True
    assert llama_cpp.llama_model_quantize(str(gemma_model).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def _evaluation_engine(model: Path) -> Engine:
    # One thread: two engines and torch share 2 cores (README, Benchmarks: OpenMP teams per thread).
    return Engine(model, EngineSettings(n_ctx=128, n_batch=128, n_ubatch=128, n_threads=1, logits_all=True))


@pytest.fixture(scope="module")
def q4_engine(gemma_model: Path) -> Iterator[Engine]:
    """llama.cpp on the Q4_K_M file devices run, keeping every position's logits."""
    engine = _evaluation_engine(gemma_model)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def exact_engine(gemma_exact: Path) -> Iterator[Engine]:
    """llama.cpp on the dequantised F32 file, keeping every position's logits."""
    engine = _evaluation_engine(gemma_exact)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_gemma(gemma_model: Path) -> Iterator[Any]:
    """transformers' float32 Gemma3ForCausalLM dequantised from the Q4_K_M GGUF."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores; the results do not depend on it
    yield hf_model_from_gguf(gemma_model)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gemma_tokens(q4_engine: Engine) -> list[int]:
    # Gemma is trained with <bos> first; without it its logits are far noisier in both implementations.
    return q4_engine.tokenize(PROMPT, add_bos=True)


@pytest.fixture(scope="module")
def gemma_hf_base(hf_gemma: Any, gemma_tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_gemma(torch.tensor([gemma_tokens])).logits[0].numpy()


def _base_logits(engine: Engine, tokens: list[int]) -> np.ndarray:
    engine.set_adapters(())
    return engine.logits(tokens)


@pytest.fixture
def check(tmp_path: Path, hf_gemma: Any, gemma_model: Path, gemma_tokens: list[int],
          gemma_hf_base: np.ndarray) -> Any:
    """Build a PEFT adapter on Gemma from config, convert it for the Q4_K_M base, run it on ``engine`` and return
    (peft_delta, llama_delta)."""

    def run(engine: Engine, *, outtype: str = "f32", seed: int = 0, **config: Any) -> tuple[np.ndarray, np.ndarray]:
        peft_dir = tmp_path / f"peft-{seed}"
        peft_logits = make_peft_adapter(hf_gemma, peft_dir, gemma_tokens, seed=seed,
                                        calibrate=(gemma_hf_base, TARGET_DELTA_STD), **config)
        out = tmp_path / f"adapter-{seed}-{outtype}.gguf"
        result = convert_peft_to_gguf(peft_dir, base=gemma_model, output=out, outtype=outtype)
        assert result.architecture == "gemma3"
        llama_base = _base_logits(engine, gemma_tokens)
        llama_delta = llama_logits_with(engine, out, gemma_tokens) - llama_base
        peft_delta = peft_logits - gemma_hf_base
        assert peft_delta.shape == llama_delta.shape == (len(gemma_tokens), 262144)
        # The adapter must dominate the difference between the two implementations, or the check proves nothing.
        assert np.std(peft_delta) == pytest.approx(TARGET_DELTA_STD, rel=0.05)
        assert np.std(peft_delta) > 3 * np.std(llama_base - gemma_hf_base)
        return peft_delta, llama_delta

    return run


def assert_exact(peft_delta: np.ndarray, llama_delta: np.ndarray) -> None:
    """On identical weights the two logit changes agree to rounding (f16 KV cache, output types): a module
    mapped to the wrong tensor, a missed scale or row order, even a 5% scale error, fails this."""
    correlation, relative_error = agreement(peft_delta, llama_delta)
    assert correlation > 0.9999 and relative_error < 0.02, (correlation, relative_error)


# -- the reference ---------------------------------------------------------------------------------------------------

def test_reference_and_llama_cpp_agree_on_the_gemma_base(gemma_tokens: list[int], gemma_hf_base: np.ndarray,
                                                         q4_engine: Engine, exact_engine: Engine) -> None:
    # The reference is only a reference if transformers' dequantised Gemma computes what llama.cpp computes.
    q4 = _base_logits(q4_engine, gemma_tokens)
    exact = _base_logits(exact_engine, gemma_tokens)
    assert float(np.corrcoef(gemma_hf_base.ravel(), q4.ravel())[0, 1]) > 0.99
    assert (gemma_hf_base.argmax(-1) == q4.argmax(-1)).mean() > 0.8
    assert float(np.corrcoef(gemma_hf_base.ravel(), exact.ravel())[0, 1]) > 0.99999
    assert (gemma_hf_base.argmax(-1) == exact.argmax(-1)).all()
    assert np.std(exact - gemma_hf_base) < 0.05 * np.std(q4 - gemma_hf_base)


# -- the weights transformers computes with: every converter detail, at rounding precision ---------------------------

def test_gemma_query_key_adapter_matches_peft_without_row_permutation(check: Any, exact_engine: Engine) -> None:
    assert_exact(*check(exact_engine, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]))


def test_gemma_query_key_adapter_with_llama_row_permutation_fails(check: Any, exact_engine: Engine,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The check sees q/k row order on Gemma: llama's RoPE permutation would be a real bug here.
    monkeypatch.setitem(architectures.PERMUTES_QK, "gemma3", True)
    correlation, relative_error = agreement(*check(exact_engine, r=8, lora_alpha=16,
                                                   target_modules=["q_proj", "k_proj"]))
    assert correlation < 0.9 and relative_error > 0.5, (correlation, relative_error)


def test_gemma_all_linear_layers_adapter_matches_peft(check: Any, exact_engine: Engine) -> None:
    assert_exact(*check(exact_engine, r=4, lora_alpha=8, target_modules=ALL_LINEAR, seed=1))


def test_gemma_rslora_scale_alpha_over_sqrt_rank_matches_peft(check: Any, exact_engine: Engine) -> None:
    assert_exact(*check(exact_engine, r=16, lora_alpha=4, use_rslora=True,
                        target_modules=["q_proj", "v_proj", "up_proj"], seed=2))


def test_gemma_rank_and_alpha_patterns_and_layers_to_transform_match_peft(check: Any, exact_engine: Engine) -> None:
    assert_exact(*check(exact_engine, r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                        rank_pattern={"k_proj": 2, "layers.5.self_attn.q_proj": 16}, alpha_pattern={"down_proj": 64},
                        layers_to_transform=[0, 5, 11, 17], seed=3))


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_gemma_smaller_output_types_still_match_peft(check: Any, exact_engine: Engine, outtype: str) -> None:
    # Rank 32: lora_a and lora_b rows hold whole Q8_0 blocks, so q8_0 quantises every tensor.
    assert_exact(*check(exact_engine, r=32, lora_alpha=32, target_modules=["v_proj", "o_proj", "gate_proj"],
                        outtype=outtype, seed=6))


# -- the Q4_K_M file devices run, with the SmolLM2 harness's thresholds ----------------------------------------------

def test_gemma_query_key_adapter_on_the_q4_k_m_file_matches_peft(check: Any, q4_engine: Engine) -> None:
    assert_matches_peft(*check(q4_engine, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]))


def test_gemma_all_linear_adapter_on_the_q4_k_m_file_matches_peft(check: Any, q4_engine: Engine) -> None:
    assert_matches_peft(*check(q4_engine, r=4, lora_alpha=8, target_modules=ALL_LINEAR, seed=1))
