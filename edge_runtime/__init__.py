"""edge-rt: one resident INT4 base model, task LoRA adapters converted, distributed and hot-applied on device."""

from __future__ import annotations

from typing import Any

from edge_runtime.errors import EdgeRtError
from edge_runtime.gguf.info import GGUFInfo, read_info
from edge_runtime.profiles import DeviceProfile, list_profiles, load_profile
from edge_runtime.runtime.models import default_model_path, resolve_model

__version__ = "0.1.0"

# Loaded on first use: they import llama.cpp, which commands such as `edge-rt inspect` never need.
_LAZY = {"Runtime": "edge_runtime.runtime.core", "SamplingParams": "edge_runtime.runtime.generation",
         "AdapterState": "edge_runtime.runtime.adapters"}

__all__ = ["AdapterState", "DeviceProfile", "EdgeRtError", "GGUFInfo", "Runtime", "SamplingParams", "__version__",
           "default_model_path", "list_profiles", "load_profile", "read_info", "resolve_model"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
