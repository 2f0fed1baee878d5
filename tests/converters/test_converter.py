"""The converter's output format, metadata, refusals and file safety, on the real SmolLM2 base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from peft_dirs import lora_tensors, write_peft_dir
from safetensors.numpy import save_file

from converters import convert_peft_to_gguf
from converters import errors as converter_errors
from converters.peft_adapter import read_peft_adapter
from edge_runtime import errors
from edge_runtime.gguf import keys
from edge_runtime.gguf.info import read_info
from edge_runtime.runtime.engine import Engine


def tensor(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    found = [t for t in reader.tensors if t.name == name]
    assert len(found) == 1, name
    return np.array(found[0].data, dtype=np.float32)


def test_output_holds_llama_cpp_lora_layout_and_edge_rt_metadata(tmp_path: Path, base_model: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "peft", r=8, lora_alpha=16)
    out = tmp_path / "legal-review.gguf"
    result = convert_peft_to_gguf(peft_dir, base=base_model, output=out, outtype="f32")

    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(16.0)
    assert fields["general.architecture"] == "llama"
    assert fields["edge_rt.adapter.name"] == "legal-review"
    assert fields[keys.BASE_FINGERPRINT] == read_info(base_model).fingerprint == result.base_fingerprint
    assert fields[keys.PEFT_CONFIG_SHA256] == read_peft_adapter(peft_dir).config_sha256
    names = sorted(t.name for t in reader.tensors)
    assert names == sorted(f"blk.{layer}.{kind}.weight.lora_{half}" for layer in range(2)
                           for kind in ("attn_q", "attn_k") for half in "ab")
    # GGUF dims are ne[0] first: lora_a is [in, r], lora_b is [r, out], as llama_adapter_lora_init checks.
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == [576, 8]
    assert shapes["blk.0.attn_k.weight.lora_b"] == [8, 192]
    assert result.tensor_count == 8 and result.ranks == (8,)


def test_lora_a_is_copied_exactly_and_lora_b_rows_are_rope_permuted(tmp_path: Path, base_model: Path) -> None:
    source = lora_tensors(["q_proj", "k_proj"], rank=8, layers=[0])
    peft_dir = write_peft_dir(tmp_path / "peft", tensors=source)
    out = tmp_path / "a.gguf"
    convert_peft_to_gguf(peft_dir, base=base_model, output=out, outtype="f32")
    reader = gguf.GGUFReader(out)
    prefix = "base_model.model.model.layers.0.self_attn"
    np.testing.assert_array_equal(tensor(reader, "blk.0.attn_q.weight.lora_a"),
                                  source[f"{prefix}.q_proj.lora_A.weight"])
    b_k = source[f"{prefix}.k_proj.lora_B.weight"]
    # k has 3 heads of 64 rows: llama.cpp interleaves each head's two halves (row i of half 0, row i of half 1, ...).
    expected = b_k.reshape(3, 2, 32, 8).swapaxes(1, 2).reshape(192, 8)
    np.testing.assert_array_equal(tensor(reader, "blk.0.attn_k.weight.lora_b"), expected)
    assert not np.array_equal(expected, b_k)


def test_rslora_and_alpha_pattern_are_folded_into_lora_b(tmp_path: Path, base_model: Path) -> None:
    source = lora_tensors(["q_proj", "k_proj"], rank=16, layers=[0])
    peft_dir = write_peft_dir(tmp_path / "peft", tensors=source, r=16, lora_alpha=8, use_rslora=True,
                              alpha_pattern={"k_proj": 32})
    out = tmp_path / "a.gguf"
    convert_peft_to_gguf(peft_dir, base=base_model, output=out, outtype="f32")
    reader = gguf.GGUFReader(out)
    prefix = "base_model.model.model.layers.0.self_attn"
    # llama.cpp applies alpha/r = 8/16; PEFT wants 8/sqrt(16) for q and 32/sqrt(16) for k.
    b_q = source[f"{prefix}.q_proj.lora_B.weight"].reshape(9, 2, 32, 16).swapaxes(1, 2).reshape(576, 16)
    np.testing.assert_allclose(tensor(reader, "blk.0.attn_q.weight.lora_b") * 0.5, b_q * 2.0, rtol=1e-6)
    b_k = source[f"{prefix}.k_proj.lora_B.weight"].reshape(3, 2, 32, 16).swapaxes(1, 2).reshape(192, 16)
    np.testing.assert_allclose(tensor(reader, "blk.0.attn_k.weight.lora_b") * 0.5, b_k * 8.0, rtol=1e-6)


def test_bf16_safetensors_are_widened_exactly(tmp_path: Path) -> None:
    values = np.array([[1.0, -2.5, 3.140625, 0.0078125]], dtype=np.float32)
    bf16_bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    header = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
              {"dtype": "BF16", "shape": [1, 4], "data_offsets": [0, 8]},
              "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
              {"dtype": "BF16", "shape": [4, 1], "data_offsets": [8, 16]}}
    encoded = json.dumps(header).encode()
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_model.safetensors").write_bytes(
        len(encoded).to_bytes(8, "little") + encoded + bf16_bits.tobytes() * 2)
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                                                              "target_modules": ["q_proj"]}))
    pair = read_peft_adapter(peft_dir).pairs[0]
    np.testing.assert_array_equal(pair.lora_a, values)
    np.testing.assert_array_equal(pair.lora_b, values.reshape(4, 1))


@pytest.mark.parametrize("outtype, a_type, b_type", [("f16", "F16", "F16"), ("bf16", "BF16", "BF16"),
                                                      ("q8_0", "Q8_0", "F16")])
def test_outtype_sets_tensor_types_with_f16_fallback_for_short_rows(tmp_path: Path, base_model: Path, outtype: str,
                                                                     a_type: str, b_type: str) -> None:
    out = tmp_path / "a.gguf"
    convert_peft_to_gguf(write_peft_dir(tmp_path / "peft"), base=base_model, output=out, outtype=outtype)
    types = {t.name: t.ggml_type.name for t in read_info(out).tensors}
    assert types["blk.0.attn_q.weight.lora_a"] == a_type
    # rank-8 B rows (8 values) cannot hold a 32-value Q8_0 block.
    assert types["blk.0.attn_q.weight.lora_b"] == b_type


# -- activated LoRA (aLoRA) ------------------------------------------------------------------------------------


def test_alora_invocation_tokens_are_written_as_the_uint32_array_llama_cpp_reads(tmp_path: Path, base_model: Path,
                                                                                 eval_engine: Engine) -> None:
    peft_dir = write_peft_dir(tmp_path / "peft", alora_invocation_tokens=[1, 520, 9531, 198])
    out = tmp_path / "router.gguf"
    assert convert_peft_to_gguf(peft_dir, base=base_model, output=out).invocation_tokens == (1, 520, 9531, 198)
    field = gguf.GGUFReader(out).fields["adapter.alora.invocation_tokens"]
    assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]
    assert field.contents() == [1, 520, 9531, 198]
    assert read_info(out).invocation_tokens == (1, 520, 9531, 198)
    handle = eval_engine.load_adapter(out, content_id="router")  # llama_adapter_get_alora_invocation_tokens
    try:
        assert handle.invocation == (1, 520, 9531, 198)
    finally:
        eval_engine.free_adapter(handle)


def test_a_plain_lora_has_no_invocation_key(tmp_path: Path, base_model: Path, eval_engine: Engine) -> None:
    out = tmp_path / "plain.gguf"
    convert_peft_to_gguf(write_peft_dir(tmp_path / "peft", alora_invocation_tokens=None), base=base_model,
                         output=out)
    assert "adapter.alora.invocation_tokens" not in gguf.GGUFReader(out).fields
    assert read_info(out).invocation_tokens == ()
    handle = eval_engine.load_adapter(out, content_id="plain")
    try:
        assert handle.invocation == ()
    finally:
        eval_engine.free_adapter(handle)


def test_an_older_aloras_invocation_string_is_tokenized_with_the_base_vocabulary(tmp_path: Path, base_model: Path,
                                                                                 eval_engine: Engine) -> None:
    peft_dir = write_peft_dir(tmp_path / "peft", invocation_string="<|im_start|>assistant\n")
    out = tmp_path / "old.gguf"
    result = convert_peft_to_gguf(peft_dir, base=base_model, output=out)
    # The chat template's own control token stays one token, as transformers' encode(add_special_tokens=False).
    assert result.invocation_tokens == (1, 520, 9531, 198)
    assert eval_engine.tokenize("<|im_start|>assistant\n", add_bos=False, special=True) == [1, 520, 9531, 198]
    assert read_info(out).invocation_tokens == (1, 520, 9531, 198)
    both = write_peft_dir(tmp_path / "both", invocation_string="ignored", alora_invocation_tokens=[42, 43])
    assert convert_peft_to_gguf(both, base=base_model, output=tmp_path / "b.gguf").invocation_tokens == (42, 43)


def test_an_invocation_longer_than_decoded_header_arrays_is_read_back_whole(tmp_path: Path, base_model: Path) -> None:
    tokens = list(range(1000, 1100))  # the header reader keeps arrays over 64 items as raw bytes
    out = tmp_path / "long.gguf"
    convert_peft_to_gguf(write_peft_dir(tmp_path / "peft", alora_invocation_tokens=tokens), base=base_model,
                         output=out)
    assert read_info(out).invocation_tokens == tuple(tokens)


@pytest.mark.parametrize("config, words", [
    ({"alora_invocation_tokens": []}, "alora_invocation_tokens must be"),
    ({"alora_invocation_tokens": "<|im_start|>"}, "alora_invocation_tokens must be"),
    ({"alora_invocation_tokens": [1, -2]}, "alora_invocation_tokens must be"),
    ({"alora_invocation_tokens": [1, True]}, "alora_invocation_tokens must be"),
    ({"invocation_string": 7}, "invocation_string must be"),
    ({"alora_invocation_tokens": [1, 49152]}, "outside the base model's vocabulary of 49152 tokens"),
])
def test_malformed_invocations_are_refused_by_name(tmp_path: Path, base_model: Path, config: dict[str, object],
                                                   words: str) -> None:
    out = tmp_path / "a.gguf"
    with pytest.raises(converter_errors.MalformedAdapter, match=words):
        convert_peft_to_gguf(write_peft_dir(tmp_path / "peft", **config), base=base_model, output=out)
    assert not out.exists()


# -- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, words", [
    ("use_dora", True, "DoRA"),
    ("bias", "all", "biases"),
    ("bias", "lora_only", "biases"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("lora_bias", True, "LoRA biases"),
    ("layer_replication", [[0, 4], [2, 5]], "layer replication"),
    ("peft_type", "IA3", "Only LoRA"),
    ("fan_in_fan_out", True, "Conv1D"),  # weights stored transposed: converting as if not would be silently wrong
])
def test_unsupported_peft_features_are_refused_by_name(tmp_path: Path, base_model: Path, option: str,
                                                       value: object, words: str) -> None:
    peft_dir = write_peft_dir(tmp_path / "peft", **{option: value})
    out = tmp_path / "a.gguf"
    with pytest.raises(converter_errors.UnsupportedAdapterFeature) as raised:
        convert_peft_to_gguf(peft_dir, base=base_model, output=out)
    assert raised.value.feature == option
    assert f"unsupported PEFT feature {option}=" in str(raised.value) and words in str(raised.value)
    assert not out.exists()


def test_dora_magnitude_tensors_are_refused_even_without_the_flag(tmp_path: Path, base_model: Path) -> None:
    tensors = lora_tensors(["q_proj"])
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = np.ones((1, 576), np.float32)
    with pytest.raises(converter_errors.UnsupportedAdapterFeature, match="use_dora"):
        convert_peft_to_gguf(write_peft_dir(tmp_path / "p", tensors=tensors, target_modules=["q_proj"]),
                             base=base_model, output=tmp_path / "a.gguf")


def test_embedding_lora_is_refused(tmp_path: Path, base_model: Path) -> None:
    tensors = {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((8, 49152), np.float32),
               "base_model.model.model.embed_tokens.lora_embedding_B": np.zeros((576, 8), np.float32)}
    with pytest.raises(converter_errors.UnsupportedAdapterFeature, match="embedding LoRA"):
        convert_peft_to_gguf(write_peft_dir(tmp_path / "p", tensors=tensors, target_modules=["embed_tokens"]),
                             base=base_model, output=tmp_path / "a.gguf")


def test_target_module_without_a_base_tensor_is_refused(tmp_path: Path, base_model: Path) -> None:
    # SmolLM2 ties lm_head to the token embeddings: the GGUF has no output.weight.
    tensors = lora_tensors(["q_proj"], layers=[0])
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((8, 576), np.float32)
    tensors["base_model.model.lm_head.lora_B.weight"] = np.zeros((49152, 8), np.float32)
    with pytest.raises(errors.IncompatibleAdapter, match="target module 'lm_head' has no tensor in the base model"):
        convert_peft_to_gguf(write_peft_dir(tmp_path / "p", tensors=tensors, target_modules=["q_proj", "lm_head"]),
                             base=base_model, output=tmp_path / "a.gguf")


def test_adapter_for_another_base_shape_is_refused(tmp_path: Path, base_model: Path) -> None:
    rng = np.random.default_rng(0)
    # A q_proj adapter for a 2048-wide model (SmolLM2-1.7B) applied to the 576-wide 135M base.
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.random((8, 2048), np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.random((2048, 8), np.float32)}
    with pytest.raises(errors.IncompatibleAdapter, match=r"maps 2048 → 2048 features but the base tensor "
                                                         r"blk.0.attn_q.weight maps 576 → 576"):
        convert_peft_to_gguf(write_peft_dir(tmp_path / "p", tensors=tensors, target_modules=["q_proj"]),
                             base=base_model, output=tmp_path / "a.gguf")


def test_lora_a_and_b_with_different_ranks_are_refused(tmp_path: Path, base_model: Path) -> None:
    tensors = lora_tensors(["q_proj"], layers=[0])
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = np.zeros((576, 4), np.float32)
    with pytest.raises(converter_errors.MalformedAdapter, match="lora_A has rank 8 but lora_B has rank 4"):
        convert_peft_to_gguf(write_peft_dir(tmp_path / "p", tensors=tensors, target_modules=["q_proj"]),
                             base=base_model, output=tmp_path / "a.gguf")


def test_rank_disagreeing_with_the_config_is_refused(tmp_path: Path, base_model: Path) -> None:
    with pytest.raises(converter_errors.MalformedAdapter,
                       match="tensors have rank 8 but adapter_config.json gives it rank 4"):
        convert_peft_to_gguf(write_peft_dir(tmp_path / "p", tensors=lora_tensors(["q_proj", "k_proj"]), r=4),
                             base=base_model, output=tmp_path / "a.gguf")


def test_missing_config_is_refused(tmp_path: Path, base_model: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "p")
    (peft_dir / "adapter_config.json").unlink()
    with pytest.raises(converter_errors.AdapterFilesMissing, match="adapter_config.json is missing"):
        convert_peft_to_gguf(peft_dir, base=base_model, output=tmp_path / "a.gguf")


def test_missing_weights_are_refused(tmp_path: Path, base_model: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "p")
    (peft_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(converter_errors.AdapterFilesMissing, match="adapter_model.safetensors is missing"):
        convert_peft_to_gguf(peft_dir, base=base_model, output=tmp_path / "a.gguf")


def test_pickle_only_adapter_is_refused_without_loading_it(tmp_path: Path, base_model: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "p")
    (peft_dir / "adapter_model.safetensors").unlink()
    # A pickle that would run code if loaded: the converter must not even open it.
    (peft_dir / "adapter_model.bin").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")
    with pytest.raises(converter_errors.AdapterFilesMissing,
                       match=r"only adapter_model.bin \(a pickle\).*safe_serialization"):
        convert_peft_to_gguf(peft_dir, base=base_model, output=tmp_path / "a.gguf")
    assert not Path("pwned").exists()


def test_malformed_config_json_is_refused(tmp_path: Path, base_model: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "p")
    (peft_dir / "adapter_config.json").write_text('{"r": 8, "lora_alpha": ')
    with pytest.raises(converter_errors.MalformedAdapter, match="not valid JSON"):
        convert_peft_to_gguf(peft_dir, base=base_model, output=tmp_path / "a.gguf")


@pytest.mark.parametrize("field, value", [("r", 0), ("r", "8"), ("lora_alpha", "x"), ("lora_alpha", float("inf"))])
def test_invalid_config_values_are_named(tmp_path: Path, base_model: Path, field: str, value: object) -> None:
    peft_dir = write_peft_dir(tmp_path / "p")
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    config[field] = value
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(converter_errors.MalformedAdapter, match=f"{field} must be"):
        convert_peft_to_gguf(peft_dir, base=base_model, output=tmp_path / "a.gguf")


@pytest.mark.parametrize("damage", ["header_length", "header_json", "truncated"])
def test_corrupted_safetensors_are_refused(tmp_path: Path, base_model: Path, damage: str) -> None:
    peft_dir = write_peft_dir(tmp_path / "p")
    weights = peft_dir / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "header_length":
        data[0:8] = (10**12).to_bytes(8, "little")
    elif damage == "header_json":
        data[8:16] = b"\xff" * 8
    else:
        data = data[: len(data) // 2]
    weights.write_bytes(bytes(data))
    with pytest.raises(converter_errors.MalformedAdapter, match="corrupt safetensors file"):
        convert_peft_to_gguf(peft_dir, base=base_model, output=tmp_path / "a.gguf")


def test_base_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(errors.InvalidGGUF, match="does not start with the GGUF magic"):
        convert_peft_to_gguf(write_peft_dir(tmp_path / "p"), base=fake, output=tmp_path / "a.gguf")


def test_base_of_an_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(base, arch="gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(converter_errors.UnsupportedArchitecture, match="'gpt2' is not supported.*llama, qwen2"):
        convert_peft_to_gguf(write_peft_dir(tmp_path / "p"), base=base, output=tmp_path / "a.gguf")


def test_failed_conversion_keeps_the_previous_output_and_leaves_no_temp_files(tmp_path: Path,
                                                                               base_model: Path) -> None:
    out = tmp_path / "out" / "a.gguf"
    convert_peft_to_gguf(write_peft_dir(tmp_path / "good"), base=base_model, output=out)
    before = out.read_bytes()
    bad = write_peft_dir(tmp_path / "bad", use_dora=True)
    with pytest.raises(converter_errors.UnsupportedAdapterFeature):
        convert_peft_to_gguf(bad, base=base_model, output=out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.gguf"]


def test_interrupted_conversion_leaves_no_partial_file(tmp_path: Path, base_model: Path) -> None:
    out = tmp_path / "out" / "a.gguf"

    def interrupt(done: int, total: int) -> None:
        if done < total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_peft_to_gguf(write_peft_dir(tmp_path / "p"), base=base_model, output=out, progress=interrupt)
    assert list(out.parent.iterdir()) == []


def test_hub_source_is_read_from_the_local_hugging_face_cache_offline(tmp_path: Path, base_model: Path) -> None:
    # The layout huggingface_hub writes: models--ORG--REPO/{refs/main, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-cache" / "models--acme--legal-review"
    write_peft_dir(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "a.gguf"
    result = convert_peft_to_gguf("hf://acme/legal-review", base=base_model, output=out)
    assert result.tensor_count == 8 and read_info(out).is_adapter


def test_hub_source_missing_offline_names_the_problem(tmp_path: Path, base_model: Path) -> None:
    with pytest.raises(errors.SourceUnavailable, match="not in the local Hugging Face cache"):
        convert_peft_to_gguf("hf://acme/absent", base=base_model, output=tmp_path / "a.gguf")


def test_conversion_reads_only_safetensors_not_extra_files(tmp_path: Path, base_model: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "p")
    shutil.copy(peft_dir / "adapter_model.safetensors", peft_dir / "README.md")
    save_file({"x": np.zeros(1, np.float32)}, str(peft_dir / "training_state.safetensors"))
    out = tmp_path / "a.gguf"
    assert convert_peft_to_gguf(peft_dir, base=base_model, output=out).tensor_count == 8
