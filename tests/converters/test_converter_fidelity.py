"""A converted adapter computes what the PEFT adapter computes.

Reference: transformers loads the real SmolLM2 Q4_1 GGUF dequantised, PEFT wraps it with random LoRA weights and
gives the logit change the adapter causes. edge-rt converts the saved adapter; llama.cpp evaluates the same token
ids on the same Q4_1 file with and without it. The two logit changes must agree.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import llama_cpp

from converters import architectures, convert_peft_to_gguf
from edge_runtime.runtime.engine import Engine
from edge_runtime.runtime.handles import AdapterHandle

PROMPT = "The quick brown fox jumps over the lazy dog. Edge devices run small language models"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Gain on PEFT's random lora_B: large enough that the adapter's logit change is many times the ~0.3 logit-std
# difference between llama.cpp's Q4_1 kernels and transformers' dequantised float32 weights, small enough that
# attention does not saturate (a saturated softmax amplifies that same difference chaotically).
B_GAIN = 2.0


def hf_model_from_gguf(model: Path) -> Any:
    """transformers' float32 model dequantised from the GGUF llama.cpp runs (offline: nothing is downloaded)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(model.parent), gguf_file=model.name,
                                                                   dtype=torch.float32)
    loaded.eval()
    return loaded


@pytest.fixture(scope="module")
def hf_base(base_model: Path) -> Iterator[Any]:
    """transformers' float32 model dequantised from the same GGUF llama.cpp runs."""
    yield hf_model_from_gguf(base_model)


@pytest.fixture(scope="module")
def token_ids(eval_engine: Engine) -> list[int]:
    return eval_engine.tokenize(PROMPT, add_bos=False)


@pytest.fixture(scope="module")
def llama_base_logits(eval_engine: Engine, token_ids: list[int]) -> np.ndarray:
    eval_engine.set_adapters(())
    return eval_engine.logits(token_ids)


