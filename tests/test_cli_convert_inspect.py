"""`edge-rt convert` and `edge-rt inspect` as a user runs them (click's CliRunner), and the base fingerprint."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import gguf
import numpy as np
from click.testing import CliRunner
from peft_dirs import write_peft_dir

from edge_runtime.cli import main
from edge_runtime.gguf.header import read_header
from edge_runtime.gguf.info import base_fingerprint, read_info

EMBEDDED_FINGERPRINT_V1 = "9a00db849dd3d9c64e28387da531d991bcfa8d3b716d54edb94e911f1e03d555"


def test_convert_then_inspect_reports_the_adapter(tmp_path: Path, base_model: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "peft", r=8, lora_alpha=32)
    out = tmp_path / "brand-voice.gguf"
    runner = CliRunner()
    converted = runner.invoke(main, ["convert", str(peft_dir), "--base", str(base_model), "-o", str(out),
                                     "--description", "Rewrites copy in the brand's voice"])
    assert converted.exit_code == 0, converted.output
    assert "adapter 'brand-voice', 8 tensors, rank 8, alpha 32, llama" in converted.output
    assert read_info(out).metadata["general.description"] == "Rewrites copy in the brand's voice"
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()  # as any file the user makes (a daemon user reads it)

    inspected = runner.invoke(main, ["inspect", str(out), "--json"])
    assert inspected.exit_code == 0, inspected.output
    report = json.loads(inspected.output)
    assert report["kind"] == "adapter" and report["name"] == "brand-voice"
    assert report["lora_ranks"] == [8] and report["lora_alpha"] == 32.0
    assert report["tensor_count"] == 8 and report["tensor_types"] == ["F16"]
    assert report["base_fingerprint"] == read_info(base_model).fingerprint
    assert report["size_bytes"] == out.stat().st_size


def test_convert_and_inspect_show_an_aloras_invocation_tokens(tmp_path: Path, base_model: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "peft", alora_invocation_tokens=[1, 520, 9531, 198])
    out = tmp_path / "router.gguf"
    runner = CliRunner()
    converted = runner.invoke(main, ["convert", str(peft_dir), "--base", str(base_model), "-o", str(out)])
    assert converted.exit_code == 0, converted.output
    assert "aLoRA invoked by tokens [1, 520, 9531, 198]" in converted.output
    report = json.loads(runner.invoke(main, ["inspect", str(out), "--json"]).output)
    assert report["alora_invocation_tokens"] == [1, 520, 9531, 198]
    assert "alora_invocation_tokens  [1, 520, 9531, 198]" in runner.invoke(main, ["inspect", str(out)]).output
    plain = tmp_path / "plain.gguf"
    runner.invoke(main, ["convert", str(write_peft_dir(tmp_path / "p2")), "-o", str(plain)])
    assert json.loads(runner.invoke(main, ["inspect", str(plain), "--json"]).output)["alora_invocation_tokens"] is None


def test_convert_defaults_to_the_embedded_base_model(tmp_path: Path, base_model: Path) -> None:
    out = tmp_path / "a.gguf"
    result = CliRunner().invoke(main, ["convert", str(write_peft_dir(tmp_path / "p")), "-o", str(out),
                                       "--name", "json-extract"])
    assert result.exit_code == 0, result.output
    assert read_info(out).name == "json-extract"
    assert read_info(out).base_fingerprint == read_info(base_model).fingerprint


def test_inspect_base_model_reports_quantisation_parameters_and_context(base_model: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(base_model), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kind"] == "model" and report["architecture"] == "llama"
    assert report["quantization"] == "MOSTLY_Q4_1"
    assert report["context_length"] == 8192
    assert report["tensor_count"] == 272
    # SmolLM2-135M: 134.5 M parameters with tied embeddings.
    assert 134_000_000 < report["parameter_count"] < 135_000_000


def test_inspect_human_output_lists_fields(base_model: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(base_model)])
    assert result.exit_code == 0
    assert "\nquantization     MOSTLY_Q4_1\n" in result.output


def test_inspect_rejects_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    result = CliRunner().invoke(main, ["inspect", str(not_gguf)])
    assert result.exit_code == 4
    assert "is not a readable GGUF file: the file does not start with the GGUF magic bytes" in result.output


def test_inspect_rejects_a_truncated_gguf(tmp_path: Path, base_model: Path) -> None:
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(base_model.read_bytes()[:4096])
    result = CliRunner().invoke(main, ["inspect", str(truncated)])
    assert result.exit_code == 4 and "truncated or corrupt" in result.output


def test_convert_refusal_is_one_clear_line_and_an_exit_code(tmp_path: Path, base_model: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "p", use_dora=True)
    out = tmp_path / "a.gguf"
    result = CliRunner().invoke(main, ["convert", str(peft_dir), "--base", str(base_model), "-o", str(out)])
    assert result.exit_code == 4
    assert "error: unsupported PEFT feature use_dora=True" in result.output
    assert not out.exists() and "writing" not in result.output  # it said "writing a.gguf" before refusing


def test_convert_with_missing_base_names_the_path(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["convert", str(write_peft_dir(tmp_path / "p")), "--base",
                                       str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "a.gguf")])
    assert result.exit_code == 3 and "nope.gguf' does not exist" in result.output


def _tiny_llama(path: Path, *, name: str, blocks: int, file_type: int, dtype: type = np.float32) -> Path:
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name(name)
    writer.add_block_count(blocks)
    writer.add_file_type(file_type)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_fingerprint_ignores_quantisation_but_not_architecture(tmp_path: Path) -> None:
    def fingerprint(path: Path) -> str:
        return base_fingerprint(read_header(path))

    f32 = fingerprint(_tiny_llama(tmp_path / "a.gguf", name="m", blocks=2, file_type=0))
    f16 = fingerprint(_tiny_llama(tmp_path / "b.gguf", name="m", blocks=2, file_type=1, dtype=np.float16))
    deeper = fingerprint(_tiny_llama(tmp_path / "c.gguf", name="m", blocks=3, file_type=0))
    assert f32 == f16
    assert f32 != deeper
    assert len(f32) == 64 and int(f32, 16) >= 0


def test_fingerprint_of_the_embedded_model_never_changes(base_model: Path) -> None:
    # Adapters in the field carry this value; changing the algorithm would orphan every one of them.
    assert read_info(base_model).fingerprint == EMBEDDED_FINGERPRINT_V1


def test_inspect_of_a_missing_file_is_not_found_exit_3(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "gone.gguf")])
    assert result.exit_code == 3 and "gone.gguf: no such file" in result.output  # was exit 4, "not readable"


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def test_inspect_escapes_control_characters_a_file_carries(tmp_path: Path, base_model: Path) -> None:
    # Issue 18 item 15: a description with terminal escape sequences reached the operator's terminal raw.
    peft_dir = write_peft_dir(tmp_path / "peft", r=8, lora_alpha=32)
    out = tmp_path / "sneaky.gguf"
    hostile = "Harmless\x1b[2J\x1b]0;owned\x07\nfake-field  value"
    assert CliRunner().invoke(main, ["convert", str(peft_dir), "--base", str(base_model), "-o", str(out),
                                     "--description", hostile]).exit_code == 0
    inspected = CliRunner().invoke(main, ["inspect", str(out)])
    assert inspected.exit_code == 0
    assert "\x1b" not in inspected.output and "\x07" not in inspected.output
    assert "Harmless\\x1b[2J\\x1b]0;owned\\x07\\x0afake-field  value" in inspected.output
