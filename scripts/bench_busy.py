"""Benchmark decoding on a busy device: the daemon's engine idle and beside CPU-bound neighbour processes, for each
candidate way of running llama.cpp's threads, in one run.

A candidate is a llama.cpp build (the Python that has it installed), environment variables read when the build's
thread library loads, and engine settings (threads, the KV cache type and whether the engine may shed threads while
the device is busy; ggml's own thread pool's ``poll`` level and priority). Each
candidate runs in a fresh process that loads the embedded SmolLM2 once; the parent starts and stops the
neighbours (``python -c 'while True: pass'``, each ending by itself after a bound) between measurements, so idle and
busy runs alternate. A measurement is the time to first token of a fresh ~120-token prompt (nothing
reused from the KV cache) and the greedy decode rate of the tokens after it; a decode slower than ``--max-seconds``
is stopped there and its rate is what it reached. Each measurement also reads the process's threads from /proc:
how many ran, their context switches per token (voluntary: a thread slept, e.g. on a futex; involuntary: it was
preempted) and the share of the time they wanted a CPU that they waited for one (``schedstat``).

``--daemon`` measures through HTTP as well: ``edge-rt serve`` as a subprocess and a streaming client, so what the
engine alone does and what the daemon adds can be compared. Prints markdown tables and one JSON line; note the
load average printed with them (this machine may be shared).

    python scripts/bench_busy.py --repeat 3 --openmp-off-python /work/venv-20/bin/python
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONDITIONS = ("idle", "1 busy", "2 busy", "1 busy at nice 19")
TEXT = ("Write a short report on the maintenance of a fleet of delivery drones. Cover the batteries, the motors, the "
        "propellers, the flight controller, the radio link, the cameras and the logs. For each part, say what "
        "wears, how often it is checked and what a technician does when a check fails. ")


FIXED_F16 = {"kv_type": "f16", "shed_threads": False}  # what edge-rt ran before the governor


@dataclass
class Candidate:
    """One way to run the engine: which build (python), environment, engine settings."""

    name: str
    python: str
    env: dict[str, str] = field(default_factory=dict)
    threads: int = 2
    settings: dict[str, Any] = field(default_factory=lambda: dict(FIXED_F16))  # EngineSettings fields
    pool: dict[str, int] = field(default_factory=dict)  # ggml thread pool: poll, prio (OpenMP-off builds only)
    nice: int = 0  # the engine's threads' nice value (negative needs CAP_SYS_NICE)
    note: str = ""


def candidates(args: argparse.Namespace) -> list[Candidate]:
    """Every candidate this run compares (those needing the OpenMP-off build only when it is given)."""
    here, off = sys.executable, args.openmp_off_python
    found = [
        Candidate("today", here, note="before the governor: f16 KV cache, 2 threads fixed, libgomp's default spin"),
        Candidate("shipped", here, settings={"kv_type": "q8_0"},
                  note="the auto profile: q8_0 KV cache, a thread shed while the device is busy"),
        Candidate("q8-fixed", here, settings={"kv_type": "q8_0", "shed_threads": False},
                  note="q8_0 KV cache, 2 threads fixed (the KV type's own cost)"),
        Candidate("spin-300", here, {"GOMP_SPINCOUNT": "300"}, note="the previous release: libgomp spins 300 rounds"),
        Candidate("openmp-1-thread", here, threads=1, note="reserve_cores = 1"),
        Candidate("openmp-passive", here, {"OMP_WAIT_POLICY": "PASSIVE"}, note="threads sleep at every barrier"),
        Candidate("openmp-spin-1k", here, {"GOMP_SPINCOUNT": "1000"}, note="spin 1k rounds, then sleep"),
        Candidate("openmp-spin-10k", here, {"GOMP_SPINCOUNT": "10000"}, note="spin 10k rounds, then sleep"),
        Candidate("openmp-nice-5", here, nice=-5, note="engine threads at nice -5 (takes CPU from neighbours)"),
    ]
    if off:
        found += [
            Candidate("pool-poll-50", off, pool={"poll": 50}, note="ggml thread pool, llama.cpp's default poll"),
            Candidate("pool-poll-0", off, pool={"poll": 0}, note="ggml thread pool, no polling between graphs"),
            Candidate("pool-poll-100", off, pool={"poll": 100}),
        ]
    chosen = [c for c in found if not args.only or c.name in args.only.split(",")]
    if not chosen:
        raise SystemExit(f"--only matched no candidate of: {', '.join(c.name for c in found)}")
    return chosen


# -- neighbours -------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def neighbours(condition: str, bound_s: int) -> Iterator[None]:
    """CPU-bound processes for ``condition``, each killed afterwards (and ending by itself should this script die)."""
    count = 0 if condition == "idle" else int(condition.split()[0])
    # `while True: pass` that ends by itself after bound_s, so none outlives a killed run; the process killed
    # below is the spinner itself (a `timeout` wrapper would be killed and leave its child spinning)
    code = (f"import os, time\nos.nice({19 if 'nice' in condition else 0})\nend = time.monotonic() + {bound_s}\n"
            "while time.monotonic() < end: pass")
    spinners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]
    try:
        if spinners:
            time.sleep(0.3)  # running, not starting
        yield
    finally:
        for process in spinners:
            process.kill()
            process.wait()


# -- threads from /proc ----------------------------------------------------------------------------------------------

def thread_stats(pid: int) -> dict[int, dict[str, Any]]:
    """Per thread of ``pid``: name, ns ran and waited (schedstat), voluntary and involuntary context switches."""
    found: dict[int, dict[str, Any]] = {}
    task_dir = Path(f"/proc/{pid}/task")
    for task in task_dir.iterdir():
        try:
            ran, waited, _ = (int(x) for x in (task / "schedstat").read_text().split())
            status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
            found[int(task.name)] = {"name": (task / "comm").read_text().strip(), "ran": ran, "waited": waited,
                                     "vol": int(status["voluntary_ctxt_switches"]),
                                     "invol": int(status["nonvoluntary_ctxt_switches"])}
        except (OSError, ValueError, KeyError):
            continue  # the thread ended meanwhile
    return found


def thread_delta(before: dict[int, dict[str, Any]], after: dict[int, dict[str, Any]], tokens: int) -> dict[str, Any]:
    """What the process's threads did between two readings: those that ran, switches per token, wait share."""
    busy, vol, invol, ran, waited = [], 0, 0, 0, 0
    for tid, now in after.items():
        then = before.get(tid, {"ran": 0, "waited": 0, "vol": 0, "invol": 0})
        if now["ran"] - then["ran"] > 1_000_000:  # ran more than 1 ms in the measurement
            busy.append(now["name"])
        vol += now["vol"] - then["vol"]
        invol += now["invol"] - then["invol"]
        ran += now["ran"] - then["ran"]
        waited += now["waited"] - then["waited"]
    per = max(1, tokens)
    return {"threads_ran": len(busy), "thread_names": sorted(busy), "vol_per_token": round(vol / per, 1),
            "invol_per_token": round(invol / per, 1), "wait_share": round(waited / max(1, ran + waited), 3)}


