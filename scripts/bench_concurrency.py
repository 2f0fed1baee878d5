"""Benchmark many clients at once against one daemon, all ratios measured in this one run.

Daemons (real `edge-rt serve` processes on 127.0.0.1, SmolLM2 Q4_1, 2 threads, a q8_0 KV cache as shipped):
- ``today``: the code before batching (a checkout given by --baseline, e.g. /work/main), one client: the single-
  client decode speed and time to first token the new engine must keep (>= 0.97x);
- ``parallel=1``: this checkout with one sequence (the phone case), one client;
- ``parallel=4``: this checkout decoding up to four sequences together: 1, 2 and 4 clients all on one adapter, and
  4 clients each on its own adapter.

Each client sends ROUNDS chat requests one after another (greedy, 64 generated tokens: ``ignore_eos`` is not an
OpenAI field, so the prompts ask for long stories, which SmolLM2-Instruct writes past 64 tokens; the tokens actually
generated are counted, and the first token is the first chunk with text). Reported per case:
aggregate generated tok/s, request latency p50/p95, time to first token p50/max, and whether every client got its
first token before any client finished; the peak RSS of the parallel=4 daemon (sampled every 5 ms from outside)
against `edge-rt plan` for it. Prints a markdown table, the load average before and after, and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import requests

from edge_runtime.profiles import load_profile
from edge_runtime.runtime.budget import PeakRssSampler, adapter_resident_bytes
from edge_runtime.runtime.models import default_model_path
from edge_runtime.runtime.plan import plan_for

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import free_port, make_adapter, wait_for_health  # noqa: E402  (a script beside this one, not a library module)

CTX, THREADS, TOKENS, ROUNDS = 1024, 2, 64, 3
PROMPTS = ["Write a long story about a lighthouse keeper and the storm that changed her life.",
           "Explain in detail how a steam engine works, step by step.",
           "Describe a journey across the mountains in winter, day by day.",
           "Write a long letter from a sailor to his family about life at sea."]


@dataclass
class Request:
    """One request's timings (seconds from the start of the case) and generated tokens."""

    start: float
    first: float = 0.0
    end: float = 0.0
    tokens: int = 0


