"""Benchmark a decode while a request body is tokenized beside it, on the embedded SmolLM2: what a profile's
``threads`` costs when megabyte prompts arrive during generations.

llama.cpp decodes each token with a team of threads that meet at a barrier after every graph node; a busy thread
beside the team (a ~1 MB prompt takes ~0.5 s to tokenize) preempts its members in turn and every barrier waits for
a time slice. In one run, interleaved, each repeat measures greedy decode tok/s with every usable core and with one
thread fewer, alone and beside a tokenization running in a loop, and how many tokenizations per second finished
meanwhile. Prints a markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

from edge_runtime.runtime.engine import Engine, EngineSettings
from edge_runtime.runtime.generation import SamplingParams
from edge_runtime.runtime.models import default_model_path

DOCUMENT = "The device reads a long document about adapters, budgets and caches. " * 15_000  # ~1 MB


def decode(engine: Engine, tokens: int, *, beside: bool) -> tuple[float, float]:
    """Greedy decode tok/s of up to ``tokens`` tokens, with a tokenization looping on another thread when
    ``beside``, and how many tokenizations per second finished meanwhile."""
    prompt, params = engine.tokenize("Once upon a time"), SamplingParams(max_tokens=tokens)
    stop, finished = threading.Event(), [0]

    def loop() -> None:
        while not stop.is_set():
            engine.tokenize(DOCUMENT)
            finished[0] += 1

    worker = threading.Thread(target=loop) if beside else None
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
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each case (median kept)")
    parser.add_argument("--tokens", type=int, default=300, help="tokens decoded per run")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    counts = sorted({cpus, max(1, cpus - 1)}, reverse=True)
    results: dict[tuple[int, bool], list[tuple[float, float]]] = {(n, b): [] for n in counts for b in (False, True)}
    for _ in range(args.repeat):
        for threads in counts:  # a fresh engine per count: its OpenMP team is its worker thread's
            engine = Engine(default_model_path(), EngineSettings(n_ctx=2048, n_threads=threads))
            try:
                engine.generate(engine.tokenize("Warm up"), SamplingParams(max_tokens=16))
                for beside in (False, True):
                    results[(threads, beside)].append(decode(engine, args.tokens, beside=beside))
            finally:
                engine.close()
    base = statistics.median(rate for rate, _ in results[(cpus, False)])
    print(f"SmolLM2 decode on {cpus} usable CPUs, {args.tokens} tokens, median of {args.repeat}\n")
    print("| threads | decode | tok/s | vs all cores alone | ~1 MB tokenizations/s meanwhile |\n|---|---|---|---|---|")
    summary = []
    for (threads, beside), runs in results.items():
        rate, done = statistics.median(r for r, _ in runs), statistics.median(d for _, d in runs)
        label = "beside a tokenization" if beside else "alone"
        summary.append({"threads": threads, "beside": beside, "tok_s": round(rate, 1), "ratio": round(rate / base, 2),
                        "tokenizations_s": round(done, 2)})
        print(f"| {threads} | {label} | {rate:.1f} | {rate / base:.2f}x | {done:.2f} |")
    print(json.dumps({"cpus": cpus, "tokens": args.tokens, "cases": summary}))


if __name__ == "__main__":
    main()
