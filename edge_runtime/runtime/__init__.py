"""The device side: the resident base model, its adapters under a memory budget, and the memory plan.

No HTTP and no network here (``distribution`` brings adapters to disk; ``serve`` exposes this over HTTP).
Names that import llama.cpp load on first use, so ``edge-rt plan`` and ``inspect`` never need it.
"""

from __future__ import annotations

from typing import Any

from edge_runtime.runtime.budget import MemoryPlan, ModelShape, model_shape, plan_memory
from edge_runtime.runtime.models import default_model_path, resolve_model

__all__ = ["AdapterManager", "AdapterState", "AppliedAdapter", "Engine", "EngineSettings", "MemoryPlan", "ModelShape",
           "Runtime", "SamplingParams", "default_model_path", "model_shape", "plan_for", "plan_memory",
           "resolve_model"]

_LAZY = {"Runtime": "core", "AppliedAdapter": "core", "plan_for": "core", "Engine": "engine",
         "EngineSettings": "engine", "SamplingParams": "generation", "AdapterManager": "adapters",
         "AdapterState": "adapters"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
