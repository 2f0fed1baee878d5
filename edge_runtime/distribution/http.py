"""The one module that builds aiohttp client sessions, so every outgoing request shares one policy.

Policy: a connect timeout and a gap timeout (the longest silence between two reads) instead of a total one (the
caller owns the overall deadline); no transparent decompression (byte counts must be the bytes on the wire and
a gzip bomb must not inflate past a length bound); no proxy or netrc from the environment; redirects followed.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp

from edge_runtime import __version__

USER_AGENT = f"edge-rt/{__version__}"


def create_session(
    *,
    connect_timeout_s: float,
    gap_timeout_s: float,
    max_connections: int = 8,
    headers: dict[str, str] | None = None,
    middlewares: Sequence[aiohttp.ClientMiddlewareType] = (),
) -> aiohttp.ClientSession:
    """A client session with edge-rt's timeouts and headers (plus ``headers``); close it with ``await .close()``.

    aiohttp drops ``Authorization`` when a redirect leaves the origin (the Hub redirects downloads to its CDN).
    ``middlewares`` wrap every request (a registry's challenge-answering auth, ``registry_auth.py``).
    """
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=connect_timeout_s, connect=connect_timeout_s, sock_read=gap_timeout_s
    )
    return aiohttp.ClientSession(
        timeout=timeout,
        auto_decompress=False,
        trust_env=False,
        raise_for_status=False,
        connector=aiohttp.TCPConnector(limit=max_connections),
        middlewares=tuple(middlewares),
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {})},
    )
