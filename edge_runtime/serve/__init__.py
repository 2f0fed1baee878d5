"""The daemon: an aiohttp app serving a ``Runtime`` over an OpenAI-compatible API, following a CDN if given.

``serve`` is the one place where the device runtime and adapter distribution meet (``follower.py``). Names load on
first use: importing this package loads neither aiohttp's app nor llama.cpp.
"""

from __future__ import annotations

from typing import Any

from edge_runtime.lazy import lazy_attributes

__all__ = ["SHUTDOWN_GRACE_S", "Daemon", "ServeOptions", "ServerConfig", "create_app", "run"]

_LAZY = {"SHUTDOWN_GRACE_S": "state", "Daemon": "state", "ServerConfig": "state", "create_app": "app",
         "ServeOptions": "daemon", "run": "daemon"}

_load = lazy_attributes(__name__, {name: f".{module}" for name, module in _LAZY.items()})


def __getattr__(name: str) -> Any:
    return _load(name)
