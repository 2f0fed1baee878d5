"""`merge_adapter`: what the merged GGUF holds, how each output type is chosen, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from peft_dirs import lora_tensors, write_peft_dir

from converters import convert_peft_to_gguf, merge_adapter
from converters.errors import UnsupportedAdapterFeature
from converters.ggml_quantize import dequantize_rows, quantize_rows
from converters.weight_types import AUTO_MAX_DELTA_ERROR
from edge_runtime import errors
from edge_runtime.files import file_sha256
from edge_runtime.gguf.info import read_info

T = gguf.GGMLQuantizationType
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(folder: Path, base: Path, *, gain: float = 1.0, rank: int = 8, modules: list[str] | None = None,
                 name: str = "legal-review") -> Path:
    """A converted f32 GGUF LoRA for SmolLM2 (layers 0-1), lora_b multiplied by ``gain``."""
    tensors = lora_tensors(modules or ["q_proj", "v_proj", "down_proj"], rank=rank)
    tensors = {k: v * gain if "lora_B" in k else v for k, v in tensors.items()}
    peft = write_peft_dir(folder / f"peft-{name}", tensors=tensors, r=rank, lora_alpha=2 * rank,
                          target_modules=modules or ["q_proj", "v_proj", "down_proj"])
    return convert_peft_to_gguf(peft, base=base, output=folder / f"{name}.gguf", outtype="f32").output


def tensors_of(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def raw(tensor: gguf.ReaderTensor) -> bytes:
    return np.asarray(tensor.data).tobytes()


def values(tensor: gguf.ReaderTensor) -> np.ndarray:
    data = np.asarray(tensor.data)
    return gguf.quants.dequantize(data.view(np.uint8).reshape(data.shape[0], -1), tensor.tensor_type)


def test_merged_tensors_hold_w_plus_scaled_ba_and_the_rest_is_copied_byte_for_byte(tmp_path: Path,
                                                                                  base_model: Path) -> None:
    adapter = make_adapter(tmp_path, base_model)
    result = merge_adapter(adapter, base=base_model, output=tmp_path / "merged.gguf", scale=0.5, outtype="f32")
    merged, base, lora = tensors_of(result.output), tensors_of(base_model), tensors_of(adapter)
    assert list(merged) == list(base)  # every tensor, in the base's order
    adapted = {name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a")}
    assert len(adapted) == result.merged_tensors == 6 and result.copied_tensors == len(base) - 6
    for name, tensor in merged.items():
        assert [int(d) for d in tensor.shape] == [int(d) for d in base[name].shape]
        if name not in adapted:
            assert tensor.tensor_type == base[name].tensor_type and raw(tensor) == raw(base[name]), name
            continue
        # llama.cpp's scale: alpha / rank (16 / 8) times the merge scale.
        delta = 0.5 * 2.0 * values(lora[f"{name}.lora_b"]) @ values(lora[f"{name}.lora_a"])
        assert tensor.tensor_type == T.F32
        np.testing.assert_allclose(values(tensor), values(base[name]) + delta, rtol=1e-6, atol=1e-6)


def test_metadata_names_the_adapter_and_base_and_the_model_keeps_the_base_identity(tmp_path: Path,
                                                                                   base_model: Path) -> None:
    adapter = make_adapter(tmp_path, base_model)
    result = merge_adapter(adapter, base=base_model, output=tmp_path / "merged.gguf", outtype="f16", scale=0.75)
    info, base = read_info(result.output), read_info(base_model)
    assert info.kind == "model" and info.quantization == "MOSTLY_F16"
    assert info.merged_from == {"adapter_name": "legal-review", "adapter_sha256": file_sha256(adapter).hexdigest(),
                                "base_fingerprint": base.fingerprint, "base_name": base.name, "scale": 0.75,
                                "outtype": "f16"}
    # The fingerprint ignores tensor types: adapters made for the base still apply to the merged model.
    assert info.fingerprint == base.fingerprint == result.base_fingerprint
    assert {k: v for k, v in info.metadata.items() if not k.startswith("edge_rt.merge.")
            and k != "general.file_type"} == {k: v for k, v in base.metadata.items() if k != "general.file_type"}


def test_auto_picks_per_tensor_the_most_compact_type_within_the_delta_error(tmp_path: Path, base_model: Path) -> None:
    small = merge_adapter(make_adapter(tmp_path, base_model, name="small"), base=base_model,
                          output=tmp_path / "small-merged.gguf")
    # Rounding to Q8_0 costs ~0.5% of the merged weight: within 1% of a change as large as the weight, not of a
    # small one. Rounding to Q4_1 again costs ~8% of the weight, more than 1% of any change.
    large = merge_adapter(make_adapter(tmp_path, base_model, gain=2000.0, name="large"), base=base_model,
                          output=tmp_path / "large-merged.gguf")
    assert small.merged_types == {"F16": 6} and large.merged_types == {"Q8_0": 6}
    assert small.max_delta_error <= AUTO_MAX_DELTA_ERROR and large.max_delta_error <= AUTO_MAX_DELTA_ERROR
    assert base_model.stat().st_size < large.size_bytes < small.size_bytes


def test_base_outtype_keeps_every_type_and_the_size_of_the_base(tmp_path: Path, base_model: Path) -> None:
    result = merge_adapter(make_adapter(tmp_path, base_model, modules=ALL_LINEAR), base=base_model,
                           output=tmp_path / "merged.gguf", outtype="base")
    merged, base = tensors_of(result.output), tensors_of(base_model)
    assert {n: t.tensor_type for n, t in merged.items()} == {n: t.tensor_type for n, t in base.items()}
    assert read_info(result.output).tensor_bytes == read_info(base_model).tensor_bytes
    assert result.size_bytes - base_model.stat().st_size < 1024  # the edge_rt.merge.* keys
    assert result.max_delta_error > AUTO_MAX_DELTA_ERROR


def test_k_quants_fall_back_as_llama_cpp_does_where_rows_are_not_whole_blocks(tmp_path: Path,
                                                                             base_model: Path) -> None:
    # SmolLM2's 576-wide rows hold no whole 256-value K block (llama-quantize writes Q5_0 there); ffn_down's 1536 do.
    result = merge_adapter(make_adapter(tmp_path, base_model), base=base_model, output=tmp_path / "m.gguf",
                           outtype="q4_k")
    merged = tensors_of(result.output)
    assert merged["blk.0.ffn_down.weight"].tensor_type == T.Q4_K
    assert merged["blk.0.attn_q.weight"].tensor_type == T.Q5_0
    assert result.merged_types == {"Q4_K": 2, "Q5_0": 4}


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0])
def test_llama_cpp_quantiser_matches_gguf_py_bit_for_bit(qtype: T) -> None:
    matrix = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    blocks = quantize_rows(matrix, qtype)
    assert blocks.tobytes() == gguf.quants.quantize(matrix, qtype).tobytes()
    assert np.array_equal(dequantize_rows(blocks, qtype, 8), gguf.quants.dequantize(blocks, qtype))


def test_an_adapter_converted_for_another_base_is_refused(tmp_path: Path, base_model: Path,
                                                          gemma_model: Path) -> None:
    adapter = make_adapter(tmp_path, base_model)
    with pytest.raises(errors.IncompatibleAdapter, match="converted for another base model"):
        merge_adapter(adapter, base=gemma_model, output=tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def write_lora(path: Path, tensors: dict[str, np.ndarray], **metadata: str) -> Path:
    """A GGUF LoRA as another converter writes it: no edge-rt fingerprint."""
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    for key, value in metadata.items():
        writer.add_string(key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_adapter_without_fingerprint_is_checked_by_shape(tmp_path: Path, base_model: Path) -> None:
    a, b = np.ones((8, 576), np.float32), np.ones((576, 8), np.float32)  # numpy order: (rank, in), (out, rank)
    fits = write_lora(tmp_path / "fits.gguf", {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b})
    assert merge_adapter(fits, base=base_model, output=tmp_path / "m.gguf").merged_tensors == 1
    wrong = write_lora(tmp_path / "wrong.gguf", {"blk.0.attn_k.weight.lora_a": a, "blk.0.attn_k.weight.lora_b": b})
    with pytest.raises(errors.IncompatibleAdapter, match="do not fit the base tensor blk.0.attn_k.weight"):
        merge_adapter(wrong, base=base_model, output=tmp_path / "m.gguf")


def test_bad_inputs_are_typed_errors_and_leave_the_previous_output(tmp_path: Path, base_model: Path) -> None:
    adapter = make_adapter(tmp_path, base_model)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")
    with pytest.raises(errors.InvalidGGUF, match="not a LoRA adapter"):
        merge_adapter(base_model, base=base_model, output=out)
    with pytest.raises(errors.InvalidGGUF, match="not a base model"):
        merge_adapter(adapter, base=adapter, output=out)
    with pytest.raises(errors.GGUFNotFound):
        merge_adapter(tmp_path / "missing.gguf", base=base_model, output=out)
    with pytest.raises(errors.InvalidSettings, match="outtype"):
        merge_adapter(adapter, base=base_model, output=out, outtype="q3_k")
    with pytest.raises(errors.InvalidSettings, match="scale"):
        merge_adapter(adapter, base=base_model, output=out, scale=float("nan"))
    alora = write_lora(tmp_path / "alora.gguf", {"blk.0.attn_q.weight.lora_a": np.ones((8, 576), np.float32),
                                                 "blk.0.attn_q.weight.lora_b": np.ones((576, 8), np.float32)},
                       **{"adapter.alora.invocation_tokens": "x"})
    with pytest.raises(UnsupportedAdapterFeature, match="aLoRA"):
        merge_adapter(alora, base=base_model, output=out)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(base_model.read_bytes()[: base_model.stat().st_size // 2])
    with pytest.raises(errors.InvalidGGUF, match="runs past the end of the file"):
        merge_adapter(adapter, base=truncated, output=out)
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.glob(".m.gguf*")) == []


def test_auto_names_the_type_most_of_the_merged_weights_became_in_general_file_type(
        tmp_path: Path, base_model: Path, adapter_files: list[Path]) -> None:
    # Issue 18 item 19: `merge --outtype auto` left general.file_type at the base's (MOSTLY_Q4_1) whatever it wrote.
    merged = merge_adapter(adapter_files[0], base=base_model, output=tmp_path / "merged.gguf")
    weights: dict[T, int] = {}
    for tensor in tensors_of(merged.output).values():
        if len(tensor.shape) >= 2:
            weights[tensor.tensor_type] = weights.get(tensor.tensor_type, 0) + int(np.prod(tensor.shape))
    main = max(weights, key=lambda qtype: weights[qtype])
    assert main != T.Q4_1 and read_info(base_model).quantization == "MOSTLY_Q4_1"
    assert read_info(merged.output).quantization == ("ALL_F32" if main == T.F32 else f"MOSTLY_{main.name}")