@pytest.fixture(scope="module")
def hf_base_logits(hf_base: Any, token_ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_base(torch.tensor([token_ids])).logits[0].numpy()


def make_peft_adapter(hf_base: Any, directory: Path, token_ids: list[int], *, seed: int = 0, gain: float = B_GAIN,
                      save_dtype: Any = None, calibrate: tuple[np.ndarray, float] | None = None,
                      **config: Any) -> np.ndarray:
    """Build and save a real PEFT LoRA with random weights, lora_B scaled by ``gain``; return PEFT's logits for
    ``token_ids``, computed with exactly the saved weights. With ``calibrate`` (PEFT's base logits, a target), the
    gain is instead the one that makes PEFT's logit change that large (its standard deviation)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(hf_base), peft.LoraConfig(init_lora_weights=False, **config))
    initial_b = [(p, p.detach().clone()) for name, p in model.named_parameters() if "lora_B" in name]

    def logits_at(scale: float) -> np.ndarray:
        with torch.no_grad():
            for parameter, initial in initial_b:
                parameter.copy_(initial * scale)
            if save_dtype is not None:  # round to the saved precision: the reference computes with those weights
                for name, parameter in model.named_parameters():
                    if "lora_" in name:
                        parameter.copy_(parameter.to(save_dtype).to(torch.float32))
            result: np.ndarray = model(torch.tensor([token_ids])).logits[0].numpy()
        return result

    if calibrate is not None:
        base_logits, target_std = calibrate
        low, high = 0.01, 4.0  # the change grows with the gain over this range: bisect its logarithm
        for _ in range(10):
            middle = (low * high) ** 0.5
            low, high = (middle, high) if np.std(logits_at(middle) - base_logits) < target_std else (low, middle)
        gain = (low * high) ** 0.5
    logits = logits_at(gain)
    if save_dtype is not None:
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.to(save_dtype)
    model.save_pretrained(str(directory))
    return logits


def llama_logits_with(engine: Engine, adapter: Path, token_ids: list[int], scale: float = 1.0) -> np.ndarray:
    handle = engine.load_adapter(adapter, content_id=adapter.name)
    try:
        engine.set_adapters([(handle, scale)])
        return engine.logits(token_ids)
    finally:
        engine.free_adapter(handle)


def agreement(peft_delta: np.ndarray, llama_delta: np.ndarray) -> tuple[float, float]:
    """(correlation, relative error) of llama.cpp's logit change against PEFT's."""
    correlation = float(np.corrcoef(peft_delta.ravel(), llama_delta.ravel())[0, 1])
    relative_error = float(np.linalg.norm(llama_delta - peft_delta) / np.linalg.norm(peft_delta))
    return correlation, relative_error


def assert_matches_peft(peft_delta: np.ndarray, llama_delta: np.ndarray) -> None:
    correlation, relative_error = agreement(peft_delta, llama_delta)
    assert correlation > 0.98 and relative_error < 0.2, (correlation, relative_error)


@pytest.fixture
def check(tmp_path: Path, hf_base: Any, base_model: Path, eval_engine: Engine, token_ids: list[int],
          hf_base_logits: np.ndarray, llama_base_logits: np.ndarray) -> Any:
    """Build a PEFT adapter from config, convert it, and return (peft_delta, llama_delta)."""

    def run(*, outtype: str = "f32", save_dtype: Any = None, seed: int = 0, gain: float = B_GAIN,
            **config: Any) -> tuple[np.ndarray, np.ndarray]:
        peft_dir = tmp_path / f"peft-{seed}"
        peft_logits = make_peft_adapter(hf_base, peft_dir, token_ids, seed=seed, gain=gain, save_dtype=save_dtype,
                                        **config)
        out = tmp_path / f"adapter-{seed}-{outtype}.gguf"
        convert_peft_to_gguf(peft_dir, base=base_model, output=out, outtype=outtype)
        llama_delta = llama_logits_with(eval_engine, out, token_ids) - llama_base_logits
        peft_delta = peft_logits - hf_base_logits
        # The adapter must dominate the quantisation noise, or the comparison proves nothing.
        assert np.std(peft_delta) > 3 * np.std(llama_base_logits - hf_base_logits)
        return peft_delta, llama_delta

    return run


def test_query_key_adapter_matches_peft_including_rope_row_permutation(check: Any) -> None:
    assert_matches_peft(*check(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]))


def test_all_linear_layers_adapter_matches_peft(check: Any) -> None:
    assert_matches_peft(*check(r=4, lora_alpha=8, target_modules=ALL_LINEAR, seed=1))


def test_rslora_scale_alpha_over_sqrt_rank_matches_peft(check: Any) -> None:
    assert_matches_peft(*check(r=16, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
                               seed=2))


def test_rank_pattern_and_alpha_pattern_give_each_module_its_own_scale(check: Any) -> None:
    assert_matches_peft(*check(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                               rank_pattern={"v_proj": 2, "layers.3.self_attn.q_proj": 16},
                               alpha_pattern={"down_proj": 64, "k_proj": 2}, seed=3))


def test_layers_to_transform_adapts_only_those_layers(check: Any) -> None:
    assert_matches_peft(*check(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"],
                               layers_to_transform=[0, 7, 29], seed=4))


def test_bf16_adapter_weights_convert_without_torch_and_match_peft(check: Any) -> None:
    assert_matches_peft(*check(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"],
                               save_dtype=torch.bfloat16, seed=5))


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_smaller_output_types_still_match_peft(check: Any, outtype: str) -> None:
    # Rank 32: both lora_a and lora_b rows hold whole Q8_0 blocks, so q8_0 quantises every tensor.
    assert_matches_peft(*check(r=32, lora_alpha=32, target_modules=["v_proj", "o_proj", "gate_proj"],
                               outtype=outtype, seed=6))


def test_conversion_without_the_row_permutation_fails_the_same_check(check: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(architectures.PERMUTES_QK, "llama", False)
    correlation, relative_error = agreement(*check(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]))
    assert not (correlation > 0.98 and relative_error < 0.2), (correlation, relative_error)


def test_ignoring_rslora_scale_fails_the_same_check(check: Any, tmp_path: Path, base_model: Path,
                                                    eval_engine: Engine, token_ids: list[int],
                                                    llama_base_logits: np.ndarray) -> None:
    peft_delta, _ = check(r=16, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"], seed=7)
    # A converter that forgot rsLoRA would use alpha/r = 1/4 instead of alpha/sqrt(r) = 1: scale 0.25 in llama.cpp.
    wrong = llama_logits_with(eval_engine, tmp_path / "adapter-7-f32.gguf", token_ids, scale=0.25)
    correlation, relative_error = agreement(peft_delta, wrong - llama_base_logits)
    assert relative_error > 0.5, (correlation, relative_error)


# -- activated LoRA (aLoRA) -------------------------------------------------------------------------------------

INVOCATION = [1, 520, 9531, 198]  # "<|im_start|>assistant\n" in SmolLM2's vocabulary
SPLIT = 8  # where the invocation goes into the prompt: base tokens before it, adapted tokens from it on


@pytest.fixture(scope="module")
def invoked_ids(token_ids: list[int]) -> list[int]:
    return token_ids[:SPLIT] + INVOCATION + token_ids[SPLIT:]


@pytest.fixture(scope="module")
def alora(tmp_path_factory: pytest.TempPathFactory, hf_base: Any, base_model: Path, eval_engine: Engine,
          invoked_ids: list[int]) -> dict[str, Any]:
    """A real PEFT aLoRA on every linear layer, converted; PEFT's and llama.cpp's logits with and without it."""
    folder = tmp_path_factory.mktemp("alora")
    peft_logits = make_peft_adapter(hf_base, folder / "peft", invoked_ids, seed=11, r=8, lora_alpha=16,
                                    target_modules=ALL_LINEAR, alora_invocation_tokens=INVOCATION,
                                    task_type="CAUSAL_LM")
    out = convert_peft_to_gguf(folder / "peft", base=base_model, output=folder / "alora.gguf", outtype="f32").output
    with torch.no_grad():
        hf_logits = hf_base(torch.tensor([invoked_ids])).logits[0].numpy()
    return {"peft_delta": peft_logits - hf_logits, "gguf": out, "peft_dir": folder / "peft",
            "llama_base": eval_engine.logits(invoked_ids, [])}


def test_activated_lora_matches_peft_with_the_invocation_in_the_middle(alora: dict[str, Any], eval_engine: Engine,
                                                                        invoked_ids: list[int],
                                                                        llama_base_logits: np.ndarray,
                                                                        hf_base_logits: np.ndarray) -> None:
    handle = eval_engine.load_adapter(alora["gguf"], content_id="alora")
    try:
        assert handle.invocation == tuple(INVOCATION)
        llama_delta = eval_engine.logits(invoked_ids, [(handle, 1.0)]) - alora["llama_base"]
    finally:
        eval_engine.free_adapter(handle)
    peft_delta = alora["peft_delta"]
    # Before the invocation both compute the base model exactly; from it on (the invocation included) the adapter.
    assert np.all(peft_delta[:SPLIT] == 0) and np.all(llama_delta[:SPLIT] == 0)
    assert np.std(peft_delta[SPLIT:]) > 3 * np.std(llama_base_logits - hf_base_logits)
    assert_matches_peft(peft_delta, llama_delta)


@pytest.mark.parametrize("start", [None, SPLIT - 1, SPLIT + 1])
def test_an_alora_applied_from_anywhere_else_fails_the_same_check(alora: dict[str, Any], eval_engine: Engine,
                                                                   invoked_ids: list[int], start: int | None) -> None:
    pointer = llama_cpp.llama_adapter_lora_init(eval_engine._model.model, str(alora["gguf"]).encode())
    # The same weights, activated from the whole sequence (a plain LoRA) or from one token too early or too late.
    invocation = () if start is None else tuple(invoked_ids[start:start + 2])
    handle = AdapterHandle(pointer, alora["gguf"], f"shifted-{start}", invocation)
    try:
        llama_delta = eval_engine.logits(invoked_ids, [(handle, 1.0)]) - alora["llama_base"]
    finally:
        eval_engine.free_adapter(handle)
    correlation, relative_error = agreement(alora["peft_delta"], llama_delta)
    assert not (correlation > 0.98 and relative_error < 0.2), (correlation, relative_error)
    assert relative_error > 0.3, (correlation, relative_error)  # far off, not at the edge of the thresholds


def test_without_its_invocation_an_alora_computes_exactly_the_base(alora: dict[str, Any], eval_engine: Engine,
                                                                   hf_base: Any, token_ids: list[int],
                                                                   llama_base_logits: np.ndarray,
                                                                   hf_base_logits: np.ndarray) -> None:
    model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), str(alora["peft_dir"]))
    with torch.no_grad():
        assert np.array_equal(model(torch.tensor([token_ids])).logits[0].numpy(), hf_base_logits)
    handle = eval_engine.load_adapter(alora["gguf"], content_id="alora")
    try:
        assert np.array_equal(eval_engine.logits(token_ids, [(handle, 1.0)]), llama_base_logits)
    finally:
        eval_engine.free_adapter(handle)
