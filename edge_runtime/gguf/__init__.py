"""Reading GGUF files without loading them: a bounded header reader and what a file is (adapter or base model).

Shared by every half of edge-rt; it imports neither llama.cpp nor the network.
"""

from __future__ import annotations

from edge_runtime.gguf.header import GGUFHeader, HeaderTensor, read_header
from edge_runtime.gguf.info import GGUFInfo, base_fingerprint, read_info

__all__ = ["GGUFHeader", "GGUFInfo", "HeaderTensor", "base_fingerprint", "read_header", "read_info"]
