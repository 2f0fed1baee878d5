"""Benchmark: PEFT → GGUF conversion time against reading + writing the same bytes, measured in one run.

Builds a PEFT adapter for the embedded SmolLM2 base (all linear layers, rank 64, float32: ~78 MB), then times
  1. the I/O floor: read adapter_model.safetensors, write as many bytes to a new file, fsync;
  2. `convert_peft_to_gguf` with --outtype f32 (same size out) and f16.
Prints a markdown table and a JSON line. Goal: conversion within 2x of the I/O floor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from converters import convert_peft_to_gguf
from edge_runtime.runtime.models import default_model_path

MODULES = {"self_attn": {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576)},
           "mlp": {"gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}}


def write_adapter(directory: Path, rank: int, layers: int) -> Path:
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(layers):
        for block, modules in MODULES.items():
            for module, (n_in, n_out) in modules.items():
                prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
                tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, n_in), dtype=np.float32)
                tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((n_out, rank), dtype=np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
              "target_modules": [m for modules in MODULES.values() for m in modules]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def io_floor(source: Path, target: Path) -> float:
    start = time.perf_counter()
    data = source.read_bytes()
    with target.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed


def timed_convert(peft_dir: Path, base: Path, output: Path, outtype: str) -> float:
    start = time.perf_counter()
    convert_peft_to_gguf(peft_dir, base=base, output=output, outtype=outtype)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    base = default_model_path()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        peft_dir = write_adapter(work / "peft", args.rank, layers=30)
        source = peft_dir / "adapter_model.safetensors"
        size = source.stat().st_size
        floor = statistics.median(io_floor(source, work / "copy.bin") for _ in range(args.repeat))
        rows = {"read + write (floor)": floor}
        for outtype in ("f32", "f16"):
            rows[f"convert --outtype {outtype}"] = statistics.median(
                timed_convert(peft_dir, base, work / f"out-{outtype}.gguf", outtype) for _ in range(args.repeat))
    print(f"adapter: {size / 1e6:.1f} MB (rank {args.rank}, all linear layers, f32), median of {args.repeat}\n")
    print("| step | seconds | ratio to floor |\n|---|---|---|")
    for label, seconds in rows.items():
        print(f"| {label} | {seconds:.3f} | {seconds / floor:.2f}x |")
    result = {"source_bytes": size, "floor_s": floor, **{k: v for k, v in rows.items()},
              "ratio_f32": rows["convert --outtype f32"] / floor, "ratio_f16": rows["convert --outtype f16"] / floor,
              "goal_ratio": 2.0}
    print("\n" + json.dumps(result))
    return 0 if result["ratio_f32"] <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
