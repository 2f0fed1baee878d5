"""`edge-rt plan` as a user runs it: the terms, how many adapters fit, and a clear failure when the base does not."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_runtime.cli import main
from edge_runtime.runtime.budget import adapter_resident_bytes, kv_cache_bytes, model_shape

MIB = 1 << 20


def test_plan_json_reports_terms_and_adapter_count(make_profile: Callable[..., Path], base_model: Path) -> None:
    profile = make_profile("plan-json", budget_mb=512, ctx=1024)
    result = CliRunner().invoke(main, ["plan", "--profile", str(profile), "--adapter-mb", "20", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kv_cache_bytes"] == kv_cache_bytes(model_shape(base_model), 1024, "f16") == 22.5 * MIB
    assert report["budget_bytes"] == 512 * MIB
    assert report["adapter_budget_bytes"] == 512 * MIB - report["fixed_bytes"]
    assert report["adapters_that_fit"] == report["adapter_budget_bytes"] // (20 * MIB)
    assert report["fixed_bytes"] == sum(report[k] for k in ("process_bytes", "model_bytes", "kv_cache_bytes",
                                                            "compute_bytes", "request_buffer_bytes"))
    # Two bodies of 1 MiB read at once, three copies each, and every other connection the daemon allows (16 waiting
    # for a read slot + 2 reading + 4 spare = 22, less the 2 readers) with 384 KiB buffered.
    assert (report["request_reads"], report["max_body_bytes"], report["max_queue"]) == (2, MIB, 16)
    assert report["max_connections"] == 22
    assert report["request_buffer_bytes"] == 2 * 3 * MIB + 20 * 384 * 1024 == 13.5 * MIB


def test_plan_counts_the_request_buffers_serve_allows(make_profile: Callable[..., Path]) -> None:
    profile = make_profile("plan-requests", budget_mb=512, ctx=1024)
    result = CliRunner().invoke(main, ["plan", "--profile", str(profile), "--max-body-kb", "64", "--max-queue", "4"])
    assert result.exit_code == 0, result.output
    assert "request buffers (2 x 64 KiB, 10 connections)           3.4 MiB" in result.output  # 0.375 + 8 x 0.375
    more = CliRunner().invoke(main, ["plan", "--profile", str(profile), "--max-body-kb", "64", "--max-queue", "4",
                                     "--max-connections", "100"])
    assert "request buffers (2 x 64 KiB, 100 connections)         37.1 MiB" in more.output  # 0.375 + 98 x 0.375


def test_plan_with_listed_adapters_says_whether_they_fit(make_profile: Callable[..., Path],
                                                         adapter_files: list[Path]) -> None:
    profile = make_profile("plan-files", budget_mb=322, ctx=1024)  # 66 MiB for adapters: three of the five
    args = ["plan", "--profile", str(profile)] + [a for f in adapter_files for a in ("--adapters", str(f))]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 7, result.output  # a script can tell: BudgetExceeded's code
    total = sum(adapter_resident_bytes(f) for f in adapter_files)
    assert f"the listed adapters ({total / MIB:.1f} MiB) do NOT fit together" in result.output
    assert "adapters of 18.6 MiB that fit at once: 3" in result.output
    assert f"error: the 5 listed adapters need {total / MIB:.1f} MiB resident together but profile 'plan-files' " \
           "leaves" in result.output and "Serve fewer at once" in result.output
    three = CliRunner().invoke(main, args[:9])  # three of them
    assert three.exit_code == 0, three.output
    assert "MiB) fit together" in three.output


def test_plan_refuses_to_count_a_file_that_is_no_adapter_of_the_model(
        make_profile: Callable[..., Path], adapter_files: list[Path], base_model: Path, gemma_model: Path) -> None:
    profile = make_profile("plan-wrong", budget_mb=800)
    model_as_adapter = CliRunner().invoke(main, ["plan", "--profile", str(profile), "--adapters", str(base_model)])
    assert model_as_adapter.exit_code == 6, model_as_adapter.output
    assert f"{base_model} is not a LoRA adapter" in model_as_adapter.output
    other_base = CliRunner().invoke(main, ["plan", "--profile", str(profile), "--model", str(gemma_model),
                                           "--adapters", str(adapter_files[0])])
    assert other_base.exit_code == 6, other_base.output
    assert "adapter 'legal-review' was converted for another base model" in other_base.output


def test_plan_fails_with_the_terms_and_the_fix_when_the_base_does_not_fit(make_profile: Callable[..., Path]) -> None:
    profile = make_profile("plan-small", budget_mb=200, ctx=8192)
    result = CliRunner().invoke(main, ["plan", "--profile", str(profile)])
    assert result.exit_code == 7
    assert "KV cache (8192 tokens, f16)                          180.0 MiB" in result.output
    assert "error: the base model with its process, KV cache, buffers and request buffers needs" in result.output
    assert "Use a smaller --ctx, a quantised KV cache" in result.output


def test_plan_parallel_counts_a_context_of_kv_per_sequence_and_names_it_in_the_fix(
        make_profile: Callable[..., Path], base_model: Path) -> None:
    profile = make_profile("plan-parallel", budget_mb=400, ctx=2048)  # one sequence fits, eight do not
    one = CliRunner().invoke(main, ["plan", "--profile", str(profile)])
    assert one.exit_code == 0, one.output
    assert "KV cache (2048 tokens, f16)                           45.0 MiB" in one.output
    eight = CliRunner().invoke(main, ["plan", "--profile", str(profile), "--parallel", "8"])
    assert eight.exit_code == 7, eight.output
    assert kv_cache_bytes(model_shape(base_model), 8 * 2048, "f16") == 360 * MIB
    assert "KV cache (8 x 2048 tokens, f16)                      360.0 MiB" in eight.output
    assert "(KV cache 360.0 MiB for 8 sequences) but profile 'plan-parallel' allows 400.0 MiB" in eight.output
    assert "Use fewer --parallel sequences (each holds a whole context of KV cache), a smaller --ctx" in eight.output


def test_plan_ctx_option_overrides_the_profile(make_profile: Callable[..., Path]) -> None:
    profile = make_profile("plan-ctx", budget_mb=2048, ctx=8192)
    result = CliRunner().invoke(main, ["plan", "--profile", str(profile), "--ctx", "512", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["ctx"] == 512


@pytest.mark.parametrize("args", [["plan", "--ctx", "0"], ["serve", "--ctx", "-5"], ["serve", "--max-queue", "0"],
                                  ["serve", "--port", "70000"]])
def test_impossible_numbers_are_refused_before_anything_starts(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "Invalid value" in result.output


@pytest.mark.parametrize(("value", "says"), [
    ("auto", "'auto' is not a number of sequences: give 1 to 8, or leave --parallel out to use the profile's "
             "compute.parallel"),
    ("0", "0 sequences: give 1 to 8"), ("9", "9 sequences: give 1 to 8")])
def test_a_bad_parallel_is_refused_saying_what_to_give(value: str, says: str) -> None:
    for command in ("plan", "serve"):
        result = CliRunner().invoke(main, [command, "--parallel", value])
        assert result.exit_code == 2
        assert f"Invalid value for '--parallel': {says}" in result.output
