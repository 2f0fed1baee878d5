"""A real daemon bounds its open connections: past the bound a connection is answered 503 and closed unread, so
connections that push bodies nobody reads cannot grow the daemon past its memory plan."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from daemons import Daemon, metric, run_daemon

MIB = 1 << 20
DEFAULT_CONNECTIONS = 16 + 2 + 4  # --max-queue + the readers + 4 spare, as `edge-rt plan` counts them


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory, serve_profile: Path) -> Iterator[Daemon]:
    log = tmp_path_factory.mktemp("bounded") / "serve.log"
    with run_daemon("--profile", str(serve_profile), log=log) as running:
        yield running


def _connect(daemon: Daemon) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(daemon.url.rsplit(":", 1)[1])), timeout=10)


def _answer(conn: socket.socket, *, timeout_s: float = 5) -> bytes:
    """What the daemon sent before closing (b"" when it sent nothing within ``timeout_s``)."""
    conn.settimeout(timeout_s)
    received = b""
    try:
        while chunk := conn.recv(65536):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received


def _hold(daemon: Daemon, count: int) -> list[socket.socket]:
    """``count`` idle connections the daemon accepted (one opened while an earlier client's close was still being
    processed may have been refused: it is opened again)."""
    held: list[socket.socket] = []
    while len(held) < count:
        held.append(_connect(daemon))
        if len(held) == count:
            time.sleep(0.3)
            refused = [conn for conn in held if _answer(conn, timeout_s=0.01)]
            for conn in refused:
                conn.close()
            held = [conn for conn in held if conn not in refused]
    return held


def test_connections_past_the_bound_get_503_at_once_and_room_returns_when_one_closes(bounded: Daemon) -> None:
    time.sleep(0.3)  # the fixture's own requests have closed
    refused_before = metric(bounded, "edge_rt_refused_connections_total")
    held = _hold(bounded, DEFAULT_CONNECTIONS)  # idle: nothing sent yet
    try:
        extra = [_connect(bounded) for _ in range(5)]
        answers = [_answer(conn) for conn in extra]
        for answer in answers:
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 Service Unavailable") and b"Retry-After: 1" in head, answer
            error = json.loads(body)["error"]
            assert error["code"] == "too_many_connections" and "--max-connections" in error["message"]
        for conn in extra:
            conn.close()
        # One of the held connections is used as any keep-alive client would: it is served.
        held[0].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200 OK")
        for conn in held[:3]:
            conn.close()
        time.sleep(0.3)
        assert requests.get(f"{bounded.url}/health", timeout=10).status_code == 200
    finally:
        for conn in held:
            conn.close()
    assert "22 open, the most --max-connections allows" in bounded.log_text()
    time.sleep(0.3)
    assert metric(bounded, "edge_rt_refused_connections_total") - refused_before >= 5  # the operator sees them


def test_idle_connections_make_room_for_a_new_client_instead_of_locking_it_out(bounded: Daemon) -> None:
    # 22 sockets that never send a request held every slot until aiohttp's keep-alive timeout: now, once they are
    # 2 s old, the oldest idle one is closed for each new client.
    time.sleep(0.3)
    held = _hold(bounded, DEFAULT_CONNECTIONS)
    try:
        time.sleep(2.5)
        for _ in range(3):  # each evicts one, oldest first
            assert requests.get(f"{bounded.url}/health", timeout=10).status_code == 200
        assert [_answer(conn, timeout_s=2) for conn in held[:3]] == [b"", b"", b""]  # closed, nothing sent
        with pytest.raises(TimeoutError):  # the younger ones are still open
            held[3].settimeout(0.2)
            held[3].recv(1)
    finally:
        for conn in held:
            conn.close()


def test_hundreds_of_connections_pushing_unread_bodies_stay_within_what_the_plan_counts(bounded: Daemon) -> None:
    # Each pushes 300 KB of a 1 MB body to a route that reads none; before the bound, 300 of them added ~100 MiB.
    process = psutil.Process(bounded.process.pid)
    time.sleep(0.5)
    before = process.memory_info().rss
    head = (b"POST /v1/nothing-here HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n")
    conns, peak = [], before
    try:
        for _ in range(300):
            conn = _connect(bounded)
            conn.setblocking(False)
            conns.append(conn)
            try:
                conn.send(head + b"x" * 300_000)
            except (BlockingIOError, ConnectionResetError, BrokenPipeError):
                pass  # the daemon stopped reading it, or refused it
            peak = max(peak, process.memory_info().rss)
        time.sleep(1)
        peak = max(peak, process.memory_info().rss)
    finally:
        for conn in conns:
            conn.close()
    counted = (DEFAULT_CONNECTIONS - 2) * 384 * 1024  # what the plan counts for connections other than the readers
    assert peak - before <= counted + 8 * MIB, f"RSS grew {(peak - before) / MIB:.1f} MiB, counted {counted / MIB} MiB"
    print(f"RSS grew {(peak - before) / MIB:.1f} MiB with 300 pushing connections; the plan counts {counted / MIB} MiB")
    deadline = time.monotonic() + 10  # and it serves again once it has seen them close
    while requests.get(f"{bounded.url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the closed connections were never released"
        time.sleep(0.1)
