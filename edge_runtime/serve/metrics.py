"""Prometheus metrics of the daemon, in a registry of its own (one per app, so tests can run several)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_runtime.runtime.budget import measured_rss_bytes
from edge_runtime.runtime.core import Runtime
from edge_runtime.serve.intake import RequestIntake
from edge_runtime.serve.scheduler import Scheduler

if TYPE_CHECKING:
    from edge_runtime.serve.follower import CdnFollower

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _RuntimeCollector(Collector):
    """Reads the runtime's and the scheduler's own counters at scrape time."""

    def __init__(self, runtime: Runtime, scheduler: Scheduler, intake: RequestIntake) -> None:
        self.runtime = runtime
        self.scheduler = scheduler
        self.intake = intake

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "edge_rt_tokens_decoded",
            "Tokens the model generated, delivered or not",
            value=self.scheduler.decoded_tokens,
        )
        yield CounterMetricFamily(
            "edge_rt_generations_cancelled",
            "Generations stopped early (client gone)",
            value=self.scheduler.cancelled_jobs,
        )
        yield GaugeMetricFamily("edge_rt_queued_requests", "Requests waiting", value=self.scheduler.queued)
        engine = self.runtime.engine
        yield GaugeMetricFamily(
            "edge_rt_running_sequences",
            "Generations holding a sequence slot of the engine",
            value=engine.running_sequences,
        )
        yield GaugeMetricFamily(
            "edge_rt_parallel_sequences", "Sequences the engine decodes together at most", value=engine.parallel
        )
        yield GaugeMetricFamily(
            "edge_rt_last_batch_size", "Sequences the last decode step decoded", value=engine.last_batch_size
        )
        yield GaugeMetricFamily(
            "edge_rt_last_batch_rows",
            "The most sequences one llama_decode of the last decode step carried (fewer than last_batch_size when "
            "exact answers need it: float adapter weights on a LLAMAFILE build, repacked base weights)",
            value=engine.last_batch_rows,
        )
        yield CounterMetricFamily(
            "edge_rt_decode_steps",
            "Decode steps (one token of every decoding sequence of one adapter set)",
            value=engine.decode_steps,
        )
        yield CounterMetricFamily(
            "edge_rt_decode_step_tokens",
            "Tokens decode steps decoded (over decode_steps: sequences per step; over decode_calls: per llama_decode)",
            value=engine.decode_step_tokens,
        )
        yield CounterMetricFamily(
            "edge_rt_decode_calls",
            "llama_decode calls of the decode steps",
            value=engine.decode_calls,
        )
        yield CounterMetricFamily(
            "edge_rt_prompt_tokens_evaluated",
            "Prompt tokens evaluated (not taken from cache)",
            value=engine.evaluated_tokens,
        )
        yield CounterMetricFamily(
            "edge_rt_prompt_tokens_shared",
            "Prompt tokens copied from another sequence's KV",
            value=engine.shared_tokens,
        )
        yield GaugeMetricFamily(
            "edge_rt_reading_requests",
            "Requests whose bodies are being read, parsed or tokenized",
            value=self.intake.reading,
        )
        yield GaugeMetricFamily(
            "edge_rt_waiting_to_read_requests",
            "Requests waiting for a read slot, body unread",
            value=self.intake.waiting,
        )
        stats = self.runtime.adapters.stats
        yield CounterMetricFamily("edge_rt_adapter_loads", "Adapter loads into memory", value=stats.loads)
        yield CounterMetricFamily("edge_rt_adapter_evictions", "Adapters evicted from memory", value=stats.evictions)
        yield CounterMetricFamily(
            "edge_rt_adapter_load_seconds", "Time spent loading adapters", value=stats.load_seconds_total
        )
        yield CounterMetricFamily(
            "edge_rt_adapter_switches", "Changes of the active adapter set", value=self.runtime.engine.switches
        )
        yield GaugeMetricFamily(
            "edge_rt_resident_adapter_bytes", "Bytes of resident adapters", value=self.runtime.adapters.resident_bytes
        )
        yield GaugeMetricFamily(
            "edge_rt_adapter_budget_bytes", "Adapter memory budget", value=self.runtime.adapters.budget_bytes
        )
        yield GaugeMetricFamily(
            "edge_rt_runtime_budget_bytes",
            "Runtime memory budget of the device profile",
            value=self.runtime.profile.runtime_budget_bytes,
        )
        yield GaugeMetricFamily("edge_rt_rss_bytes", "Resident set size of the daemon", value=measured_rss_bytes())
        yield CounterMetricFamily(
            "edge_rt_shed_requests",
            "Completions refused (503) while RSS was over the budget",
            value=self.intake.shed_requests,
        )
        yield GaugeMetricFamily(
            "edge_rt_over_budget",
            "1 while the daemon sheds load for memory, else 0",
            value=int(self.intake.over_budget),
        )
        yield from _compute(self.runtime.compute_status())


def _compute(status: dict[str, Any]) -> Iterator[Metric]:
    """Threads and cores, and whether the device is too busy for them: decode rate and CPU contention."""
    yield GaugeMetricFamily(
        "edge_rt_engine_threads",
        "The most threads llama.cpp decodes with (the profile's, within the usable cores)",
        value=status["threads"],
    )
    yield GaugeMetricFamily(
        "edge_rt_engine_threads_running",
        "Threads the next decode step runs (fewer than edge_rt_engine_threads while the device is busy)",
        value=status["running_threads"],
    )
    yield CounterMetricFamily(
        "edge_rt_engine_thread_changes",
        "Times the engine shed a thread for a busy device or took one back",
        value=status["thread_changes"],
    )
    yield CounterMetricFamily(
        "edge_rt_engine_shed_steps",
        "Decode steps run with fewer threads than the profile's (the device was busy)",
        value=status["shed_steps"],
    )
    yield GaugeMetricFamily(
        "edge_rt_usable_cores",
        "Cores this process may use (affinity mask, cgroup CPU quota)",
        value=status["usable_cores"],
    )
    yield GaugeMetricFamily(
        "edge_rt_decode_tokens_per_second",
        "Decode speed over the last minute: generated tokens / engine time spent on them (prompt evaluation excluded)",
        value=status["decode_tokens_per_second"],
    )
    yield GaugeMetricFamily(
        "edge_rt_engine_cpu_contention",
        "Share of the last minute's CPU-wanted time the "
        "engine's threads waited for a CPU (runnable, not running; /proc schedstat)",
        value=status["contention"],
    )
    yield CounterMetricFamily(
        "edge_rt_engine_cpu_seconds", "CPU time the engine's threads ran", value=status["cpu_seconds"]
    )
    yield CounterMetricFamily(
        "edge_rt_engine_cpu_wait_seconds",
        "Time the engine's threads were runnable but waited for a CPU (the device was busy with other work)",
        value=status["cpu_wait_seconds"],
    )


class _FollowerCollector(Collector):
    """The CDN follower's state at scrape time: a device stuck on an old manifest can be alerted on."""

    def __init__(self, follower: CdnFollower) -> None:
        self.follower = follower

    def collect(self) -> Iterator[Metric]:
        follower = self.follower
        if follower.version is not None:
            yield GaugeMetricFamily(
                "edge_rt_manifest_version", "Version of the last manifest verified from the CDN", value=follower.version
            )
        if follower.last_refresh is not None:
            yield GaugeMetricFamily(
                "edge_rt_manifest_last_refresh_timestamp_seconds",
                "When the manifest was last verified (seconds since the epoch)",
                value=follower.last_refresh,
            )
        yield CounterMetricFamily(
            "edge_rt_manifest_refresh_failures", "Manifest refreshes that failed", value=follower.refresh_failures
        )
        yield GaugeMetricFamily(
            "edge_rt_pulls_in_progress", "Adapter downloads requests are waiting for", value=len(follower.downloads())
        )


