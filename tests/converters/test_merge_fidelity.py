"""A merged model changes the logits as the PEFT adapter does, on SmolLM2 (llama, Q4_1) and Gemma 3 270M (Q4_K_M).

The reference and thresholds are the converter's (test_converter_fidelity.py): transformers loads the GGUF
dequantised, PEFT wraps it with random LoRA weights and gives the logit change. edge-rt converts the saved adapter,
merges it into the same GGUF, and llama.cpp evaluates the same tokens on the merged model and on the base. The
merged model's change must match PEFT's (correlation > 0.98, relative error < 0.2).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_converter_fidelity import (  # noqa: E402  (after the reference stack's importorskip)
    ALL_LINEAR,
    B_GAIN,
    PROMPT,
    agreement,
    assert_matches_peft,
    make_peft_adapter,
)

from converters import convert_peft_to_gguf  # noqa: E402
from converters.merge import merge_adapter  # noqa: E402
from edge_runtime.runtime.engine import Engine, EngineSettings  # noqa: E402

# One thread per engine: several engines live in this process one after the other (README "Benchmarks").
SETTINGS = EngineSettings(n_ctx=128, n_batch=128, n_ubatch=128, n_threads=1, logits_all=True)


@dataclass(frozen=True)
class Reference:
    """One base model: its GGUF, transformers' float32 load of it, and both base logits for the prompt."""

    model: Path
    hf: Any
    tokens: list[int]
    hf_base: np.ndarray
    llama_base: np.ndarray
    last_layer: int


def llama_logits(model: Path, tokens: list[int]) -> np.ndarray:
    engine = Engine(model, SETTINGS)
    try:
        return engine.logits(tokens)
    finally:
        engine.close()


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def reference(request: pytest.FixtureRequest) -> Iterator[Reference]:
    model: Path = request.getfixturevalue("base_model" if request.param == "smollm2" else "gemma_model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores; the results do not depend on it
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(model.parent), gguf_file=model.name,
                                                               dtype=torch.float32)
    hf.eval()
    engine = Engine(model, SETTINGS)
    try:
        # Gemma is trained with <bos> first; SmolLM2's converter fidelity tests run without it.
        tokens = engine.tokenize(PROMPT, add_bos=request.param == "gemma3")
        llama_base = engine.logits(tokens)
    finally:
        engine.close()
    with torch.no_grad():
        hf_base = hf(torch.tensor([tokens])).logits[0].numpy()
    yield Reference(model, hf, tokens, hf_base, llama_base, last_layer=hf.config.num_hidden_layers - 1)
    torch.set_num_threads(threads)


@pytest.fixture
def check(tmp_path: Path, reference: Reference) -> Any:
    """Build a PEFT adapter from config, convert and merge it per outtype; return {outtype: (peft, merged) delta}."""

    def run(*, outtypes: tuple[str, ...] = ("auto",), seed: int = 0, save_dtype: Any = None,
            **config: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        peft_dir = tmp_path / f"peft-{seed}"
        peft_logits = make_peft_adapter(reference.hf, peft_dir, reference.tokens, seed=seed, gain=B_GAIN,
                                        save_dtype=save_dtype, **config)
        peft_delta = peft_logits - reference.hf_base
        # The adapter must dominate the quantisation noise, or the comparison proves nothing.
        assert np.std(peft_delta) > 3 * np.std(reference.llama_base - reference.hf_base)
        adapter = convert_peft_to_gguf(peft_dir, base=reference.model, output=tmp_path / f"a-{seed}.gguf",
                                       outtype="f32").output
        deltas = {}
        for outtype in outtypes:
            merged = merge_adapter(adapter, base=reference.model, output=tmp_path / f"merged-{outtype}.gguf",
                                   outtype=outtype).output
            deltas[outtype] = (peft_delta, llama_logits(merged, reference.tokens) - reference.llama_base)
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


def test_merged_rank_and_alpha_patterns_and_layers_to_transform_match_peft(check: Any, reference: Reference) -> None:
    assert_matches_peft(*check(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                               rank_pattern={"v_proj": 2, "layers.3.self_attn.q_proj": 16},
                               alpha_pattern={"down_proj": 64, "k_proj": 2},
                               layers_to_transform=[0, 3, reference.last_layer], seed=3)["auto"])


def test_merged_bf16_adapter_matches_peft(check: Any) -> None:
    assert_matches_peft(*check(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"],
                               save_dtype=torch.bfloat16, seed=5)["auto"])


def test_each_output_type_is_within_the_thresholds_except_requantising_to_the_base_type(check: Any) -> None:
    deltas = check(r=16, lora_alpha=32, target_modules=ALL_LINEAR, seed=6,
                   outtypes=("auto", "f32", "f16", "q8_0", "base"))
    for outtype in ("auto", "f32", "f16", "q8_0"):
        assert_matches_peft(*deltas[outtype])
    # Rounding W + ΔW to 4-5 bits again adds noise of the size of ΔW itself: why `auto` does not pick it here.
    correlation, relative_error = agreement(*deltas["base"])
    assert relative_error > 0.2, (correlation, relative_error)
