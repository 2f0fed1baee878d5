"""Benchmark what a response_format grammar costs per generated token, measured in this one run on a test model.

For each grammar: the largest number of parse stacks the acceptance measure finds (``grammar.parse_stack_peak``),
whether the engine accepts it, and for accepted ones the mean time per generated token over ``--tokens`` tokens
relative to the same prompt without a grammar (the ratio is what is reported; absolute times depend on the machine).
The hostile review's cases are included: the 22-level nested ``anyOf`` schema and an enum of 1,800 strings sharing
a prefix (both refused), and the largest ones of each kind the limit lets through.

    python scripts/bench_grammar.py [--model PATH] [--tokens 24]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from llama_cpp import llama_grammar

from edge_runtime.errors import GrammarTooComplex
from edge_runtime.runtime.engine import Engine, EngineSettings
from edge_runtime.runtime.generation import SamplingParams
from edge_runtime.runtime.grammar import parse_stack_peak, stack_limit, with_json_strings
from edge_runtime.runtime.models import default_model_path


def nested_anyof(levels: int) -> dict[str, Any]:
    defs: dict[str, Any] = {"l0": {"type": "integer"}}
    for k in range(1, levels + 1):
        below = {"$ref": f"#/$defs/l{k - 1}"}
        defs[f"l{k}"] = {"anyOf": [{"type": "array", "items": below, "minItems": 1, "maxItems": 1},
                                   {"type": "array", "items": below, "minItems": 2, "maxItems": 2}]}
    return {"$defs": defs, "anyOf": [{"$ref": f"#/$defs/l{levels}"}]}


def enum(count: int) -> dict[str, Any]:
    return {"enum": [f"customer-account-{i:04d}" for i in range(count)]}


def seconds_per_token(engine: Engine, prompt: list[int], grammar: str | None, tokens: int) -> float:
    """Median over three runs of the mean seconds per generated token (greedy, ``tokens`` at most)."""
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        result = engine.generate(prompt, SamplingParams(max_tokens=tokens, grammar=grammar))
        runs.append((time.perf_counter() - started) / max(1, result.completion_tokens))
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    engine = Engine(args.model, EngineSettings(n_ctx=512))
    limit = stack_limit(engine.n_vocab)
    prompt = engine.chat_prompt([{"role": "user", "content": "Answer with JSON."}])
    base = seconds_per_token(engine, prompt, None, args.tokens)
    cases: list[tuple[str, dict[str, Any] | None]] = [
        ("json_object", None), ("nested anyOf, 3 levels", nested_anyof(3)), ("nested anyOf, 4 levels", nested_anyof(4)),
        ("nested anyOf, 22 levels (4 KB)", nested_anyof(22)), ("enum of 40", enum(40)),
        (f"enum of {limit}", enum(limit)), ("enum of 1,800", enum(1800))]
    rows = []
    for label, schema in cases:
        text = llama_grammar.JSON_GBNF if schema is None else with_json_strings(
            llama_grammar.json_schema_to_gbnf(json.dumps(schema)))
        peak, _ = parse_stack_peak(text, stop_at=limit + 1)
        try:
            grammar = engine.json_grammar(schema)
        except GrammarTooComplex:
            rows.append((label, peak, "refused", None))
            continue
        rows.append((label, peak, "accepted", seconds_per_token(engine, prompt, grammar, args.tokens) / base))
    engine.close()
    print(f"model {args.model.name}, limit {limit} parse stacks, "
          f"no grammar {base * 1000:.1f} ms/token, load {os.getloadavg()[0]:.1f}\n")
    print("| grammar | parse stacks (peak found) | verdict | time per token vs no grammar |")
    print("|---|---|---|---|")
    for label, peak, verdict, ratio in rows:
        print(f"| {label} | {peak}{'+' if peak > limit else ''} | {verdict} | "
              f"{'-' if ratio is None else f'{ratio:.2f}x'} |")
    print(json.dumps({"model": args.model.name, "limit": limit, "base_s_per_token": base,
                      "rows": [{"grammar": r[0], "stacks": r[1], "verdict": r[2], "ratio": r[3]} for r in rows]}))


if __name__ == "__main__":
    main()
