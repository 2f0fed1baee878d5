"""`edge-rt serve --model MERGED.gguf`: a merged model is served as a base model and answers as base + adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
from daemons import Daemon, run_daemon
from peft_dirs import lora_tensors, write_peft_dir

from converters import convert_peft_to_gguf, merge_adapter

PROMPT = "Summarise clause 4 of the contract:"
TOKENS = 24


def greedy(daemon: Daemon, model: str) -> dict[str, Any]:
    answer = requests.post(f"{daemon.url}/v1/completions", timeout=60, json={
        "model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "logprobs": 1})
    assert answer.status_code == 200, answer.text
    choice: dict[str, Any] = answer.json()["choices"][0]
    return choice


def test_a_merged_model_serves_what_base_plus_adapter_serves(tmp_path: Path, base_model: Path,
                                                            serve_profile: Path) -> None:
    # Every layer's q/v at rank 8: a change that moves greedy answers without throwing the model off its rails.
    served = tmp_path / "adapters"
    peft = write_peft_dir(tmp_path / "peft", tensors=lora_tensors(["q_proj", "v_proj"], layers=range(30), seed=3),
                          target_modules=["q_proj", "v_proj"])
    adapter = convert_peft_to_gguf(peft, base=base_model, output=served / "legal-review.gguf").output
    merged = merge_adapter(adapter, base=base_model, output=tmp_path / "kiosk.gguf", outtype="f16")
    with run_daemon("--profile", str(serve_profile), "--adapters-dir", str(served), log=tmp_path / "a.log") as daemon:
        unmerged, base = greedy(daemon, "legal-review"), greedy(daemon, "base")
    with run_daemon("--profile", str(serve_profile), "--model", str(merged.output), log=tmp_path / "b.log") as kiosk:
        models = requests.get(f"{kiosk.url}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == ["kiosk"]  # a model like any other: no adapter to select
        folded = greedy(kiosk, "base")
    assert unmerged["text"] != base["text"]  # the adapter does change the answer
    # Merged in f16, the weights are base + B·A up to f16 rounding: the same greedy answer, token for token, and the
    # chosen tokens' log-probabilities agree within 0.25 (0.16 measured: llama.cpp rounds the two computations
    # differently).
    assert folded["logprobs"]["tokens"] == unmerged["logprobs"]["tokens"]
    assert folded["logprobs"]["token_logprobs"] == pytest.approx(unmerged["logprobs"]["token_logprobs"], abs=0.25)
