"""The tensor types a merged weight may be written in, and how ``auto`` chooses one per tensor.

A merged tensor is ``W + ΔW``: the base weight dequantised to float32 plus the adapter's scaled ``B·A``. Writing
it in a block type rounds the whole sum again, and what that rounding costs is measured against what the adapter
changes: ``‖decode(encode(W + ΔW)) − (W + ΔW)‖ / ‖ΔW‖``, the *delta error*. ``auto`` writes each tensor in the
most compact of (the base tensor's own type, q8_0, f16, f32) whose delta error is at most ``AUTO_MAX_DELTA_ERROR``.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from edge_runtime.errors import InvalidSettings
from edge_runtime.gguf.outtypes import AUTO, BASE, MERGE_OUTTYPES, TENSOR_OUTTYPES

T = gguf.GGMLQuantizationType

# Named output types: numpy or gguf-py encode the float ones, llama.cpp's quantiser the block ones. With ``auto``
# each tensor gets the most compact type that keeps the delta error within AUTO_MAX_DELTA_ERROR.
OUTTYPES: dict[str, T] = {name: gguf.GGMLQuantizationType[name.upper()] for name in TENSOR_OUTTYPES}
AUTO_MAX_DELTA_ERROR = 0.01
# What llama.cpp's quantiser writes when rows do not hold whole blocks of the requested type (llama-quant.cpp).
_ROW_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_FLOAT_TYPES = (T.F32, T.F16, T.BF16)


@dataclass(frozen=True)
class EncodedTensor:
    """A merged tensor as written: its type, its bytes and its delta error (0.0 when the delta is zero)."""

    qtype: T
    data: np.ndarray
    delta_error: float


def check_outtype(outtype: str) -> str:
    """``outtype`` if ``merge`` knows it, else ``InvalidSettings`` naming the choices."""
    if outtype not in MERGE_OUTTYPES:
        raise InvalidSettings(
            "outtype",
            outtype,
            f"must be one of {', '.join(MERGE_OUTTYPES)}",
            fix="Pass --outtype auto (the default), base, or a tensor type such as q8_0 or f16",
        )
    return outtype


def decode(raw: memoryview | bytes | np.ndarray, qtype: T, rows: int) -> np.ndarray:
    """A tensor's stored bytes as float32, ``rows`` × values per row."""
    data = np.frombuffer(raw, dtype=np.uint8).reshape(rows, -1)
    if qtype in _FLOAT_TYPES:
        return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32).reshape(rows, -1)
    from converters.ggml_quantize import dequantize_rows

    return dequantize_rows(data, qtype, rows)


def encode(matrix: np.ndarray, qtype: T) -> np.ndarray:
    """``matrix`` (float32, rows × values) in ``qtype``'s stored form (an f32 matrix is returned without a copy)."""
    if qtype == T.F32:
        return np.ascontiguousarray(matrix, dtype=np.float32)
    if qtype == T.F16:
        return matrix.astype(np.float16)
    if qtype == T.BF16:
        return gguf.quants.quantize(np.ascontiguousarray(matrix, dtype=np.float32), qtype)
    from converters.ggml_quantize import quantize_rows

    return quantize_rows(matrix, qtype)


def fitting_type(qtype: T, n_per_row: int) -> T:
    """``qtype``, or what llama.cpp writes instead when rows of ``n_per_row`` values do not hold whole blocks."""
    while n_per_row % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = _ROW_FALLBACK.get(qtype, T.F16)
    return qtype


def encode_merged(merged: np.ndarray, delta: np.ndarray, *, outtype: str, base_type: T) -> EncodedTensor:
    """``merged`` (= W + delta) encoded as ``outtype`` asks: a named type, the base's own, or ``auto``'s choice."""
    delta_norm = float(np.linalg.norm(delta))
    if outtype != AUTO:
        qtype = base_type if outtype == BASE else fitting_type(OUTTYPES[outtype], merged.shape[1])
        data = encode(merged, qtype)
        return EncodedTensor(qtype, data, _delta_error(merged, data, qtype, delta_norm))
    candidates = sorted({base_type, T.Q8_0, T.F16, T.F32}, key=_bits_per_value)
    for qtype in candidates:
        if not _encodable(qtype, merged.shape[1]):
            continue
        data = encode(merged, qtype)
        error = _delta_error(merged, data, qtype, delta_norm)
        if error <= AUTO_MAX_DELTA_ERROR:
            return EncodedTensor(qtype, data, error)
    raise AssertionError("f32 always holds W + ΔW exactly")  # pragma: no cover


def _delta_error(merged: np.ndarray, data: np.ndarray, qtype: T, delta_norm: float) -> float:
    if qtype == T.F32:
        return 0.0
    error = float(np.linalg.norm(decode(data, qtype, merged.shape[0]) - merged))
    if delta_norm == 0.0:
        return 0.0 if error == 0.0 else float("inf")
    return error / delta_norm


def _encodable(qtype: T, n_per_row: int) -> bool:
    return (qtype in _FLOAT_TYPES or qtype in OUTTYPES.values()) and n_per_row % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def _bits_per_value(qtype: T) -> float:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return 8 * type_size / block_size
