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


def _gguf(fields: bytes, n_fields: int, tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_fields) + fields + tensors


def _text(value: str) -> bytes:
    return struct.pack("<Q", len(value)) + value.encode()


ARRAY, UINT32 = 9, 4


def _nested_arrays(depth: int) -> bytes:
    field = _text("hostile.nesting") + struct.pack("<I", ARRAY)
    for _ in range(depth - 1):
        field += struct.pack("<IQ", ARRAY, 1)  # an array of one array of ...
    return field + struct.pack("<IQ", UINT32, 1) + struct.pack("<I", 7)


def _tensor(name: str, shape: tuple[int, ...]) -> bytes:
    return _text(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape) + \
        struct.pack("<IQ", 0, 0)


@pytest.mark.parametrize(("fields", "n_fields", "tensors", "problem"), [
    (_nested_arrays(100_000), 1, b"", "arrays nested deeper than 4"),  # was RecursionError
    (b"", 0, _tensor("blk.0.attn_q.weight.lora_a", ()), "has 0 dimensions"),  # was IndexError downstream
    (b"", 0, _tensor("blk.0.attn_q.weight.lora_a", (576,)), "has 1 dimensions, not 2"),
], ids=["deep-nesting", "zero-dimensions", "one-dimensional-lora"])
def test_hostile_headers_are_invalid_gguf_not_a_crash(tmp_path: Path, fields: bytes, n_fields: int, tensors: bytes,
                                                      problem: str) -> None:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(_gguf(fields, n_fields, tensors, 1 if tensors else 0))
    with pytest.raises(InvalidGGUF, match=problem):
        read_header(path)


def test_nesting_that_real_files_use_still_parses(tmp_path: Path) -> None:
    path = tmp_path / "nested.gguf"
    path.write_bytes(_gguf(_nested_arrays(2), 1))
    assert read_header(path).fields["hostile.nesting"].count == 1


def test_errors_name_files_by_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 18 item 19: relative paths leaked into messages, read by someone whose working folder is another.
    from edge_runtime.errors import GGUFNotFound, InvalidGGUF

    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFNotFound) as missing:
        read_header(Path("missing.gguf"))
    assert missing.value.path == str(tmp_path / "missing.gguf") and str(tmp_path / "missing.gguf") in str(
        missing.value)
    with pytest.raises(InvalidGGUF) as junk:
        read_header(Path("junk.gguf"))
    assert str(junk.value).startswith(f"{tmp_path / 'junk.gguf'} is not a readable GGUF file")
