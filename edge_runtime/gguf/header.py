"""A fast, bounded reader for the GGUF header: metadata key/values and tensor infos, never tensor data.

gguf's ``GGUFReader`` builds a numpy view per array element, which costs 2-4 s on SmolLM2's 49k-token vocabulary
and ~10 s on Llama 3's; edge-rt reads base-model headers at every conversion and every daemon start. This reader
walks the same layout (GGUF v2/v3, little-endian) with ``struct`` over a memory map, decodes scalars and short
arrays, and keeps long arrays as raw bytes. Every count and length is checked against the file size.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from edge_runtime.errors import GGUFNotFound, InvalidGGUF
from edge_runtime.gguf import keys

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_NESTING = 4
DECODED_ARRAY_LIMIT = 64  # longer arrays (vocabularies, merges) stay raw bytes
_MAX_COUNT = 1 << 24

_SCALARS: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<?"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class HeaderField:
    """One metadata key/value: its types, its raw value bytes, and its decoded value (None for long arrays)."""

    key: str
    value_type: GGUFValueType
    item_type: GGUFValueType | None  # for arrays
    count: int  # array length; 1 for scalars and strings
    raw: bytes  # the value exactly as stored (array header included)
    value: Any


@dataclass(frozen=True)
class HeaderTensor:
    """One tensor info: name, dimensions in GGUF order (ne[0] first), GGML type and size in bytes."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    n_elements: int
    n_bytes: int
    offset: int = 0  # of its data, in bytes from the start of the data section (GGUFHeader.data_offset)


@dataclass(frozen=True)
class GGUFHeader:
    """Everything before a GGUF file's tensor data."""

    path: Path
    version: int
    fields: dict[str, HeaderField]
    tensors: tuple[HeaderTensor, ...]
    data_offset: int = 0  # where tensor data starts in the file: the header's end, aligned to general.alignment

    def value(self, key: str, default: Any = None) -> Any:
        """The decoded value of ``key``, or ``default`` when absent."""
        found = self.fields.get(key)
        return default if found is None else found.value

    def data_end(self, tensor: HeaderTensor) -> int:
        """The byte after ``tensor``'s data in the file (past the file's size: truncated, or still being written)."""
        return self.data_offset + tensor.offset + tensor.n_bytes


