"""llama.cpp's own block (de)quantisers on numpy rows: ``ggml_quantize_chunk`` and ``dequantize_row_<type>``.

gguf-py quantises Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 but not the K-quants (Q4_K, Q5_K, Q6_K) that llama.cpp's Q4_K_M files
use, and its numpy dequantisers take seconds per model. llama-cpp-python ships the ggml library that has them all;
where gguf-py has the type too the bytes and values are the same (checked by the tests), 10-30x faster.

It touches llama_cpp only to find that library: it loads no model and runs no graph (so no OpenMP thread team), and
it is imported lazily, by a merge and by a conversion to q8_0. ``vocabulary.py`` is the converters' other
llama_cpp user (a base's tokenizer, for older aLoRA configs); ``engine.py`` stays the runtime's only one.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import gguf
import numpy as np

__all__ = ["dequantize_rows", "quantize_rows"]


@functools.cache
def _library() -> Any:
    from llama_cpp import _ggml  # the ggml shared library of the installed llama-cpp-python build

    return _ggml.libggml


@functools.cache
def _dequantize_row(qtype: gguf.GGMLQuantizationType) -> Any:
    # void dequantize_row_<type>(const block_<type> *x, float *y, int64_t k): ggml-quants.h, exported by ggml-base
    function = getattr(_library(), f"dequantize_row_{qtype.name.lower().replace('_k', '_K')}")
    function.restype = None
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return function


@functools.cache
def _quantize_chunk() -> Any:
    function = _library().ggml_quantize_chunk
    function.restype = ctypes.c_size_t
    # (type, const float *src, void *dst, int64 start, int64 nrows, int64 n_per_row, const float *imatrix)
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return function


def quantize_rows(matrix: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """``matrix`` (rows × n float32, n a multiple of the type's block) as ``qtype`` blocks: uint8, rows × bytes."""
    rows, n_per_row = matrix.shape
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if n_per_row % block_size:
        raise ValueError(f"rows of {n_per_row} values do not hold whole {qtype.name} blocks of {block_size}")
    source = np.ascontiguousarray(matrix, dtype=np.float32)
    out = np.empty((rows, n_per_row // block_size * type_size), dtype=np.uint8)
    written = _quantize_chunk()(int(qtype), source.ctypes.data, out.ctypes.data, 0, rows, n_per_row, None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {qtype.name}, expected {out.nbytes}")
    return out


def dequantize_rows(data: np.ndarray, qtype: gguf.GGMLQuantizationType, rows: int) -> np.ndarray:
    """``qtype`` blocks (uint8, any shape) as float32, ``rows`` × values per row."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    source = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if source.size % (rows * type_size):
        raise ValueError(f"{source.size} bytes are not {rows} rows of whole {qtype.name} blocks")
    out = np.empty((rows, source.size // type_size * block_size // rows), dtype=np.float32)
    _dequantize_row(qtype)(source.ctypes.data, out.ctypes.data, out.size)
    return out
