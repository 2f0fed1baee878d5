"""Run a runtime workload in a fresh process and report its measured memory as JSON (tests/runtime/test_budget.py).

A fresh interpreter keeps the test runner's own memory (pytest, torch from other tests) out of the measurement.

    python tests/rss_probe.py --profile P.toml [--model M.gguf] [--ctx N] [--rounds K] ADAPTER.gguf ...

Workload: one long prompt (a full micro-batch) under the base model, then K rounds through every adapter in turn,
8 greedy tokens each (a chat prompt, or a plain one when the model has no chat template), while a sampler thread
records RSS every 2 ms. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import edge_runtime.cli  # noqa: F401  (the daemon's imports: what the plan's process term counts)
import edge_runtime.serve.app  # noqa: F401
from edge_runtime.errors import InvalidRequest
from edge_runtime.profiles import load_profile
from edge_runtime.runtime.budget import PeakRssSampler, measured_rss_bytes
from edge_runtime.runtime.core import Runtime
from edge_runtime.runtime.engine import SamplingParams
from edge_runtime.runtime.requests import AdapterRequest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--ctx", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("adapters", nargs="*")
    args = parser.parse_args()

    sampler = PeakRssSampler(interval_s=0.002)
    sampler.start()
    runtime = Runtime(load_profile(args.profile), model=args.model, ctx=args.ctx)
    names = [runtime.adapters.add(Path(p).stem, p).name for p in args.adapters]
    greedy = SamplingParams(max_tokens=8)
    long_prompt = runtime.engine.tokenize("The robot walked along the quiet river bank. " * 60)
    long_prompt = long_prompt[: min(len(long_prompt), runtime.engine.n_ctx - 16)]
    runtime.generate(long_prompt, greedy)
    try:
        prompt = runtime.engine.chat_prompt([{"role": "user", "content": "Name three colours."}])
    except InvalidRequest:  # no chat template (Gemma 3 270M)
        prompt = runtime.engine.tokenize("Three colours of the rainbow are")
    base_text = runtime.generate(prompt, greedy)[0].text
    outputs: dict[str, list[str]] = {name: [] for name in names}
    max_resident = 0
    for _ in range(args.rounds):
        for name in names:
            outputs[name].append(runtime.generate(prompt, greedy, adapters=[AdapterRequest(name, 1.0)])[0].text)
            resident = [a for a in runtime.adapters.list_adapters() if a.state in ("resident", "active")]
            max_resident = max(max_resident, len(resident))
    time.sleep(0.05)
    sampler.stop()
    print(json.dumps({
        "plan": runtime.plan.as_dict(),
        "budget_bytes": runtime.profile.runtime_budget_bytes,
        "peak_rss_bytes": sampler.peak_bytes,
        "final_rss_bytes": measured_rss_bytes(),
        "resident_adapter_bytes": runtime.adapters.resident_bytes,
        "max_resident_count": max_resident,
        "samples": sampler.samples,
        "loads": runtime.adapters.stats.loads,
        "evictions": runtime.adapters.stats.evictions,
        "base_text": base_text,
        "outputs": outputs,
        "long_prompt_tokens": len(long_prompt),
    }))
    runtime.close()


if __name__ == "__main__":
    main()