def read_header(path: Path | str) -> GGUFHeader:
    """Parse ``path``'s GGUF header; raise ``InvalidGGUF`` for anything that is not a well-formed GGUF file."""
    path = Path(path)
    if not path.exists():
        raise GGUFNotFound(str(path))
    if not path.is_file():
        raise InvalidGGUF(str(path), "not a regular file")
    with path.open("rb") as handle:
        if handle.read(4) != MAGIC:
            raise InvalidGGUF(str(path), "the file does not start with the GGUF magic bytes")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            try:
                return _Parser(path, view).parse()
            except InvalidGGUF:
                raise  # already says what is wrong (it is a ValueError too: not to be wrapped again)
            except (struct.error, IndexError, UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise InvalidGGUF(str(path), f"truncated or corrupt header ({exc})") from exc


class _Parser:
    def __init__(self, path: Path, view: mmap.mmap) -> None:
        self.path = path
        self.view = view
        self.offset = 4

    def parse(self) -> GGUFHeader:
        version = self._unpack(_U32)
        if version not in (2, 3):
            detail = "big-endian files are not supported" if version > 0xFFFF else f"version {version}"
            raise InvalidGGUF(str(self.path), f"unsupported GGUF {detail}")
        n_tensors, n_fields = self._count(), self._count()
        fields: dict[str, HeaderField] = {}
        for _ in range(n_fields):
            item = self._field()
            fields[item.key] = item
        tensors = tuple(self._tensor() for _ in range(n_tensors))
        alignment = fields[keys.ALIGNMENT].value if keys.ALIGNMENT in fields else DEFAULT_ALIGNMENT
        if not isinstance(alignment, int) or alignment <= 0:
            raise InvalidGGUF(str(self.path), f"{keys.ALIGNMENT} is {alignment!r}")
        data_offset = -(-self.offset // alignment) * alignment
        return GGUFHeader(path=self.path, version=version, fields=fields, tensors=tensors, data_offset=data_offset)

    def _unpack(self, layout: struct.Struct) -> Any:
        if self.offset + layout.size > len(self.view):
            raise InvalidGGUF(str(self.path), f"truncated header at byte {self.offset}")
        (value,) = layout.unpack_from(self.view, self.offset)
        self.offset += layout.size
        return value

    def _count(self) -> int:
        count = int(self._unpack(_U64))
        if count > _MAX_COUNT:
            raise InvalidGGUF(str(self.path), f"implausible count {count} at byte {self.offset - 8}")
        return count

    def _string(self) -> str:
        length = int(self._unpack(_U64))
        end = self.offset + length
        if end > len(self.view):
            raise InvalidGGUF(str(self.path), f"string of {length} bytes runs past the end of the file")
        text = bytes(self.view[self.offset : end]).decode("utf-8")
        self.offset = end
        return text

    def _value_type(self) -> GGUFValueType:
        code = self._unpack(_U32)
        try:
            return GGUFValueType(code)
        except ValueError:
            raise InvalidGGUF(str(self.path), f"unknown value type {code} at byte {self.offset - 4}") from None

    def _field(self) -> HeaderField:
        key = self._string()
        value_type = self._value_type()
        start = self.offset
        item_type, count, value = None, 1, self._value(value_type)
        if value_type == GGUFValueType.ARRAY:
            item_type, count, value = value
        return HeaderField(
            key=key,
            value_type=value_type,
            item_type=item_type,
            count=count,
            raw=bytes(self.view[start : self.offset]),
            value=value,
        )

    def _value(self, value_type: GGUFValueType, depth: int = 0) -> Any:
        if value_type == GGUFValueType.STRING:
            return self._string()
        if value_type == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_NESTING:  # real files nest at most once; a hostile one could recurse forever
                raise InvalidGGUF(
                    str(self.path), f"arrays nested deeper than {MAX_ARRAY_NESTING} at byte {self.offset}"
                )
            item_type = self._value_type()
            count = self._count()
            if count <= DECODED_ARRAY_LIMIT:
                return item_type, count, [self._value(item_type, depth + 1) for _ in range(count)]
            self._skip(item_type, count, depth + 1)
            return item_type, count, None
        return self._unpack(_SCALARS[value_type])

    def _skip(self, item_type: GGUFValueType, count: int, depth: int) -> None:
        if item_type == GGUFValueType.STRING:
            # Hot loop (a vocabulary has 50k-250k strings): locals only.
            offset, view, unpack = self.offset, self.view, _U64.unpack_from
            for _ in range(count):
                offset += 8 + unpack(view, offset)[0]
            self.offset = offset
        elif item_type == GGUFValueType.ARRAY:
            for _ in range(count):
                self._value(GGUFValueType.ARRAY, depth)
        else:
            self.offset += _SCALARS[item_type].size * count
        if self.offset > len(self.view):
            raise InvalidGGUF(str(self.path), "an array runs past the end of the file")

    def _tensor(self) -> HeaderTensor:
        name = self._string()
        n_dims = self._unpack(_U32)
        if not 1 <= n_dims <= 8:
            raise InvalidGGUF(str(self.path), f"tensor {name!r} has {n_dims} dimensions")
        if name.endswith((".lora_a", ".lora_b")) and n_dims != 2:
            raise InvalidGGUF(str(self.path), f"LoRA tensor {name!r} has {n_dims} dimensions, not 2")
        shape = tuple(int(self._unpack(_U64)) for _ in range(n_dims))
        code = self._unpack(_U32)
        offset = int(self._unpack(_U64))  # tensor data is never read here
        try:
            ggml_type = GGMLQuantizationType(code)
        except ValueError:
            raise InvalidGGUF(str(self.path), f"tensor {name!r} has unknown type {code}") from None
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        return HeaderTensor(
            name=name,
            shape=shape,
            ggml_type=ggml_type,
            n_elements=n_elements,
            n_bytes=n_elements // block_size * type_size,
            offset=offset,
        )
