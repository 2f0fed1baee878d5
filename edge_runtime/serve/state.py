"""The daemon's bottom floor: how it serves (``ServerConfig``) and the one object its handlers reach it through
(``Daemon``, under the app key ``DAEMON``).

Handlers, middleware and lifecycles import this module, never ``app.py``. Request limits (body cap, queue,
connections) have one home: the runtime's memory plan, built from ``RequestLimits`` — the daemon reads them there,
so what it allows is what the plan counts.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from edge_runtime.distribution.client import CdnClient
from edge_runtime.runtime.core import Runtime
from edge_runtime.serve.follower import CdnFollower
from edge_runtime.serve.intake import RequestIntake
from edge_runtime.serve.metrics import Metrics
from edge_runtime.serve.scheduler import Scheduler
from edge_runtime.serve.status import RecentRequest

__all__ = ["APPLIED", "DAEMON", "LOOPBACK_NAMES", "REQUESTED", "SHUTDOWN_GRACE_S", "TOKENS", "Daemon", "ServerConfig"]

SHUTDOWN_GRACE_S = 4.0  # a running generation's time to finish after SIGTERM (run the app with a longer timeout)
RECENT_REQUESTS = 20  # answered requests kept for the status page
REQUEST_WORKERS = 2  # threads that tokenize prompts and parse large bodies
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})  # hosts that reach this machine only


@dataclass(frozen=True)
class ServerConfig:
    """How the daemon serves: the API key, waits and timeouts, and what it loads at start."""

    api_key: str | None = None
    max_wait_s: float = 2.0
    max_tokens: int | None = None  # cap on a request's max_tokens; None = the context length
    preload: tuple[str, ...] = ()  # adapters made resident before serving (pulled first when only remote)
    body_timeout_s: float = 30.0  # a client that stalls its body longer is answered 408 and disconnected
    body_gap_s: float = 5.0  # ... and one that sends nothing for this long inside its body
    adapters_dir: Path | None = None  # --adapters-dir: rescanned on SIGHUP; /load picks up a new file in it
    loopback_only: bool = True  # bound to 127.0.0.1: a request naming another host is a DNS-rebinding attempt
    request_timeout_s: float = 600.0  # a completion's wall time from arrival: the engine stops it (504) inside a token


@dataclass
class Daemon:
    """Everything a running daemon holds: its runtime, queue, intake, metrics, CDN follower and recent requests."""

    config: ServerConfig
    runtime: Runtime
    scheduler: Scheduler
    intake: RequestIntake
    metrics: Metrics
    follower: CdnFollower | None = None
    recent: deque[RecentRequest] = field(default_factory=lambda: deque(maxlen=RECENT_REQUESTS))
    started: float = field(default_factory=time.time)  # seconds since the epoch
    stopping: bool = False  # a shutdown began: a request that did not run is a 503, never an empty 200
    descriptions: dict[str, str] = field(default_factory=dict)  # local adapters' general.description, by sha256
    request_work: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=REQUEST_WORKERS, thread_name_prefix="edge-rt-request")
    )  # no thread starts until used

    @classmethod
    def build(cls, config: ServerConfig, runtime: Runtime, *, cdn: CdnClient | None = None) -> Daemon:
        """The daemon's parts for ``runtime``, with the limits of its memory plan (following ``cdn`` if given)."""
        plan = runtime.plan
        scheduler = Scheduler(runtime, max_queue=plan.max_queue, max_wait_s=config.max_wait_s)
        intake = RequestIntake(
            reads=plan.request_reads,
            max_waiting=plan.max_queue,
            budget_bytes=runtime.profile.runtime_budget_bytes,
            body_timeout_s=config.body_timeout_s,
            body_gap_s=config.body_gap_s,
        )
        metrics = Metrics(runtime, scheduler, intake)
        follower = None
        if cdn is not None:
            follower = CdnFollower(cdn, runtime.adapters)
            follower.on_pull = metrics.observe_pull
            metrics.follow(follower)
        return cls(
            config=config, runtime=runtime, scheduler=scheduler, intake=intake, metrics=metrics, follower=follower
        )

    @property
    def base_id(self) -> str:
        """The id clients use for the base model (the GGUF file's stem)."""
        return self.runtime.model_path.stem

    @property
    def max_body_bytes(self) -> int:
        """The largest request body accepted, in bytes (the memory plan's)."""
        return self.runtime.plan.max_body_bytes

    async def pull_remote(self, names: list[str]) -> None:
        """Pull the named adapters the device knows only from the CDN (a no-op without one)."""
        if self.follower is not None:
            await self.follower.pull(names)


DAEMON = web.AppKey("daemon", Daemon)
REQUESTED = web.RequestKey("requested", str)  # what a completion request asked for ("a+b", "base"), once parsed
APPLIED = web.RequestKey("applied", str)  # what ran: the X-Edge-Adapters value
TOKENS = web.RequestKey("tokens", tuple)  # (prompt tokens, completion tokens)
ENDED_WITH = web.RequestKey("ended_with", int)  # a stream's error status once its 200 headers went out (log, metrics)