# -- the child: one engine --------------------------------------------------------------------------------------------

def child(spec: dict[str, Any]) -> None:
    """Load an engine as ``spec`` says, then measure once per line read from stdin, one JSON line out each."""
    sys.path.insert(0, str(REPO))
    from edge_runtime.runtime.engine import Engine, EngineSettings
    from edge_runtime.runtime.generation import SamplingParams
    from edge_runtime.runtime.models import default_model_path

    engine = Engine(default_model_path(), EngineSettings(n_ctx=2048, n_threads=spec["threads"], **spec["settings"]))
    engine.generate(engine.tokenize("Warm up the thread team"), SamplingParams(max_tokens=8))
    if spec["nice"]:
        engine._call(lambda: os.setpriority(os.PRIO_PROCESS, 0, spec["nice"]))  # the engine thread; its team inherits
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        index, tokens, limit = json.loads(line)
        prompt = engine.tokenize(f"Report {index}. " + TEXT)
        before, started = thread_stats(os.getpid()), time.perf_counter()
        stamps = []
        stream = engine.stream(prompt, SamplingParams(max_tokens=tokens, temperature=0.0))
        for _ in stream:
            stamps.append(time.perf_counter())
            if stamps[-1] - started > limit:
                stream.close()
                break
        after = thread_stats(os.getpid())
        shed = {"thread_changes": engine.governor.changes, "shed_steps": engine.governor.shed_steps}
        print(json.dumps({**result(started, stamps, before, after), **shed}), flush=True)