class Metrics:
    """The daemon's counters and histograms."""

    def __init__(self, runtime: Runtime, scheduler: Scheduler, intake: RequestIntake) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edge_rt_requests",
            "Completion requests by adapter and HTTP status",
            ["adapter", "status"],
            registry=self.registry,
        )
        self.tokens = Counter("edge_rt_tokens_generated", "Tokens generated", ["adapter"], registry=self.registry)
        self.first_token = Histogram(
            "edge_rt_time_to_first_token_seconds",
            "Time from request to first token",
            ["adapter"],
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.pulls = Counter(
            "edge_rt_pulls", "Adapter pulls from the CDN by result", ["result"], registry=self.registry
        )
        self.pull_bytes = Counter("edge_rt_pull_bytes", "Bytes downloaded by adapter pulls", registry=self.registry)
        self.pull_seconds = Histogram(
            "edge_rt_pull_seconds",
            "Time an adapter pull took",
            registry=self.registry,
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
        )
        self.refused_connections = Counter(
            "edge_rt_refused_connections",
            "Connections answered 503 and closed unread: as many were open as --max-connections allows",
            registry=self.registry,
        )
        self.registry.register(_RuntimeCollector(runtime, scheduler, intake))

    def follow(self, follower: CdnFollower) -> None:
        """Export ``follower``'s manifest state (version, last refresh, failures) and its downloads."""
        self.registry.register(_FollowerCollector(follower))

    def observe_pull(self, name: str, received_bytes: int, seconds: float, ok: bool) -> None:
        """Count one pull of adapter ``name``: bytes it downloaded, how long it took, whether it succeeded."""
        self.pulls.labels("ok" if ok else "failed").inc()
        self.pull_bytes.inc(received_bytes)
        self.pull_seconds.observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
