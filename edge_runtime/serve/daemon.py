"""The wiring ``edge-rt serve`` calls: options → device profile → runtime → app (with a CDN client) → bounded site.

``run`` blocks until SIGINT or SIGTERM and frees the model on the way out. It prints nothing itself: the lines an
operator reads at start and stop go through ``say``.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.distribution.client import CdnClient, SyncSettings
from edge_runtime.distribution.keys import load_public_key
from edge_runtime.errors import AddressInUse
from edge_runtime.profiles import load_profile
from edge_runtime.runtime.budget import DEFAULT_REQUEST_LIMITS, RequestLimits
from edge_runtime.runtime.core import Runtime
from edge_runtime.serve import site
from edge_runtime.serve.app import create_app
from edge_runtime.serve.state import DAEMON, LOOPBACK_NAMES, SHUTDOWN_GRACE_S, ServerConfig

__all__ = ["ServeOptions", "run"]


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``edge-rt serve`` is told: where to listen, what to serve, the limits, and the CDN to follow."""

    profile: str = "auto"
    model: str | None = None
    adapters_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    preload: tuple[str, ...] = ()
    ctx: int | None = None
    parallel: int | None = None  # None: the profile's compute.parallel
    limits: RequestLimits = DEFAULT_REQUEST_LIMITS
    cdn: str | None = None
    public_key: Path | None = None
    cache_dir: Path | None = None
    offline: bool = False
    allow_metered_updates: bool = False
    request_timeout: float = 600.0  # seconds a completion may take from arrival, queue and generation included

    @property
    def loopback(self) -> bool:
        """True when the daemon listens on this host only."""
        return self.host in LOOPBACK_NAMES


def run(options: ServeOptions, *, say: Callable[[str], None]) -> None:
    """Serve until a signal stops the daemon; ``say`` receives the operator's lines (start, refusals, stop)."""
    check_port_free(options.host, options.port)  # before loading anything: one clear line, not a traceback later
    logging.getLogger("edge_runtime").setLevel(min(logging.getLogger().level, logging.INFO))
    runtime = Runtime(
        load_profile(options.profile),
        model=options.model,
        ctx=options.ctx,
        parallel=options.parallel,
        requests=options.limits,
    )
    started = time.monotonic()
    try:
        if options.adapters_dir is not None:
            for file_name, error in runtime.adapters.add_directory(options.adapters_dir)[1].items():
                say(f"edge-rt: not serving {options.adapters_dir / file_name}: {error}")
        client = _cdn_client(options, runtime)
        app = create_app(_server_config(options), runtime, cdn=client)

        async def announce(_: Any) -> None:  # after the CDN's adapters were registered and --preload loaded
            say(
                f"edge-rt: serving {runtime.model_path.name} under profile {runtime.profile.name} "
                f"({runtime.engine.threads} thread{'s' if runtime.engine.threads != 1 else ''}, usable cores "
                f"{runtime.cores.describe()}), {_sequences(runtime.engine.parallel)}, on "
                f"http://{options.host}:{options.port} with {_adapter_counts(runtime)}"
                + (
                    f", {'offline: serving the cache of' if client.offline else 'following'} {options.cdn}"
                    if client
                    else ""
                )
            )
            say(f"edge-rt: threads: {runtime.compute_status()['thread_policy']}")

        app.on_startup.append(announce)
        site.run(
            app,
            host=options.host,
            port=options.port,
            max_connections=runtime.plan.max_connections,
            on_refused=app[DAEMON].metrics.refused_connections.inc,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_GRACE_S + 2.0,
        )
        say(
            f"edge-rt: stopped after {time.monotonic() - started:.0f} s, {runtime.engine.decoded_tokens} tokens "
            "generated"
        )
    finally:
        runtime.close()


def check_port_free(host: str, port: int) -> None:
    """Raise ``AddressInUse`` when ``host``:``port`` cannot be listened on (taken, or not this host's address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AddressInUse(host, port, str(exc)) from exc
    family, kind, _, _, address = infos[0]
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: only a listener conflicts
        try:
            probe.bind(address)
        except OSError as exc:
            raise AddressInUse(host, port, exc.strerror or str(exc)) from exc


def _server_config(options: ServeOptions) -> ServerConfig:
    return ServerConfig(
        api_key=options.api_key,
        adapters_dir=options.adapters_dir,
        loopback_only=options.loopback,
        preload=options.preload,
        request_timeout_s=options.request_timeout,
    )


def _cdn_client(options: ServeOptions, runtime: Runtime) -> CdnClient | None:
    if options.cdn is None:
        return None
    settings = SyncSettings.for_profile(runtime.profile, allow_metered_updates=options.allow_metered_updates)
    return CdnClient(
        options.cdn,
        cache_dir=options.cache_dir,
        base_fingerprint=runtime.base_fingerprint,
        public_key=load_public_key(options.public_key) if options.public_key else None,
        sync_settings=settings,
        offline=True if options.offline else None,
        protected=runtime.adapters.protected_names,
    )


def _sequences(parallel: int) -> str:
    """How many generations the engine decodes together, for the start line (``--parallel``, or the profile's)."""
    return "one sequence at a time" if parallel == 1 else f"up to {parallel} sequences together"


def _adapter_counts(runtime: Runtime) -> str:
    states = [a.state for a in runtime.adapters.list_adapters()]
    detail = ", ".join(f"{states.count(s)} {s}" for s in ("resident", "cached", "remote") if states.count(s))
    return f"{len(states)} adapter{'s' if len(states) != 1 else ''}" + (f" ({detail})" if detail else "")
