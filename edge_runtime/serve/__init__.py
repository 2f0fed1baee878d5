"""The daemon: an aiohttp app serving a ``Runtime`` over an OpenAI-compatible API, following a CDN if given.

``serve`` is the one place where the device runtime and adapter distribution meet (``follower.py``). Names load on
first use: importing this package loads neither aiohttp's app nor llama.cpp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_runtime.lazy import lazy_attributes

__all__ = ["SHUTDOWN_GRACE_S", "Daemon", "ServeOptions", "ServerConfig", "create_app", "run"]

if TYPE_CHECKING:  # the names as type checkers see them; at run time _LAZY loads each on first use
    from edge_runtime.serve.app import create_app
    from edge_runtime.serve.daemon import ServeOptions, run
    from edge_runtime.serve.state import SHUTDOWN_GRACE_S, Daemon, ServerConfig

_LAZY = {
    "SHUTDOWN_GRACE_S": "state",
    "Daemon": "state",
    "ServerConfig": "state",
    "create_app": "app",
    "ServeOptions": "daemon",
    "run": "daemon",
}

_load = lazy_attributes(__name__, _LAZY)


def __getattr__(name: str) -> Any:
    return _load(name)
