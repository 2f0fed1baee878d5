"""Benchmark activated LoRA (aLoRA) against plain LoRA on the embedded SmolLM2, both ratios measured in this one run.

1. Time to first token of an adapter request over a ~1,000-token document whose prompt the base model has just
   evaluated: an aLoRA (applied from its invocation, the assistant turn that ends every chat prompt) reuses the
   document's KV; a plain LoRA with the same weights must evaluate the whole prompt again (goal: aLoRA >= 5x faster).
2. A three-adapter pipeline (router -> json-extract -> legal-review) over one document, each answering its own
   question: total time with aLoRAs (one prefill of the document) vs plain LoRAs (three).

All llama.cpp work runs on the engine's one worker thread (see the README's Benchmarks on OpenMP thread teams).
Prints a markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from converters import convert_peft_to_gguf
from edge_runtime.files import file_sha256
from edge_runtime.runtime.engine import AdapterHandle, Engine, EngineSettings
from edge_runtime.runtime.generation import SamplingParams
from edge_runtime.runtime.models import default_model_path

MODULES = {"self_attn": {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576)},
           "mlp": {"gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}}
INVOCATION = [1, 520, 9531, 198]  # "<|im_start|>assistant\n": SmolLM2's chat template opens every answer with it
PIPELINE = {"router": "Which team should handle this contract?", "json-extract": "List every clause as JSON.",
            "legal-review": "Is the delivery schedule enforceable?"}
CLAUSE = ("Clause {n}: the supplier shall deliver {units} units of part {part} to the buyer's warehouse no later "
          "than day {day}; late deliveries incur a penalty of {fee} euros per day.")


def make_adapter(folder: Path, name: str, seed: int, *, alora: bool) -> Path:
    """A rank-16 PEFT adapter on every linear layer (the same weights for a given seed), converted to GGUF f16."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(30):
        for block, modules in MODULES.items():
            for module, (n_in, n_out) in modules.items():
                prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
                tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((16, n_in), dtype=np.float32) * 0.02
                tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((n_out, 16), dtype=np.float32) * 0.02
    peft_dir = folder / f"peft-{name}"
    peft_dir.mkdir()
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "task_type": "CAUSAL_LM",
              "target_modules": [module for modules in MODULES.values() for module in modules],
              "alora_invocation_tokens": INVOCATION if alora else None}
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(peft_dir / "adapter_model.safetensors"))
    return convert_peft_to_gguf(peft_dir, base=default_model_path(), output=folder / f"{name}.gguf").output


def document(engine: Engine, target_tokens: int) -> str:
    """Contract text of about ``target_tokens`` tokens."""
    clauses: list[str] = []
    while len(engine.tokenize(" ".join(clauses), add_bos=False)) < target_tokens:
        n = len(clauses) + 1
        clauses.append(CLAUSE.format(n=n, units=n * 37, part=n % 7, day=n * 3, fee=n * 11))
    return " ".join(clauses)


def prompt(engine: Engine, text: str, question: str) -> list[int]:
    return engine.chat_prompt([{"role": "system", "content": text}, {"role": "user", "content": question}])


def first_token_seconds(engine: Engine, tokens: list[int], adapters: list[tuple[AdapterHandle, float]]) -> float:
    """Seconds from the request to its first generated token."""
    started = time.perf_counter()
    stream = engine.stream(tokens, SamplingParams(max_tokens=8, temperature=0), adapters=adapters)
    next(stream)
    elapsed = time.perf_counter() - started
    stream.close()
    return elapsed


def pipeline_seconds(engine: Engine, text: str, handles: dict[str, AdapterHandle], max_tokens: int) -> float:
    """Seconds for the three pipeline requests over ``text``, each generating ``max_tokens`` tokens."""
    engine.generate(engine.tokenize("An unrelated warm-up prompt."), SamplingParams(max_tokens=1))  # cold document
    started = time.perf_counter()
    for name, question in PIPELINE.items():
        engine.generate(prompt(engine, text, question), SamplingParams(max_tokens=max_tokens, temperature=0),
                        adapters=[(handles[name], 1.0)])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000, help="document length in tokens")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    engine = Engine(default_model_path(), EngineSettings(n_ctx=2048, n_batch=512, n_ubatch=512,
                                                         n_threads=args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        handles: dict[str, dict[str, AdapterHandle]] = {"alora": {}, "plain": {}}
        for seed, name in enumerate(PIPELINE):
            for kind in handles:
                path = make_adapter(folder, f"{kind}-{name}", seed, alora=kind == "alora")
                handles[kind][name] = engine.load_adapter(path, content_id=file_sha256(path).hexdigest())
        text = document(engine, args.tokens)
        tokens = prompt(engine, text, PIPELINE["router"])
        ttft: dict[str, list[float]] = {"alora": [], "plain": []}
        pipeline: dict[str, list[float]] = {"alora": [], "plain": []}
        evaluated: dict[str, int] = {}
        for _ in range(args.repeat):
            for kind in ("alora", "plain"):
                engine.generate(tokens, SamplingParams(max_tokens=1))  # the base model has read the document
                before = engine.evaluated_tokens
                ttft[kind].append(first_token_seconds(engine, tokens, [(handles[kind]["router"], 1.0)]))
                evaluated[kind] = engine.evaluated_tokens - before
                pipeline[kind].append(pipeline_seconds(engine, text, handles[kind], max_tokens=16))
        engine.close()
    median = {f"{what}_{kind}": statistics.median(values[kind]) for what, values in
              (("ttft", ttft), ("pipeline", pipeline)) for kind in ("alora", "plain")}
    result = {"document_tokens": len(tokens), "evaluated_alora": evaluated["alora"],
              "evaluated_plain": evaluated["plain"], **median,
              "ttft_ratio": median["ttft_plain"] / median["ttft_alora"],
              "pipeline_ratio": median["pipeline_plain"] / median["pipeline_alora"]}
    print(f"| measurement (median of {args.repeat}) | aLoRA | plain LoRA | ratio |")
    print("|---|---|---|---|")
    print(f"| time to first token after the base read the {len(tokens)}-token prompt (prompt tokens evaluated) "
          f"| {median['ttft_alora'] * 1e3:.0f} ms ({evaluated['alora']}) "
          f"| {median['ttft_plain'] * 1e3:.0f} ms ({evaluated['plain']}) | {result['ttft_ratio']:.1f}x |")
    print(f"| three-adapter pipeline over the document, 16 tokens each | {median['pipeline_alora'] * 1e3:.0f} ms "
          f"| {median['pipeline_plain'] * 1e3:.0f} ms | {result['pipeline_ratio']:.1f}x |")
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