def result(started: float, stamps: list[float], before: dict[int, Any], after: dict[int, Any]) -> dict[str, Any]:
    """TTFT, decode rate of the tokens after the first, and the thread picture of one measurement."""
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {"ttft_ms": (stamps[0] - started) * 1e3 if stamps else None, "tok_s": decode, "tokens": len(stamps),
            **thread_delta(before, after, len(stamps))}


class EngineProcess:
    """A child process holding one candidate's engine."""

    def __init__(self, candidate: Candidate) -> None:
        settings = {**candidate.settings, **{f"pool_{k}": v for k, v in candidate.pool.items()}}
        spec = {"threads": candidate.threads, "settings": settings, "nice": candidate.nice}
        env = {**os.environ, **candidate.env, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen([candidate.python, __file__, "--child", json.dumps(spec)], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        ready = self.process.stdout.readline()
        if not ready:
            raise SystemExit(f"candidate {candidate.name}: the engine process failed to start")

    def measure(self, index: int, tokens: int, limit: float) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps([index, tokens, limit]) + "\n")
        self.process.stdin.flush()
        return dict(json.loads(self.process.stdout.readline()))

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=30)


class DaemonProcess:
    """``edge-rt serve`` under one candidate, measured through a streaming HTTP client."""

    def __init__(self, candidate: Candidate) -> None:
        if not self.takes(candidate):
            raise SystemExit(f"--daemon: candidate {candidate.name} needs engine settings the CLI does not take")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = {**os.environ, **candidate.env, "PYTHONPATH": str(REPO)}
        kv = candidate.settings["kv_type"]
        profile = "auto" if (candidate.threads, kv) == (2, "q8_0") else str(self._profile(candidate.threads, kv))
        self.process = subprocess.Popen([candidate.python, "-m", "edge_runtime.cli", "serve", "--port",
                                         str(self.port), "--profile", profile], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise SystemExit("the daemon did not start")
        self._post(0, 8, 30.0)  # warm up

    @staticmethod
    def takes(candidate: Candidate) -> bool:
        """Whether ``edge-rt serve`` can run the candidate: a profile sets threads and the KV type, and the engine
        sheds threads exactly when the KV type allows it."""
        settings = candidate.settings
        from edge_runtime.runtime.governor import thread_invariant

        daemon_sheds = thread_invariant(settings["kv_type"])  # a daemon sheds threads whenever the KV type allows
        return not (candidate.nice or candidate.pool) and daemon_sheds == settings.get("shed_threads", True)

    @staticmethod
    def _profile(threads: int, kv_type: str) -> Path:
        from edge_runtime.profiles import load_profile

        text = load_profile("auto").to_toml().replace("name = \"auto\"", "name = \"bench\"")
        text = text.replace("\nthreads = ", f"\nthreads = {threads}\n# was ")
        text = text.replace("\nkv_type = ", f"\nkv_type = \"{kv_type}\"\n# was ")
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-busy-{os.getpid()}-{threads}-{kv_type}.toml"
        path.write_text(text)
        return path

    def _post(self, index: int, tokens: int, limit: float) -> list[float]:
        body = json.dumps({"prompt": f"Report {index}. " + TEXT, "max_tokens": tokens, "temperature": 0,
                           "stream": True}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        started, stamps = time.perf_counter(), [0.0]
        with urllib.request.urlopen(request, timeout=limit + 30) as response:
            for line in response:
                if line.startswith(b"data: {") and b'"text": ""' not in line and b'"text":""' not in line:
                    stamps.append(time.perf_counter())
                    if stamps[-1] - started > limit:
                        break
        stamps[0] = started
        return stamps

    def measure(self, index: int, tokens: int, limit: float) -> dict[str, Any]:
        before = thread_stats(self.process.pid)
        stamps = self._post(index, tokens, limit)
        after = thread_stats(self.process.pid)
        return result(stamps[0], stamps[1:], before, after)

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


# -- the run ----------------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every candidate under every condition, ``--repeat`` rounds; within a round each condition's
    neighbours run while every candidate is measured in turn, so ratios compare runs minutes apart at most."""
    found: dict[str, Any] = {"loadavg_start": Path("/proc/loadavg").read_text().strip(), "results": {}}
    holders: dict[str, Any] = {}
    try:
        for candidate in candidates(args):
            holders[f"{candidate.name} / engine"] = EngineProcess(candidate)
            if args.daemon and DaemonProcess.takes(candidate):
                holders[f"{candidate.name} / daemon"] = DaemonProcess(candidate)
            found["results"][f"{candidate.name} / engine"] = {"note": candidate.note,
                                                              "runs": {c: [] for c in CONDITIONS}}
            if f"{candidate.name} / daemon" in holders:
                found["results"][f"{candidate.name} / daemon"] = {"note": candidate.note,
                                                                  "runs": {c: [] for c in CONDITIONS}}
        index = 1
        for round_ in range(args.repeat):
            for condition in CONDITIONS:
                with neighbours(condition, int(args.max_seconds + 30) * len(holders)):
                    for name, holder in holders.items():
                        found["results"][name]["runs"][condition].append(
                            holder.measure(index, args.tokens, args.max_seconds))
                        index += 1
                print(f"round {round_ + 1}, {condition}: " + ", ".join(
                    f"{name} {found['results'][name]['runs'][condition][-1]['tok_s']:.1f}" for name in holders)
                    + f" tok/s (load {Path('/proc/loadavg').read_text().split()[0]})", file=sys.stderr, flush=True)
    finally:
        for holder in holders.values():
            holder.close()
    found["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
    return found


def report(found: dict[str, Any]) -> None:
    """Markdown: decode and TTFT per candidate and condition, ratios to its own idle and to today's build."""
    results = found["results"]
    today = {c: median(results.get("today / engine"), c, "tok_s") for c in CONDITIONS}
    print(f"load average at start: {found['loadavg_start']}; at end: {found['loadavg_end']}\n")
    print("| candidate / target | idle tok/s | 1 busy | 2 busy | 1 busy at nice 19 | 1 busy vs own idle | "
          "1 busy vs today's | idle vs today's | TTFT idle / 1 busy (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, entry in results.items():
        rate = {c: median(entry, c, "tok_s") for c in CONDITIONS}
        ttft = {c: median(entry, c, "ttft_ms") for c in CONDITIONS}
        print(f"| {name} | {rate['idle']:.1f} | {rate['1 busy']:.1f} | {rate['2 busy']:.1f} | "
              f"{rate['1 busy at nice 19']:.1f} | {ratio(rate['1 busy'], rate['idle'])} | "
              f"{ratio(rate['1 busy'], today['1 busy'])} | {ratio(rate['idle'], today['idle'])} | "
              f"{ttft['idle']:.0f} / {ttft['1 busy']:.0f} |")
    print("\nThreads (median per measurement): threads that ran / voluntary and involuntary context switches per "
          "token / share of CPU-wanted time spent waiting for a CPU\n")
    print("| candidate / target | idle | 1 busy | 2 busy |\n|---|---|---|---|")
    for name, entry in results.items():
        cells = [f"{median(entry, c, 'threads_ran'):.0f} / {median(entry, c, 'vol_per_token'):.1f} + "
                 f"{median(entry, c, 'invol_per_token'):.1f} / {median(entry, c, 'wait_share'):.2f}"
                 for c in CONDITIONS[:3]]
        print(f"| {name} | " + " | ".join(cells) + " |")


def median(entry: dict[str, Any] | None, condition: str, key: str) -> float:
    if not entry:
        return float("nan")
    values = [r[key] for r in entry["runs"][condition] if r.get(key) is not None]
    return float(statistics.median(values)) if values else float("nan")


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base and base == base and value == value else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds of the four conditions (median)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per measurement")
    parser.add_argument("--max-seconds", type=float, default=15.0, help="stop a measurement's decode after this")
    parser.add_argument("--openmp-off-python", help="a Python whose llama-cpp-python was built -DGGML_OPENMP=OFF")
    parser.add_argument("--only", help="comma-separated candidate names")
    parser.add_argument("--daemon", action="store_true", help="also measure through `edge-rt serve` over HTTP")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    found = run(args)
    report(found)
    print(json.dumps(found))


if __name__ == "__main__":
    main()
