"""The device side: the resident base model, its adapters under a memory budget, and the memory plan.

No HTTP and no network here (``distribution`` brings adapters to disk; ``serve`` exposes this over HTTP). Names
load on first use: importing this package (or a leaf such as ``runtime.plan``) loads no llama.cpp; only
``engine.py`` imports it.
"""

from __future__ import annotations

from typing import Any

from edge_runtime.lazy import lazy_attributes

__all__ = ["AdapterManager", "AdapterRequest", "AdapterState", "AppliedAdapter", "Engine", "EngineSettings",
           "MemoryPlan", "ModelShape", "Runtime", "SamplingParams", "default_model_path", "model_shape", "plan_for",
           "plan_memory", "resolve_model"]

_LAZY = {"Runtime": "core", "AppliedAdapter": "requests", "AdapterRequest": "requests", "plan_for": "plan",
         "EngineSettings": "plan",
         "Engine": "engine", "SamplingParams": "generation", "AdapterManager": "adapters", "AdapterState": "adapters",
         "MemoryPlan": "budget", "ModelShape": "budget", "model_shape": "budget", "plan_memory": "budget",
         "default_model_path": "models", "resolve_model": "models"}

_load = lazy_attributes(__name__, {name: f".{module}" for name, module in _LAZY.items()})


def __getattr__(name: str) -> Any:
    return _load(name)
