"""The one module that builds aiohttp client sessions, so every outgoing request shares one policy.

Policy: a connect timeout and a gap timeout (the longest silence between two reads) instead of a total one (the
caller owns the overall deadline); no transparent decompression (byte counts must be the bytes on the wire and
a gzip bomb must not inflate past a length bound); no proxy or netrc from the environment; redirects followed, but
only to http(s), at most ``MAX_REDIRECTS`` of them, never to a link-local address (169.254.169.254 is a cloud's
metadata service), and from an origin on a public address never to a loopback or private one (a CDN must not be
able to point a device at its own LAN): ``RedirectRefused`` otherwise.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from types import SimpleNamespace

import aiohttp
from yarl import URL

from edge_runtime import __version__
from edge_runtime.errors import RedirectRefused

USER_AGENT = f"edge-rt/{__version__}"
MAX_REDIRECTS = 10  # aiohttp's per-request default (max_redirects), which every request here keeps


class RedirectBlocked(Exception):  # noqa: N818 (a carrier, not an error users see)
    """Carries a ``RedirectRefused`` out of aiohttp, which would wrap an ``OSError`` (as TransferFailed is) into a
    ClientOSError, i.e. a retryable lost connection; callers raise ``.error``."""

    def __init__(self, error: RedirectRefused) -> None:
        self.error = error
        super().__init__(str(error))


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
    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(_check_redirect)
    return aiohttp.ClientSession(
        timeout=timeout,
        auto_decompress=False,
        trust_env=False,
        raise_for_status=False,
        connector=aiohttp.TCPConnector(limit=max_connections),
        middlewares=tuple(middlewares),
        trace_configs=[trace],
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {})},
    )


async def _check_redirect(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestRedirectParams
) -> None:
    """Raise ``RedirectBlocked`` before aiohttp follows a redirect edge-rt does not allow."""
    try:
        await _judge_redirect(params)
    except RedirectRefused as refused:
        raise RedirectBlocked(refused) from None


async def _judge_redirect(params: aiohttp.TraceRequestRedirectParams) -> None:
    origin = params.url
    location = params.response.headers.get("Location")
    if location is None:
        return
    target = origin.join(URL(location))
    if target.scheme not in ("http", "https"):
        raise RedirectRefused(str(origin), location, "only http and https are followed")
    target_kinds = await address_kinds(target.host or "")
    if "link-local" in target_kinds:
        raise RedirectRefused(str(origin), location, "it points at a link-local address (a metadata service?)")
    if target_kinds & {"loopback", "private"} and not await address_kinds(origin.host or "") & {"loopback", "private"}:
        raise RedirectRefused(
            str(origin), location, "a public origin may not send a device to a loopback or private address"
        )


async def address_kinds(host: str) -> set[str]:
    """Which of "loopback", "private", "link-local" and "public" the addresses ``host`` resolves to are."""
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError:
            return set()  # unresolvable: the connection itself will fail with a clear error
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    kinds = set()
    for address in addresses:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        kinds.add(
            "link-local"
            if address.is_link_local
            else "loopback"
            if address.is_loopback
            else "private"
            if address.is_private
            else "public"
        )
    return kinds
