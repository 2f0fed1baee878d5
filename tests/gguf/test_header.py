"""The fast GGUF header reader agrees with gguf's GGUFReader and refuses damaged files with InvalidGGUF."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import pytest

from edge_runtime.errors import InvalidGGUF
from edge_runtime.gguf.header import read_header


def test_header_matches_gguf_reader_on_the_embedded_model(base_model: Path) -> None:
    ours = read_header(base_model)
    reference = gguf.GGUFReader(base_model)
    for key, reader_field in reference.fields.items():
        if key.startswith("GGUF."):
            continue
        field = ours.fields[key]
        if field.value is None:  # long arrays stay raw: compare their length
            assert field.count == len(reader_field.data), key
        elif isinstance(field.value, float):
            assert field.value == pytest.approx(reader_field.contents()), key
        else:
            assert field.value == reader_field.contents(), key
    assert len(ours.fields) == len([k for k in reference.fields if not k.startswith("GGUF.")])
    assert [(t.name, t.shape, t.ggml_type, t.n_bytes) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), t.tensor_type, int(t.n_bytes)) for t in reference.tensors]
    assert ours.fields["tokenizer.ggml.tokens"].count == 49152


def _header_bytes(base_model: Path, size: int) -> bytes:
    with base_model.open("rb") as handle:
        return handle.read(size)


@pytest.mark.parametrize("cut", [5, 24, 1000, 300_000])
def test_truncated_header_is_refused(tmp_path: Path, base_model: Path, cut: int) -> None:
    damaged = tmp_path / "cut.gguf"
    damaged.write_bytes(_header_bytes(base_model, cut))
    with pytest.raises(InvalidGGUF, match="truncated|past the end"):
        read_header(damaged)


def test_unsupported_version_is_refused(tmp_path: Path) -> None:
    damaged = tmp_path / "v9.gguf"
    damaged.write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0))
    with pytest.raises(InvalidGGUF, match="unsupported GGUF version 9"):
        read_header(damaged)


def test_implausible_counts_are_refused_before_any_allocation(tmp_path: Path) -> None:
    damaged = tmp_path / "huge.gguf"
    damaged.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2**40))
    with pytest.raises(InvalidGGUF, match="implausible count"):
        read_header(damaged)


def test_unknown_value_type_is_refused(tmp_path: Path) -> None:
    damaged = tmp_path / "type.gguf"
    damaged.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99))
    with pytest.raises(InvalidGGUF, match="unknown value type 99"):
        read_header(damaged)
