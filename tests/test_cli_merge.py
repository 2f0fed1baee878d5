"""`edge-rt merge` as a user runs it: merge, inspect and plan the result, and the refusals' exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from peft_dirs import write_peft_dir

from converters import convert_peft_to_gguf
from edge_runtime.cli import main
from edge_runtime.gguf.info import read_info


def adapter_for(base: Path, folder: Path) -> Path:
    return convert_peft_to_gguf(write_peft_dir(folder / "peft"), base=base, output=folder / "brand-voice.gguf").output


def test_merge_then_inspect_and_plan_the_merged_model(tmp_path: Path, base_model: Path) -> None:
    adapter, out = adapter_for(base_model, tmp_path), tmp_path / "kiosk.gguf"
    runner = CliRunner()
    merged = runner.invoke(main, ["merge", str(adapter), "-o", str(out), "--outtype", "q8_0", "--scale", "0.5"])
    assert merged.exit_code == 0, merged.output
    assert "adapter 'brand-voice'" in merged.output and "at scale 0.5" in merged.output
    assert "4 tensors merged (4 Q8_0" in merged.output and "268 copied" in merged.output

    inspected = runner.invoke(main, ["inspect", str(out), "--json"])
    assert inspected.exit_code == 0, inspected.output
    report = json.loads(inspected.output)
    assert report["kind"] == "model" and report["quantization"] == "MOSTLY_Q8_0"
    assert report["merged_from"]["adapter_name"] == "brand-voice"
    assert report["merged_from"]["base_fingerprint"] == read_info(base_model).fingerprint
    assert report["merged_from"]["scale"] == 0.5 and report["merged_from"]["outtype"] == "q8_0"

    planned = runner.invoke(main, ["plan", "--model", str(out), "--json"])
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.output)["model_bytes"] >= read_info(out).tensor_bytes


def test_merge_refusals_exit_with_their_codes_and_write_nothing(tmp_path: Path, base_model: Path,
                                                                gemma_model: Path) -> None:
    adapter, out = adapter_for(base_model, tmp_path), tmp_path / "m.gguf"
    runner = CliRunner()
    other_base = runner.invoke(main, ["merge", str(adapter), "--base", str(gemma_model), "-o", str(out)])
    assert other_base.exit_code == 6 and "converted for another base model" in other_base.output
    missing_base = runner.invoke(main, ["merge", str(adapter), "--base", str(tmp_path / "no.gguf"), "-o", str(out)])
    assert missing_base.exit_code == 3 and "does not exist" in missing_base.output
    not_lora = runner.invoke(main, ["merge", str(base_model), "-o", str(out)])
    assert not_lora.exit_code == 4 and "not a LoRA adapter" in not_lora.output
    bad_outtype = runner.invoke(main, ["merge", str(adapter), "-o", str(out), "--outtype", "q3_k"])
    assert bad_outtype.exit_code == 2 and "q3_k" in bad_outtype.output
    assert not out.exists() and "merging" not in other_base.output + not_lora.output


def test_merge_refuses_to_write_over_its_inputs_and_a_scale_float32_cannot_hold(tmp_path: Path,
                                                                              adapter_files: list[Path]) -> None:
    import shutil

    from edge_runtime.runtime.models import default_model_path

    base = tmp_path / "base.gguf"
    shutil.copy(default_model_path(), base)
    adapter = tmp_path / "adapter.gguf"
    shutil.copy(adapter_files[0], adapter)
    before = (base.read_bytes(), adapter.read_bytes())
    for output in (base, adapter):
        result = CliRunner().invoke(main, ["merge", str(adapter), "--base", str(base), "-o", str(output)])
        assert result.exit_code == 2 and f"is the input {output.name}" in result.output
    assert (base.read_bytes(), adapter.read_bytes()) == before  # nothing was written over them
    huge = CliRunner().invoke(main, ["merge", str(adapter), "--base", str(base), "-o", str(tmp_path / "m.gguf"),
                                     "--scale", "1e308"])
    assert huge.exit_code == 2 and "finite float32" in huge.output and "Traceback" not in huge.output


def test_merge_warns_when_the_output_type_rounds_away_the_adapters_change(tmp_path: Path,
                                                                          adapter_files: list[Path]) -> None:
    result = CliRunner().invoke(main, ["merge", str(adapter_files[0]), "-o", str(tmp_path / "q.gguf"),
                                       "--outtype", "base"])  # SmolLM2's own Q4_1
    assert result.exit_code == 0, result.output
    assert "warning: rounding to --outtype base changed a merged tensor by" in result.output
    exact = CliRunner().invoke(main, ["merge", str(adapter_files[0]), "-o", str(tmp_path / "f.gguf")])
    assert exact.exit_code == 0 and "warning" not in exact.output


def test_a_scale_that_overflows_the_merged_weights_is_refused(tmp_path: Path, adapter_files: list[Path]) -> None:
    output = tmp_path / "overflow.gguf"
    result = CliRunner().invoke(main, ["merge", str(adapter_files[0]), "-o", str(output), "--scale", "3e38",
                                       "--outtype", "f32"])  # finite in float32, but not scale x B x A
    assert result.exit_code == 2 and "overflows float32" in result.output
    assert not output.exists() and not list(tmp_path.glob(".overflow*"))  # nothing written, no temp left
