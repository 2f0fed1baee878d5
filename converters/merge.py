"""GGUF LoRA + base GGUF → one model GGUF with the adapter folded in (``edge-rt merge``).

llama.cpp computes ``y = W·x + s·(alpha / rank)·B·A·x`` for an unmerged adapter at scale ``s``. The merged model
stores ``W' = W + s·(alpha / rank)·B·A`` instead, so it pays nothing per token. The adapter GGUF is already in
llama.cpp's layout (the converter permuted q/k rows and folded PEFT's rsLoRA and pattern scales into ``lora_b``), so
``B·A`` adds to the base tensor as it is stored. Tensors the adapter does not touch are copied byte for byte; each
adapted one is dequantised, summed in float32 and written in the type ``outtype`` asks for (see weight_types.py).
One tensor is in memory at a time; the base and adapter are read through memory maps.
"""

from __future__ import annotations

import math
import mmap
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from converters.errors import UnsupportedAdapterFeature
from converters.model_writer import ModelWriter, TensorSlot, metadata_value
from converters.weight_types import OUTTYPES, EncodedTensor, check_outtype, decode, encode_merged
from edge_runtime.errors import IncompatibleAdapter, InvalidGGUF, InvalidSettings
from edge_runtime.files import atomic_output, file_sha256, user_file_mode
from edge_runtime.gguf import info as gguf_info
from edge_runtime.gguf import keys
from edge_runtime.gguf.header import GGUFHeader, HeaderTensor, read_header
from edge_runtime.gguf.outtypes import AUTO

__all__ = ["MergeResult", "merge_adapter"]

ProgressCallback = Callable[[int, int], None]
"""Called with (base tensor bytes processed so far, total) after each tensor."""


@dataclass(frozen=True)
class MergeResult:
    """What ``merge_adapter`` wrote."""

    output: Path
    adapter_name: str
    adapter_sha256: str
    base_fingerprint: str
    scale: float
    outtype: str
    merged_tensors: int
    copied_tensors: int
    merged_types: dict[str, int]  # GGML type name → merged tensors written in it
    max_delta_error: float  # the worst merged tensor's ‖written − exact‖ / ‖ΔW‖
    size_bytes: int


@dataclass(frozen=True)
class _Lora:
    lora_a: HeaderTensor  # GGUF [in, rank]: rank rows of `in` values
    lora_b: HeaderTensor  # GGUF [rank, out]: `out` rows of rank values
    scale: float  # user scale × alpha / rank, as llama.cpp applies it


FLOAT32_MAX = 3.4028234663852886e38


def merge_adapter(
    adapter: str | Path,
    *,
    base: str | Path,
    output: str | Path,
    scale: float = 1.0,
    outtype: str = AUTO,
    progress: ProgressCallback | None = None,
) -> MergeResult:
    """Fold the GGUF LoRA ``adapter`` at ``scale`` into ``base`` and write the complete model to ``output``."""
    check_outtype(outtype)
    if not math.isfinite(scale) or abs(scale) > FLOAT32_MAX:  # it is stored as a float32
        raise InvalidSettings("scale", scale, "must be a finite float32 number", fix="Pass --scale 1 (the default)")
    adapter, base, output = Path(adapter), Path(base), Path(output)
    for source in (adapter, base):
        if output.resolve() == source.resolve():  # the atomic replace would destroy the input (a typo away)
            raise InvalidSettings(
                "output", str(output), f"is the input {source.name}", fix="Write the merged model to a new file"
            )
    adapter_header, base_header = read_header(adapter), read_header(base)
    _check_adapter(adapter_header)
    if base_header.value(keys.TYPE) == "adapter":
        raise InvalidGGUF(str(base), "this is a LoRA adapter, not a base model")
    fingerprint = gguf_info.base_fingerprint(base_header)
    loras = _pair_with_base(adapter_header, base_header, fingerprint, scale)
    adapter_name = str(adapter_header.value(keys.ADAPTER_NAME) or adapter_header.value(keys.NAME) or adapter.stem)
    adapter_sha256 = file_sha256(adapter).hexdigest()
    extra = {
        keys.MERGE_ADAPTER_NAME: metadata_value(adapter_name),
        keys.MERGE_ADAPTER_SHA256: metadata_value(adapter_sha256),
        keys.MERGE_BASE_FINGERPRINT: metadata_value(fingerprint),
        keys.MERGE_BASE_NAME: metadata_value(str(base_header.value(keys.NAME, base.stem))),
        keys.MERGE_SCALE: metadata_value(float(scale)),
        keys.MERGE_OUTTYPE: metadata_value(outtype),
        keys.FILE_TYPE: metadata_value(0),  # decided once the tensors' types are (_main_file_type)
    } | _file_type(outtype)
    with (
        atomic_output(output, mode=user_file_mode()) as temp,
        _mapped(base_header) as base_file,
        _mapped(adapter_header) as adapter_file,
    ):
        slots = [TensorSlot(t.name, t.shape) for t in base_header.tensors]
        with temp.open("wb") as handle:
            writer = ModelWriter(handle, base_header, extra, slots)
            types, errors = _write_tensors(writer, slots, base_file, adapter_file, loras, outtype, progress)
            if outtype not in OUTTYPES:  # auto and base choose per tensor: name what most of the weights became
                writer.patch(keys.FILE_TYPE, _main_file_type(slots, base_header))
            writer.finish()
    return MergeResult(
        output=output,
        adapter_name=adapter_name,
        adapter_sha256=adapter_sha256,
        base_fingerprint=fingerprint,
        scale=scale,
        outtype=outtype,
        merged_tensors=len(loras),
        copied_tensors=len(base_header.tensors) - len(loras),
        merged_types=dict(sorted(types.items())),
        max_delta_error=max(errors, default=0.0),
        size_bytes=output.stat().st_size,
    )


