"""PEFT LoRA → GGUF LoRA: the file llama.cpp's ``llama_adapter_lora_init`` loads.

llama.cpp applies ``y += (alpha / rank) · B·A·x`` per tensor with one file-wide ``adapter.lora.alpha``. PEFT's
per-module scale (alpha/r or alpha/√r, with rank_pattern and alpha_pattern overrides) is made exact by folding
the ratio between the two into B, so every module computes exactly what PEFT computes. An activated LoRA (aLoRA)
carries its invocation tokens in ``adapter.alora.invocation_tokens`` (uint32), as llama.cpp's converter writes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from converters.architectures import BaseModelLayout, read_base_layout
from converters.errors import MalformedAdapter
from converters.peft_adapter import LoraPair, PeftAdapter, read_peft_adapter, resolve_peft_dir
from converters.weight_types import OUTTYPES as TENSOR_TYPES
from converters.weight_types import encode
from edge_runtime.errors import InvalidSettings
from edge_runtime.files import atomic_output, user_file_mode
from edge_runtime.gguf import info as gguf_info
from edge_runtime.gguf import keys
from edge_runtime.gguf.info import MAX_INVOCATION_TOKENS
from edge_runtime.gguf.outtypes import ADAPTER_OUTTYPES, DEFAULT_ADAPTER_OUTTYPE
from edge_runtime.names import validate_name

DEFAULT_OUTTYPE = DEFAULT_ADAPTER_OUTTYPE
OUTTYPES = {name: TENSOR_TYPES[name] for name in ADAPTER_OUTTYPES}  # what an adapter may be written in

ProgressCallback = Callable[[int, int], None]
"""Called with (bytes written so far, total bytes) while tensors are written."""


@dataclass(frozen=True)
class ConversionResult:
    """What ``convert_peft_to_gguf`` wrote."""

    output: Path
    name: str
    architecture: str
    tensor_count: int
    ranks: tuple[int, ...]
    alpha: float
    size_bytes: int
    base_fingerprint: str
    invocation_tokens: tuple[int, ...] = ()  # an aLoRA's invocation sequence; () for a plain LoRA


@dataclass(frozen=True)
class _PlannedTensor:
    name: str  # GGUF name of the LoRA half, e.g. blk.0.attn_q.weight.lora_a
    target: str  # GGUF name of the base tensor it adapts
    pair: LoraPair
    is_b: bool
    qtype: gguf.GGMLQuantizationType


def convert_peft_to_gguf(
    source: str | Path,
    *,
    base: str | Path,
    output: str | Path,
    outtype: str = DEFAULT_OUTTYPE,
    name: str | None = None,
    progress: ProgressCallback | None = None,
    description: str = "",
) -> ConversionResult:
    """Convert the PEFT adapter at ``source`` (a folder or ``hf://ORG/REPO[@REV]``) for ``base`` into ``output``.

    ``description`` lands in the GGUF's ``general.description`` (and so in a published manifest's entry).
    """
    if outtype not in ADAPTER_OUTTYPES:
        raise InvalidSettings(
            "outtype",
            outtype,
            f"must be one of {', '.join(ADAPTER_OUTTYPES)}",
            fix="Pass --outtype f32, f16, bf16 or q8_0",
        )
    output = Path(output)
    peft_dir = resolve_peft_dir(source)
    adapter = read_peft_adapter(peft_dir)
    layout = read_base_layout(str(base))
    adapter_name = validate_name(name or output.stem)
    alpha = adapter.config.lora_alpha
    plan = _plan(adapter, layout, OUTTYPES[outtype])
    invocation = invocation_tokens(adapter, layout)
    with atomic_output(output, mode=user_file_mode()) as temp:
        _write(temp, adapter, layout, adapter_name, alpha, plan, progress, description, invocation)
    ranks = tuple(sorted({p.pair.rank for p in plan}))
    return ConversionResult(
        output=output,
        name=adapter_name,
        architecture=layout.architecture,
        tensor_count=len(plan),
        ranks=ranks,
        alpha=alpha,
        size_bytes=output.stat().st_size,
        base_fingerprint=layout.fingerprint,
        invocation_tokens=invocation,
    )


def invocation_tokens(adapter: PeftAdapter, layout: BaseModelLayout) -> tuple[int, ...]:
    """An aLoRA's invocation sequence: ``alora_invocation_tokens``, else ``invocation_string`` tokenized with the
    base model's own vocabulary (as ``encode(text, add_special_tokens=False)``); () for a plain LoRA."""
    config = adapter.config
    tokens = config.alora_invocation_tokens
    if not tokens and config.invocation_string:
        from converters.vocabulary import vocabulary_tokens  # llama.cpp only for the older aLoRAs

        tokens = tuple(vocabulary_tokens(layout.path, config.invocation_string))
    if tokens and len(tokens) > MAX_INVOCATION_TOKENS:
        raise MalformedAdapter(
            str(adapter.directory),
            f"its aLoRA invocation is {len(tokens)} tokens long (at most "
            f"{MAX_INVOCATION_TOKENS}: a prompt must be able to hold it)",
            fix="Use the short invocation sequence the adapter was trained with",
        )
    vocabulary = layout.tensor_shapes.get("token_embd.weight", (0, 1 << 32))[1]
    if tokens and max(tokens) >= vocabulary:
        raise MalformedAdapter(
            str(adapter.directory),
            f"invocation token {max(tokens)} is outside the base model's vocabulary of {vocabulary} tokens",
            fix="The adapter was trained for another base model; pass that one with --base",
        )
    return tuple(tokens or ())


