"""The daemon on Gemma 3 270M (`edge-rt serve --model GEMMA`): completions equal the engine's, its adapters apply,
an adapter for another base is refused, chat is a clear 400 (no chat template); `inspect` and `plan` on Gemma."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from daemons import Daemon, run_daemon

from edge_runtime.cli import main
from edge_runtime.profiles import load_profile
from edge_runtime.runtime.engine import Engine, SamplingParams
from edge_runtime.runtime.plan import engine_settings

MIB = 1 << 20
PROMPT = "The three primary colours are"
MODEL_ID = "gemma-3-270m-q4_k_m"


@pytest.fixture(scope="module")
def gemma_profile(make_profile: Callable[..., Path]) -> Path:
    return make_profile("gemma-e2e", budget_mb=1024, ctx=1024, threads=1)


@pytest.fixture(scope="module")
def gemma_adapters_dir(tmp_path_factory: pytest.TempPathFactory, gemma_adapter_files: list[Path],
                       adapter_files: list[Path]) -> Path:
    """Gemma's two adapters as `legal` and `brand`, and a SmolLM2 adapter as `smol` (for another base model)."""
    folder = tmp_path_factory.mktemp("gemma-served")
    for name, source in (("legal", gemma_adapter_files[0]), ("brand", gemma_adapter_files[1]),
                         ("smol", adapter_files[0])):
        shutil.copy(source, folder / f"{name}.gguf")
    return folder


@pytest.fixture(scope="module")
def gemma_daemon(tmp_path_factory: pytest.TempPathFactory, gemma_model: Path, gemma_profile: Path,
                 gemma_adapters_dir: Path) -> Iterator[Daemon]:
    log = tmp_path_factory.mktemp("gemma-daemon") / "serve.log"
    with run_daemon("--model", str(gemma_model), "--profile", str(gemma_profile), "--adapters-dir",
                    str(gemma_adapters_dir), log=log) as running:
        yield running


@pytest.fixture(scope="module")
def direct_texts(gemma_model: Path, gemma_profile: Path, gemma_adapter_files: list[Path]) -> dict[str, str]:
    """Greedy texts from an Engine on Gemma with the daemon's settings: base, then each adapter."""
    engine = Engine(gemma_model, engine_settings(load_profile(str(gemma_profile))))
    try:
        prompt = engine.tokenize(PROMPT)
        texts = {"base": engine.generate(prompt, SamplingParams(max_tokens=16)).text}
        for name, path in (("legal", gemma_adapter_files[0]), ("brand", gemma_adapter_files[1])):
            handle = engine.load_adapter(path, content_id=name)
            texts[name] = engine.generate(prompt, SamplingParams(max_tokens=16), adapters=[(handle, 1.0)]).text
            engine.free_adapter(handle)
        return texts
    finally:
        engine.close()


def _complete(daemon: Daemon, model: str) -> requests.Response:
    return requests.post(f"{daemon.url}/v1/completions", timeout=120,
                         json={"model": model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0})


def test_greedy_completion_equals_the_engine_on_gemma(gemma_daemon: Daemon, direct_texts: dict[str, str]) -> None:
    response = _complete(gemma_daemon, MODEL_ID)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == MODEL_ID and body["adapters"] == []
    assert body["choices"][0]["text"] == direct_texts["base"]
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["text"].strip()  # Gemma says something, not an empty string


def test_gemma_adapters_load_and_change_the_output(gemma_daemon: Daemon, direct_texts: dict[str, str]) -> None:
    served = {}
    for name in ("legal", "brand"):
        response = _complete(gemma_daemon, name)
        assert response.status_code == 200, response.text
        assert response.headers["X-Edge-Adapters"].startswith(f"{name}@")
        served[name] = response.json()["choices"][0]["text"]
    assert served == {"legal": direct_texts["legal"], "brand": direct_texts["brand"]}
    assert len({direct_texts["base"], served["legal"], served["brand"]}) == 3
    listing = requests.get(f"{gemma_daemon.url}/v1/adapters", timeout=10).json()["data"]
    assert {a["name"]: a["state"] for a in listing} == {"brand": "resident", "legal": "resident"}


