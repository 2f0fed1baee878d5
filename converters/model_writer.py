"""A streaming GGUF model writer: the base's metadata copied byte for byte, tensors written one at a time.

gguf's ``GGUFWriter`` needs every tensor's type and size before the first data byte, which for ``merge --outtype
auto`` is only known after the tensor was merged; holding all merged tensors until then would hold the model twice.
A tensor info has a fixed length whatever its type and offset (u32 type, u64 offset), so this writer lays out the
header with placeholders, streams the tensor data, and then rewrites the tensor infos in place.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import BinaryIO

import gguf

from edge_runtime.gguf import keys
from edge_runtime.gguf.header import GGUFHeader, HeaderField

__all__ = ["ModelWriter", "TensorSlot", "metadata_value"]

GGUF_VERSION = 3


class TensorSlot:
    """One tensor of the output: name and shape (GGUF order) fixed up front; type and offset set when written."""

    def __init__(self, name: str, shape: Sequence[int]) -> None:
        self.name = name
        self.shape = tuple(shape)
        self.qtype = gguf.GGMLQuantizationType.F32
        self.offset = 0

    def info_bytes(self) -> bytes:
        """The tensor info record as GGUF stores it."""
        dims = struct.pack(f"<I{len(self.shape)}Q", len(self.shape), *self.shape)
        return _string(self.name) + dims + struct.pack("<IQ", int(self.qtype), self.offset)


class ModelWriter:
    """Writes a GGUF whose metadata is ``base``'s (with ``extra`` keys added or replaced) and whose tensors are
    ``slots``, in order: call ``write(slot, data)`` once per slot, then ``finish()``."""

    def __init__(
        self, handle: BinaryIO, base: GGUFHeader, extra: dict[str, bytes], slots: Sequence[TensorSlot]
    ) -> None:
        self._handle = handle
        self._slots = list(slots)
        self._alignment = int(base.value(keys.ALIGNMENT, 32))
        fields = {key: _raw_field(item) for key, item in base.fields.items()} | extra
        handle.write(b"GGUF" + struct.pack("<IQQ", GGUF_VERSION, len(self._slots), len(fields)))
        self._values: dict[str, tuple[int, int]] = {}  # key -> (offset, length) of its value, for ``patch``
        for key, value in fields.items():
            handle.write(_string(key))
            self._values[key] = (handle.tell(), len(value))
            handle.write(value)
        self._infos_at = handle.tell()
        for slot in self._slots:
            handle.write(slot.info_bytes())
        self._pad()
        self._data_start = handle.tell()
        self._next = 0

    def write(self, slot: TensorSlot, data: bytes | memoryview, qtype: gguf.GGMLQuantizationType) -> None:
        """Write ``slot``'s data (the next slot in order), stored as ``qtype``."""
        if self._slots[self._next] is not slot:
            raise ValueError(f"tensor {slot.name} written out of order")
        self._next += 1
        slot.qtype = qtype
        slot.offset = self._handle.tell() - self._data_start
        self._handle.write(data)
        self._pad()

    def patch(self, key: str, value: bytes) -> None:
        """Overwrite metadata ``key``'s value with ``value`` of the same encoded length (a uint32 decided late)."""
        offset, length = self._values[key]
        if len(value) != length:
            raise ValueError(f"{key}: a {len(value)}-byte value cannot replace a {length}-byte one")
        end = self._handle.tell()
        self._handle.seek(offset)
        self._handle.write(value)
        self._handle.seek(end)

    def finish(self) -> None:
        """Rewrite the tensor infos with the types and offsets the data was written with."""
        if self._next != len(self._slots):
            raise ValueError(f"{len(self._slots) - self._next} tensors were not written")
        end = self._handle.tell()
        self._handle.seek(self._infos_at)
        self._handle.write(b"".join(slot.info_bytes() for slot in self._slots))
        self._handle.seek(end)

    def _pad(self) -> None:
        self._handle.write(b"\0" * (-self._handle.tell() % self._alignment))


def metadata_value(value: str | float | int) -> bytes:
    """A metadata value as GGUF stores it after its key: a string, a float32 or a uint32."""
    if isinstance(value, str):
        return struct.pack("<I", gguf.GGUFValueType.STRING) + _string(value)
    if isinstance(value, float):
        return struct.pack("<If", gguf.GGUFValueType.FLOAT32, value)
    return struct.pack("<II", gguf.GGUFValueType.UINT32, value)


def _raw_field(item: HeaderField) -> bytes:
    return struct.pack("<I", item.value_type) + item.raw


def _string(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return struct.pack("<Q", len(encoded)) + encoded