def gguf_lora_b(adapter: PeftAdapter, layout: BaseModelLayout, pair: LoraPair, gguf_name: str) -> np.ndarray:
    """B as stored in the GGUF: rows in llama.cpp's order, scaled so that llama.cpp's alpha/rank equals PEFT's."""
    peft_scale = adapter.config.scaling_for(pair.module)
    gguf_alpha = adapter.config.lora_alpha
    # llama.cpp uses alpha/rank when alpha != 0, else 1.
    llama_scale = gguf_alpha / pair.rank if gguf_alpha else 1.0
    lora_b = layout.arrange_lora_b(gguf_name, pair.lora_b)
    factor = peft_scale / llama_scale
    return lora_b if factor == 1.0 else (lora_b * np.float32(factor)).astype(np.float32)


def _plan(adapter: PeftAdapter, layout: BaseModelLayout, qtype: gguf.GGMLQuantizationType) -> list[_PlannedTensor]:
    planned: list[_PlannedTensor] = []
    for pair in adapter.pairs:
        target = layout.gguf_name(pair.module)
        layout.check_shape(pair.module, target, pair.lora_a, pair.lora_b)
        stem = target.removesuffix(".weight")
        for is_b, matrix in ((False, pair.lora_a), (True, pair.lora_b)):
            planned.append(
                _PlannedTensor(
                    name=f"{stem}.weight.lora_{'b' if is_b else 'a'}",
                    target=target,
                    pair=pair,
                    is_b=is_b,
                    qtype=_type_for(matrix.shape, qtype),
                )
            )
    return planned


def _type_for(shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    # Block-quantised rows must hold whole blocks (rank-8 B rows do not); llama.cpp's converter falls back to F16.
    block_size, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block_size == 0 else gguf.GGMLQuantizationType.F16


def _write(
    path: Path,
    adapter: PeftAdapter,
    layout: BaseModelLayout,
    adapter_name: str,
    alpha: float,
    plan: list[_PlannedTensor],
    progress: ProgressCallback | None,
    description: str,
    invocation: tuple[int, ...],
) -> None:
    writer = gguf.GGUFWriter(path, arch=layout.architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    if invocation:  # llama.cpp refuses any element type but uint32
        writer.add_key_value(
            gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS,
            list(invocation),
            gguf.GGUFValueType.ARRAY,
            gguf.GGUFValueType.UINT32,
        )
    writer.add_name(adapter_name)
    if description:
        writer.add_description(description)
    writer.add_uint32(keys.FORMAT, gguf_info.FORMAT_VERSION)
    writer.add_string(keys.ADAPTER_NAME, adapter_name)
    writer.add_string(keys.BASE_FINGERPRINT, layout.fingerprint)
    writer.add_string(keys.BASE_NAME, layout.name)
    writer.add_string(keys.PEFT_CONFIG_SHA256, adapter.config_sha256)

    def tensor_data(item: _PlannedTensor) -> np.ndarray:
        matrix = gguf_lora_b(adapter, layout, item.pair, item.target) if item.is_b else item.pair.lora_a
        return encode(matrix, item.qtype)

    # numpy releases the GIL while casting and quantising: one thread per core halves the dominant cost.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        encoded = list(pool.map(tensor_data, plan))
    for item, data in zip(plan, encoded):
        writer.add_tensor_info(item.name, data.shape, data.dtype, data.nbytes, raw_dtype=item.qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total, done = sum(d.nbytes for d in encoded), 0
        for data in encoded:
            writer.write_tensor_data(data)
            done += data.nbytes
            if progress is not None:
                progress(done, total)
    finally:
        writer.close()
