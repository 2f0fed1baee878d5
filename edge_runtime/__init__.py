"""edge-rt: one resident INT4 base model, task LoRA adapters converted, distributed and hot-applied on device.

Every name loads on first use: ``import edge_runtime`` (or any leaf module) loads nothing else, so commands such as
``edge-rt inspect`` never load llama.cpp and the distribution code never loads the runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_runtime.lazy import lazy_attributes

__version__ = "0.1.0"

if TYPE_CHECKING:  # the names as type checkers see them; at run time _LAZY loads each on first use
    from edge_runtime.errors import EdgeRtError
    from edge_runtime.gguf.info import GGUFInfo, read_info
    from edge_runtime.profiles import DeviceProfile, list_profiles, load_profile
    from edge_runtime.runtime.adapters import AdapterState
    from edge_runtime.runtime.core import Runtime
    from edge_runtime.runtime.generation import SamplingParams
    from edge_runtime.runtime.models import default_model_path, resolve_model
    from edge_runtime.runtime.requests import AdapterRequest

_LAZY = {
    "EdgeRtError": "edge_runtime.errors",
    "GGUFInfo": "edge_runtime.gguf.info",
    "read_info": "edge_runtime.gguf.info",
    "DeviceProfile": "edge_runtime.profiles",
    "list_profiles": "edge_runtime.profiles",
    "load_profile": "edge_runtime.profiles",
    "default_model_path": "edge_runtime.runtime.models",
    "resolve_model": "edge_runtime.runtime.models",
    "Runtime": "edge_runtime.runtime.core",
    "SamplingParams": "edge_runtime.runtime.generation",
    "AdapterState": "edge_runtime.runtime.adapters",
    "AdapterRequest": "edge_runtime.runtime.requests",
}

__all__ = [
    "AdapterRequest",
    "AdapterState",
    "DeviceProfile",
    "EdgeRtError",
    "GGUFInfo",
    "Runtime",
    "SamplingParams",
    "__version__",
    "default_model_path",
    "list_profiles",
    "load_profile",
    "read_info",
    "resolve_model",
]

_load = lazy_attributes(__name__, _LAZY)


def __getattr__(name: str) -> Any:
    return _load(name)
