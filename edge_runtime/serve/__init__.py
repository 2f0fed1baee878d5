"""The daemon: an aiohttp app serving a ``Runtime`` over an OpenAI-compatible API, following a CDN if given.

``serve`` is the one place where the device runtime and adapter distribution meet (``follower.py``).
"""

from __future__ import annotations

from edge_runtime.serve.app import SHUTDOWN_GRACE_S, ServerConfig, create_app

__all__ = ["SHUTDOWN_GRACE_S", "ServerConfig", "create_app"]