def _write_tensors(
    writer: ModelWriter,
    slots: list[TensorSlot],
    base: _MappedFile,
    adapter: _MappedFile,
    loras: dict[str, _Lora],
    outtype: str,
    progress: ProgressCallback | None,
) -> tuple[Counter[str], list[float]]:
    """Write every tensor in the base's order; merges run on one thread per core, at most two per thread ahead."""
    types: Counter[str] = Counter()
    errors: list[float] = []
    total, done = sum(t.n_bytes for t in base.header.tensors), 0
    workers = os.cpu_count() or 1
    pending: deque[tuple[HeaderTensor, TensorSlot, Future[EncodedTensor] | None]] = deque()

    def write_ready(*, everything: bool) -> None:
        nonlocal done
        while pending and (everything or len(pending) > 2 * workers or pending[0][2] is None or pending[0][2].done()):
            tensor, slot, merging = pending.popleft()
            if merging is None:
                writer.write(slot, base.data(tensor), tensor.ggml_type)  # byte for byte: never requantised
            else:
                encoded = merging.result()
                writer.write(slot, encoded.data.data.cast("B"), encoded.qtype)
                types[encoded.qtype.name] += 1
                errors.append(encoded.delta_error)
            done += tensor.n_bytes
            if progress is not None:
                progress(done, total)

    # numpy's matmul and ggml's (de)quantisers release the GIL: threads use every core.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for tensor, slot in zip(base.header.tensors, slots):
                lora = loras.get(tensor.name)
                merging = None if lora is None else pool.submit(_merge, base, adapter, tensor, lora, outtype)
                pending.append((tensor, slot, merging))
                write_ready(everything=False)
            write_ready(everything=True)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return types, errors


def _merge(base: _MappedFile, adapter: _MappedFile, tensor: HeaderTensor, lora: _Lora, outtype: str) -> EncodedTensor:
    lora_a = decode(adapter.data(lora.lora_a), lora.lora_a.ggml_type, rows=lora.lora_a.shape[1])
    lora_b = decode(adapter.data(lora.lora_b), lora.lora_b.ggml_type, rows=lora.lora_b.shape[1])
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, as a typed error
        delta = (lora_b @ lora_a) * np.float32(lora.scale)  # (out × rank)·(rank × in): the base's (out × in)
        merged = decode(base.data(tensor), tensor.ggml_type, rows=tensor.shape[1]) + delta
    if not np.isfinite(merged).all():
        del lora_a, lora_b, delta, merged  # views of the mapped files: the traceback must not keep them open
        raise InvalidSettings(
            "scale",
            lora.scale,
            f"overflows float32 in {tensor.name}",
            fix="Pass a smaller --scale (1 applies the adapter as trained)",
        )
    return encode_merged(merged, delta, outtype=outtype, base_type=tensor.ggml_type)


def _check_adapter(header: GGUFHeader) -> None:
    if header.value(keys.TYPE) != "adapter" or header.value(keys.ADAPTER_TYPE) != "lora":
        raise InvalidGGUF(str(header.path), "not a LoRA adapter (general.type=adapter, adapter.type=lora)")
    if keys.ALORA_INVOCATION_TOKENS in header.fields:
        raise UnsupportedAdapterFeature(
            "aLoRA",
            keys.ALORA_INVOCATION_TOKENS,
            fix="An activated LoRA applies only after its invocation tokens; merged, it would "
            "apply everywhere. Serve it unmerged with `edge-rt serve --adapters-dir`",
        )


