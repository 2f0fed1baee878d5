"""The device side: the resident base model, its adapters under a memory budget, and the memory plan.

No HTTP and no network here (``distribution`` brings adapters to disk; ``serve`` exposes this over HTTP). Names
load on first use: importing this package (or a leaf such as ``runtime.plan``) loads no llama.cpp; only
``engine.py`` imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_runtime.lazy import lazy_attributes

__all__ = [
    "AdapterManager",
    "AdapterRequest",
    "AdapterState",
    "AppliedAdapter",
    "Engine",
    "EngineSettings",
    "MemoryPlan",
    "ModelShape",
    "Runtime",
    "SamplingParams",
    "default_model_path",
    "model_shape",
    "plan_for",
    "plan_memory",
    "resolve_model",
]

if TYPE_CHECKING:  # the names as type checkers see them; at run time _LAZY loads each on first use
    from edge_runtime.runtime.adapters import AdapterManager, AdapterState
    from edge_runtime.runtime.budget import MemoryPlan, ModelShape, model_shape, plan_memory
    from edge_runtime.runtime.core import Runtime
    from edge_runtime.runtime.engine import Engine
    from edge_runtime.runtime.generation import SamplingParams
    from edge_runtime.runtime.models import default_model_path, resolve_model
    from edge_runtime.runtime.plan import EngineSettings, plan_for
    from edge_runtime.runtime.requests import AdapterRequest, AppliedAdapter

_LAZY = {
    "Runtime": "core",
    "AppliedAdapter": "requests",
    "AdapterRequest": "requests",
    "plan_for": "plan",
    "EngineSettings": "plan",
    "Engine": "engine",
    "SamplingParams": "generation",
    "AdapterManager": "adapters",
    "AdapterState": "adapters",
    "MemoryPlan": "budget",
    "ModelShape": "budget",
    "model_shape": "budget",
    "plan_memory": "budget",
    "default_model_path": "models",
    "resolve_model": "models",
}

_load = lazy_attributes(__name__, _LAZY)


def __getattr__(name: str) -> Any:
    return _load(name)
