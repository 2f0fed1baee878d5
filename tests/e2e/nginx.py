"""A real nginx on 127.0.0.1 serving a published CDN folder, as a fleet's origin does (Debian's nginx-light)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from daemons import free_port, require_tool, stop

_CONFIG = """
daemon off;
user nobody nogroup;
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    log_format edge '$request_method $uri $status $body_bytes_sent "$http_range" "$http_if_range" '
                    '"$http_if_none_match" $msec';
    access_log {run}/access.log edge;
    client_body_temp_path {run}/tmp/body;
    proxy_temp_path {run}/tmp/proxy;
    fastcgi_temp_path {run}/tmp/fastcgi;
    uwsgi_temp_path {run}/tmp/uwsgi;
    scgi_temp_path {run}/tmp/scgi;
    types {{ application/json json; application/octet-stream gguf; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        limit_rate {limit_rate};
        location / {{ }}
    }}
}}
"""


@dataclass
class Nginx:
    """A running nginx: its URL, the folder it serves, and its access log."""

    url: str
    root: Path
    run: Path

    def log(self) -> list[list[str]]:
        """The access log so far: [method, uri, status, bytes, range, if-range, if-none-match, time] per request
        (time: seconds since the epoch, millisecond resolution)."""
        lines = (self.run / "access.log").read_text().splitlines()
        return [[field.strip('"') for field in line.split(" ", 7)] for line in lines]


def nginx_binary() -> str:
    """nginx's path, or a clear failure in CI (which installs it) and a skip elsewhere."""
    return require_tool(("nginx", "/usr/sbin/nginx"), "nginx-light")


@contextmanager
def run_nginx(*, limit_rate: str = "0", worker_connections: int = 64) -> Iterator[Nginx]:
    """nginx serving a fresh world-readable folder (its workers run as nobody, as an origin's do)."""
    binary = nginx_binary()
    base = Path(tempfile.mkdtemp(prefix="edge-rt-origin-"))
    os.chmod(base, 0o755)  # nobody must reach the CDN folder, as on a real origin
    root, run = base / "cdn", base / "run"
    root.mkdir(mode=0o755)
    (run / "tmp").mkdir(parents=True)
    port = free_port()
    (run / "nginx.conf").write_text(_CONFIG.format(run=run, port=port, root=root, limit_rate=limit_rate,
                                                    worker_connections=worker_connections))
    process = subprocess.Popen([binary, "-c", str(run / "nginx.conf"), "-e", str(run / "error.log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    server = Nginx(url=f"http://127.0.0.1:{port}", root=root, run=run)
    try:
        for _ in range(100):
            if process.poll() is not None:
                raise AssertionError(f"nginx exited: {(run / 'error.log').read_text(errors='replace')}")
            try:
                requests.get(server.url, timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.05)
        yield server
    finally:
        stop(process, signal.SIGQUIT, timeout_s=10)
        shutil.rmtree(base, ignore_errors=True)