def _pair_with_base(adapter: GGUFHeader, base: GGUFHeader, fingerprint: str, scale: float) -> dict[str, _Lora]:
    """Base tensor name → its LoRA; ``IncompatibleAdapter`` when the adapter was made for another base model."""
    made_for = adapter.value(keys.BASE_FINGERPRINT)
    if made_for is not None and made_for != fingerprint:
        raise IncompatibleAdapter(
            f"{adapter.path.name} was converted for another base model (fingerprint {str(made_for)[:12]}, "
            f"{adapter.value(keys.BASE_NAME, 'unnamed')}) than {base.path.name} ({fingerprint[:12]})",
            fix="Pass --base the model the adapter was converted for",
        )
    alpha = float(adapter.value(gguf.Keys.Adapter.LORA_ALPHA, 0.0))
    halves = {t.name: t for t in adapter.tensors}
    targets = {t.name: t for t in base.tensors}
    loras: dict[str, _Lora] = {}
    for name, lora_a in halves.items():
        if not name.endswith(".lora_a"):
            continue
        target_name = name.removesuffix(".lora_a")
        lora_b, target = halves.get(f"{target_name}.lora_b"), targets.get(target_name)
        if lora_b is None:
            raise InvalidGGUF(str(adapter.path), f"{name} has no matching {target_name}.lora_b")
        if (
            target is None
            or len(target.shape) != 2
            or lora_a.shape[0] != target.shape[0]
            or lora_b.shape[1] != target.shape[1]
            or lora_a.shape[1] != lora_b.shape[0]
        ):
            raise IncompatibleAdapter(
                f"{adapter.path.name}: {name} {list(lora_a.shape)} / lora_b {list(lora_b.shape)} do not fit the base "
                f"tensor {target_name} {list(target.shape) if target else '(missing)'} of {base.path.name}",
                fix="Pass --base the model the adapter was converted for",
            )
        rank = lora_a.shape[1]
        loras[target_name] = _Lora(lora_a, lora_b, scale * (alpha / rank if alpha else 1.0))
    if not loras:
        raise InvalidGGUF(str(adapter.path), "holds no LoRA tensors")
    if len(loras) * 2 != len(halves):
        raise InvalidGGUF(str(adapter.path), "holds tensors that are not lora_a/lora_b pairs")
    return loras


def _file_type(outtype: str) -> dict[str, bytes]:
    # general.file_type names the model's main weight type (inspect shows it); a named outtype changes it.
    if outtype not in OUTTYPES:
        return {}
    qtype = OUTTYPES[outtype]
    name = "ALL_F32" if qtype == gguf.GGMLQuantizationType.F32 else f"MOSTLY_{qtype.name}"
    member = gguf.LlamaFileType.__members__.get(name)
    return {} if member is None else {gguf.Keys.General.FILE_TYPE: metadata_value(int(member))}


def _main_file_type(slots: list[TensorSlot], base: GGUFHeader) -> bytes:
    """general.file_type for per-tensor choices: the type of the matrices holding most of the bytes (the base's own
    value when that type has no LlamaFileType name)."""
    weights: dict[gguf.GGMLQuantizationType, int] = {}
    for slot in slots:
        if len(slot.shape) >= 2:
            weights[slot.qtype] = weights.get(slot.qtype, 0) + math.prod(slot.shape)
    if weights:
        main = max(weights, key=lambda qtype: weights[qtype])
        name = "ALL_F32" if main == gguf.GGMLQuantizationType.F32 else f"MOSTLY_{main.name}"
        member = gguf.LlamaFileType.__members__.get(name)
        if member is not None:
            return metadata_value(int(member))
    return metadata_value(int(base.value(keys.FILE_TYPE, 0)))


@dataclass(frozen=True)
class _MappedFile:
    header: GGUFHeader
    bytes: memoryview

    def data(self, tensor: HeaderTensor) -> memoryview:
        start = self.header.data_offset + tensor.offset
        return self.bytes[start : start + tensor.n_bytes]


@contextmanager
def _mapped(header: GGUFHeader) -> Iterator[_MappedFile]:
    """``header``'s file mapped read-only, every tensor checked to lie inside it."""
    with header.path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        for tensor in header.tensors:
            if header.data_end(tensor) > len(mapped):
                raise InvalidGGUF(str(header.path), f"tensor {tensor.name} runs past the end of the file (truncated?)")
        view = memoryview(mapped)
        try:
            yield _MappedFile(header, view)
        finally:
            view.release()