@dataclass
class Case:
    """One measured workload."""

    label: str
    clients: int
    requests: list[Request] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, float | int | bool | str]:
        latencies = sorted(r.end - r.start for r in self.requests)
        ttfts = sorted(r.first - r.start for r in self.requests)
        first_round = [r for i, r in enumerate(self.requests) if i % ROUNDS == 0]
        return {"case": self.label, "clients": self.clients,
                "tok_s": sum(r.tokens for r in self.requests) / self.wall_s,
                "latency_p50_s": statistics.median(latencies), "latency_p95_s": percentile(latencies, 0.95),
                "ttft_p50_s": statistics.median(ttfts), "ttft_max_s": max(ttfts),
                "first_tokens_before_any_finish": max(r.first for r in first_round) < min(r.end for r in first_round)}


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of sorted ``values``."""
    return values[min(len(values) - 1, max(0, round(fraction * len(values) + 0.5) - 1))]


# llama-server's adapters by id (its --lora order), for the model names the daemons serve; None: a daemon
LLAMA_SERVER_LORA: dict[str, int] | None = None


def stream_one(url: str, model: str, prompt: str, origin: float) -> Request:
    """One streamed completion; its first-token and end times relative to ``origin``."""
    record = Request(start=time.perf_counter() - origin)
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                               "max_tokens": TOKENS, "temperature": 0, "stream": True,
                               "stream_options": {"include_usage": True}}
    if LLAMA_SERVER_LORA is not None:  # every adapter listed, the request's at scale 1 (base: all at 0)
        body["lora"] = [{"id": i, "scale": float(name == model)} for name, i in LLAMA_SERVER_LORA.items()]
    texts = 0
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if any(c.get("delta", {}).get("content") for c in event.get("choices", ())):
                texts += 1
                record.first = record.first or time.perf_counter() - origin
            if event.get("usage"):
                record.tokens = int(event["usage"]["completion_tokens"])
    record.end = time.perf_counter() - origin
    record.tokens = record.tokens or texts  # no usage in the stream: one chunk per token
    return record


def run_case(url: str, label: str, models: list[str]) -> Case:
    """``len(models)`` clients at once, client i on ``models[i]``, each sending ROUNDS requests in turn."""
    case = Case(label, len(models))
    results: list[list[Request]] = [[] for _ in models]
    origin = time.perf_counter()

    def client(index: int) -> None:
        for round_ in range(ROUNDS):
            prompt = f"({round_}) {PROMPTS[index % len(PROMPTS)]}"
            results[index].append(stream_one(url, models[index], prompt, origin))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    case.wall_s = time.perf_counter() - origin
    case.requests = [r for rounds in results for r in rounds]
    return case


def measure(url: str, daemon: str, counts: tuple[int, ...]) -> list[Case]:
    """After a warm-up: ``counts`` clients at once on the base model, then on one adapter; with 4 among the counts,
    4 clients each on its own adapter."""
    run_case(url, "warm-up", ["a"])
    cases = [
        run_case(url, f"{daemon}, {clients} client(s), {label}", [model] * clients)
        for model, label in (("base", "base model"), ("a", "one adapter"))
        for clients in counts
    ]
    if 4 in counts:
        cases.append(run_case(url, f"{daemon}, 4 clients, each its own adapter", ["a", "b", "c", "d"]))
    return cases


def start_daemon(adapters_dir: Path, profile: Path, *, parallel: int | None, pythonpath: str,
                 preload: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "edge_runtime.cli", "serve", "--profile", str(profile), "--adapters-dir",
               str(adapters_dir), "--port", str(port), "--preload", preload]
    if parallel is not None:
        command += ["--parallel", str(parallel)]
    environment = dict(os.environ, PYTHONPATH=pythonpath)
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, wait_for_health(process, port, "the daemon")


def start_llama_server(binary: Path, adapters: list[Path]) -> tuple[subprocess.Popen[bytes], str]:
    """llama.cpp's own server on the same model and adapters: 4 slots of CTX tokens, THREADS threads, q8_0 KV."""
    port = free_port()
    command = [str(binary), "-m", str(default_model_path()), "--port", str(port), "-np", "4", "-c", str(4 * CTX),
               "-t", str(THREADS), "-tb", str(THREADS), "-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0",
               "--no-kv-unified", "--lora-init-without-apply", "--no-webui"]
    for adapter in adapters:
        command += ["--lora", str(adapter)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, wait_for_health(process, port, "llama-server")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def main() -> int:
    global ROUNDS, TOKENS, LLAMA_SERVER_LORA
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout of the code before batching (its PYTHONPATH), for the `today` rows")
    parser.add_argument("--llama-lib", type=Path, default=None,
                        help="a folder holding another llama_cpp build (pip install --target), put first on this "
                             "checkout's daemons' PYTHONPATH (the baseline keeps the installed one), e.g. one built "
                             "with -DGGML_LLAMAFILE=OFF")
    parser.add_argument("--llama-server", type=Path, default=None,
                        help="llama.cpp's llama-server binary: the same workload against it with -np 4")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help="requests each client sends in turn (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=TOKENS,
                        help="tokens each request generates (default: %(default)s; a small number such as 8 makes a "
                             "smoke run, not a measurement)")
    args = parser.parse_args()
    ROUNDS, TOKENS = args.rounds, args.tokens
    first = f"{args.llama_lib}{os.pathsep}" if args.llama_lib else ""
    here = first + str(Path(__file__).resolve().parent.parent)
    load_before = loadavg()
    cases: list[Case] = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / "served").mkdir()
        adapters = [make_adapter(work, name, 16, 60 + i) for i, name in enumerate("abcd")]
        profile = work / "bench.toml"
        profile.write_text(f'name = "bench"\ndescription = "benchmark"\n[memory]\nram_mb = 16384\n'
                           f'runtime_budget_mb = 4096\n[storage]\nadapter_cache_mb = 1024\n[compute]\n'
                           f'threads = {THREADS}\ngpu_layers = 0\nctx = {CTX}\nbatch = 512\nkv_type = "q8_0"\n'
                           f'[network]\nmax_download_kbps = 0\nmetered = false\n')
        served = work / "served"
        if args.baseline is not None:
            process, url = start_daemon(served, profile, parallel=None, pythonpath=str(args.baseline),
                                        preload="a,b,c,d")
            try:
                cases += measure(url, "today", (1,))
            finally:
                stop(process)
        process, url = start_daemon(served, profile, parallel=1, pythonpath=here, preload="a,b,c,d")
        try:
            cases += measure(url, "parallel=1", (1,))
        finally:
            stop(process)
        process, url = start_daemon(served, profile, parallel=4, pythonpath=here, preload="a,b,c,d")
        sampler = PeakRssSampler(process.pid, interval_s=0.005)
        sampler.start()
        try:
            cases += measure(url, "parallel=4", (1, 2, 4))
        finally:
            peak = sampler.stop()
            stop(process)
        if args.llama_server is not None:
            process, url = start_llama_server(args.llama_server, adapters)
            LLAMA_SERVER_LORA = {name: i for i, name in enumerate("abcd")}
            try:
                cases += measure(url, "llama-server -np 4", (1, 4))
            finally:
                LLAMA_SERVER_LORA = None
                stop(process)
        plan = plan_for(load_profile(str(profile)), default_model_path(), parallel=4)
        predicted = plan.fixed_bytes + sum(adapter_resident_bytes(a) for a in adapters)
    load_after = loadavg()
    rows = [case.summary() for case in cases]
    print(f"llama.cpp: {llama_cpp.llama_print_system_info().decode().strip()}")
    print(f"this checkout's daemons ran llama_cpp from: {args.llama_lib or 'the installed build (above)'}")
    print(f"load average before: {load_before}, after: {load_after}")
    print("| case | tok/s | vs 1 client | latency p50 / p95 | TTFT p50 / max | all first tokens before any end |")
    print("|---|---|---|---|---|---|")
    def find(daemon: str, clients: int, kind: str) -> dict[str, float | int | bool | str] | None:
        return next((r for r in rows if r["case"] == f"{daemon}, {clients} client(s), {kind}"), None)

    for row in rows:
        daemon, _, kind = str(row["case"]).split(", ")
        single = find(daemon, 1, "one adapter" if kind == "each its own adapter" else kind) or row
        print(f"| {row['case']} | {row['tok_s']:.1f} | {float(row['tok_s']) / float(single['tok_s']):.2f}x | "
              f"{row['latency_p50_s']:.2f} / {row['latency_p95_s']:.2f} s | "
              f"{row['ttft_p50_s'] * 1000:.0f} / {row['ttft_max_s'] * 1000:.0f} ms | "
              f"{'yes' if row['first_tokens_before_any_finish'] else 'no'} |")
    for kind in ("base model", "one adapter"):
        today = find("today", 1, kind)
        for daemon in ("parallel=1", "parallel=4"):
            row = find(daemon, 1, kind)
            if today is not None and row is not None:
                print(f"{daemon} vs today, 1 client, {kind}: decode {float(row['tok_s']) / float(today['tok_s']):.3f}x,"
                      f" TTFT p50 {float(today['ttft_p50_s']) / float(row['ttft_p50_s']):.3f}x (higher is better)")
    by_case = {str(r["case"]): r for r in rows}
    for label, row in by_case.items():
        theirs = by_case.get(label.replace("parallel=4", "llama-server -np 4"))
        if label.startswith("parallel=4") and theirs is not None:
            print(f"{label} vs llama-server -np 4: tok/s {float(row['tok_s']) / float(theirs['tok_s']):.2f}x, "
                  f"TTFT p50 {float(theirs['ttft_p50_s']) / float(row['ttft_p50_s']):.2f}x (higher is better)")
    print(f"peak RSS of the parallel=4 daemon: {peak / 2**20:.1f} MiB vs plan {predicted / 2**20:.1f} MiB "
          f"({peak / predicted:.2f}x)")
    print(json.dumps({"load_before": load_before, "load_after": load_after, "cases": rows,
                      "peak_rss_mib": peak / 2**20, "plan_mib": predicted / 2**20}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