def test_models_lists_gemma_and_only_its_adapters(gemma_daemon: Daemon) -> None:
    models = requests.get(f"{gemma_daemon.url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == [MODEL_ID, "brand", "legal"]
    # The SmolLM2 adapter in the same folder was refused by its base fingerprint, and said so.
    assert "smol" in gemma_daemon.log_text() and "another base model" in gemma_daemon.log_text()
    missing = _complete(gemma_daemon, "smol")
    assert missing.status_code == 404 and "smol" in missing.json()["error"]["message"]


def test_chat_on_gemma_is_a_400_naming_the_missing_template(gemma_daemon: Daemon) -> None:
    response = requests.post(f"{gemma_daemon.url}/v1/chat/completions", timeout=30,
                             json={"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 400
    error: dict[str, Any] = response.json()["error"]
    assert error["message"] == "the base model has no chat template; use /v1/completions with a prompt"
    assert error["type"] == "invalid_request_error"
    assert _complete(gemma_daemon, MODEL_ID).status_code == 200  # and it keeps serving


def test_inspect_gemma_reports_its_architecture_and_size(gemma_model: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(gemma_model), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kind"] == "model" and report["architecture"] == "gemma3" and report["name"] == "Gemma 3 270m"
    assert report["quantization"] == "MOSTLY_Q4_K_M" and report["tensor_count"] == 236
    assert report["parameter_count"] == 268_098_176 and report["context_length"] == 32768
    assert report["size_bytes"] == gemma_model.stat().st_size == 253_113_024


def test_plan_for_gemma_prints_its_terms(make_profile: Callable[..., Path], gemma_model: Path) -> None:
    profile = make_profile("gemma-plan", budget_mb=1024, ctx=2048)
    result = CliRunner().invoke(main, ["plan", "--profile", str(profile), "--model", str(gemma_model), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    # 72 MiB Python + 8 MiB headroom + 262,144 vocabulary entries x 180 bytes (no BPE merges); the Q4_K_M tensors
    # and the repacked copy of its Q4_K ones; 18 layers x 512 K+V values x 2048 tokens x 2 bytes; activations +
    # attention mask + logits/candidates per vocabulary entry.
    assert report["process_bytes"] == 80 * MIB + 262144 * 180
    assert report["model_bytes"] == 246_587_904 + 13_271_040
    assert report["kv_cache_bytes"] == 18 * 512 * 2048 * 2 == 36 * MIB
    assert report["compute_bytes"] == 512 * (16 + 12) * (640 + 2048) + 2048 * 512 * 2 + 262144 * 28
    assert report["fixed_bytes"] == sum(report[k] for k in ("process_bytes", "model_bytes", "kv_cache_bytes",
                                                             "compute_bytes", "request_buffer_bytes"))
    assert report["adapter_budget_bytes"] == 1024 * MIB - report["fixed_bytes"]


@pytest.mark.parametrize("shapes_for, base_for", [("smollm2", "gemma"), ("gemma", "smollm2")])
def test_convert_refuses_an_adapter_for_the_other_base(tmp_path: Path, base_model: Path, gemma_model: Path,
                                                       shapes_for: str, base_for: str) -> None:
    from peft_dirs import GEMMA_SHAPES, SHAPES, lora_tensors, write_peft_dir

    shapes = GEMMA_SHAPES if shapes_for == "gemma" else SHAPES
    peft_dir = write_peft_dir(tmp_path / "peft", tensors=lora_tensors(["q_proj"], layers=[0], shapes=shapes),
                              target_modules=["q_proj"])
    base = gemma_model if base_for == "gemma" else base_model
    out = tmp_path / "a.gguf"
    result = CliRunner().invoke(main, ["convert", str(peft_dir), "--base", str(base), "-o", str(out)])
    assert result.exit_code == 6, result.output
    n_in, n_out = shapes["q_proj"]
    base_in, base_out = (GEMMA_SHAPES if base_for == "gemma" else SHAPES)["q_proj"]
    assert (f"error: module 'model.layers.0.self_attn.q_proj': the adapter maps {n_in} → {n_out} features but "
            f"the base tensor blk.0.attn_q.weight maps {base_in} → {base_out}; the adapter was trained for another "
            "base model") in result.output
    assert not out.exists()


def test_converted_adapters_carry_their_own_base_fingerprint(gemma_model: Path, base_model: Path,
                                                             gemma_adapter_files: list[Path],
                                                             adapter_files: list[Path]) -> None:
    from edge_runtime.gguf.info import read_info

    gemma, smollm2 = read_info(gemma_model).fingerprint, read_info(base_model).fingerprint
    assert gemma != smollm2
    assert read_info(gemma_adapter_files[0]).base_fingerprint == gemma
    assert read_info(adapter_files[0]).base_fingerprint == smollm2
