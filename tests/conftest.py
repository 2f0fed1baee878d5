"""Shared fixtures: every state folder under tmp_path, the real SmolLM2 base, real llama.cpp."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.models import default_model_path


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every state folder at tmp_path and forbid network model downloads."""
    monkeypatch.setenv("EDGE_RT_HOME", str(tmp_path / "edge-rt-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="session")
def base_model() -> Path:
    """The embedded SmolLM2-135M-Instruct Q4_1 GGUF."""
    return default_model_path()


@pytest.fixture(scope="session")
def eval_engine(base_model: Path) -> Iterator[object]:
    """A real llama.cpp engine on SmolLM2 that keeps every position's logits."""
    from edge_runtime.engine import Engine, EngineSettings

    engine = Engine(base_model, EngineSettings(n_ctx=128, n_batch=128, logits_all=True))
    yield engine
    engine.close()
