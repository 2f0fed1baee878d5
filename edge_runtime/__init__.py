"""edge-rt: one resident INT4 base model, task LoRA adapters converted, distributed and hot-applied on device."""

from edge_runtime.errors import EdgeRtError
from edge_runtime.gguf_info import GGUFInfo, read_info
from edge_runtime.models import default_model_path, resolve_model

__version__ = "0.1.0"

__all__ = ["EdgeRtError", "GGUFInfo", "__version__", "default_model_path", "read_info", "resolve_model"]
