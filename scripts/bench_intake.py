"""Benchmark a decode that runs while request bodies are tokenized beside it, on the embedded SmolLM2.

The engine decodes with every core the process may use. A tokenization running on another thread (a megabyte prompt
takes ~0.5 s) used to take one of those cores from the decode's thread team, whose threads then waited for a time
slice at every barrier. The engine now decodes on the cores that busy threads leave (edge_runtime/cores.py). In one
run, interleaved, each repeat measures greedy decode tok/s:

1. alone;
2. beside a tokenization the engine does not know about (how every tokenization ran before: the same work, through
   a vocabulary loaded on its own);
3. beside a tokenization through ``Engine.tokenize``, which the decode makes room for;

and how many megabyte tokenizations per second finished during each decode. Prints a markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable

from edge_runtime import cores
from edge_runtime.runtime.engine import Engine, EngineSettings, vocabulary_tokens
from edge_runtime.runtime.generation import SamplingParams
from edge_runtime.runtime.models import default_model_path

DOCUMENT = "The device reads a long document about adapters, budgets and caches. " * 15_000  # ~1 MB


def decode_beside(engine: Engine, tokens: int, work: Callable[[], object] | None) -> tuple[float, float]:
    """Greedy decode tok/s of up to ``tokens`` tokens while ``work`` runs in a loop on another thread, and how many
    times per second it finished meanwhile."""
    prompt, params = engine.tokenize("Once upon a time"), SamplingParams(max_tokens=tokens)
    stop, finished = threading.Event(), [0]

    def loop(work: Callable[[], object]) -> None:
        while not stop.is_set():
            work()
            finished[0] += 1

    worker = threading.Thread(target=loop, args=(work,)) if work else None
    if worker:
        worker.start()
        time.sleep(0.1)  # the tokenization is under way when the decode starts
    started = time.perf_counter()
    produced = engine.generate(prompt, params).completion_tokens
    elapsed = time.perf_counter() - started
    done = finished[0]
    stop.set()
    if worker:
        worker.join()
    return produced / elapsed, done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of the three cases (median kept)")
    parser.add_argument("--tokens", type=int, default=300, help="tokens decoded per run")
    args = parser.parse_args()
    model, cpus = default_model_path(), cores.usable_cpus()
    engine = Engine(model, EngineSettings(n_ctx=2048, n_threads=cpus))
    cases: dict[str, Callable[[], object] | None] = {
        "alone": None,
        "beside an uncounted tokenization (before)": lambda: vocabulary_tokens(model, DOCUMENT),
        "beside Engine.tokenize (now)": lambda: engine.tokenize(DOCUMENT),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    try:
        engine.generate(engine.tokenize("Warm up"), SamplingParams(max_tokens=16))
        for _ in range(args.repeat):
            for name, work in cases.items():
                results[name].append(decode_beside(engine, args.tokens, work))
    finally:
        engine.close()
    base = statistics.median(rate for rate, _ in results["alone"])
    print(f"SmolLM2 decode with {cpus} threads on {cpus} usable CPUs, {args.tokens} tokens, median of {args.repeat}\n")
    print("| decode | tok/s | vs alone | ~1 MB tokenizations/s meanwhile |\n|---|---|---|---|")
    summary = {}
    for name, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        done = statistics.median(d for _, d in runs)
        summary[name] = {"tok_s": round(rate, 1), "ratio": round(rate / base, 2), "tokenizations_s": round(done, 2)}
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {done:.2f} |")
    print(json.dumps({"cpus": cpus, "tokens": args.tokens, "cases": summary}))


if __name__ == "__main__":
    main()
