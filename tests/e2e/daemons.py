"""Starting real `edge-rt serve` processes on 127.0.0.1 for the end-to-end tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Daemon:
    """A running daemon: its URL, process and log file."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def run_daemon(*args: str, log: Path, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    """Start `edge-rt serve ARGS` on a free port and wait until /health answers."""
    port = free_port()
    command = [sys.executable, "-m", "edge_runtime.cli", "serve", "--port", str(port), *args]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    daemon = Daemon(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(f"daemon exited with {process.returncode}:\n{daemon.log_text()}")
            try:
                if requests.get(f"{daemon.url}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon did not come up:\n{daemon.log_text()}")
            time.sleep(0.1)
        yield daemon
    finally:
        if process.poll() is None:
            stop(process, signal.SIGTERM, timeout_s=20)


def stop(process: subprocess.Popen[bytes], signum: int, *, timeout_s: float) -> None:
    """Send ``signum`` and wait for the process to end; kill it when it takes longer than ``timeout_s``."""
    process.send_signal(signum)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def require_tool(candidates: tuple[str, ...], package: str) -> str:
    """The first of ``candidates`` found (a name on PATH or a path), or a clear failure in CI (which installs
    ``package``) and a skip elsewhere: a missing tool never lets its tests pass unseen."""
    for candidate in candidates:
        found = shutil.which(candidate)
        if found or (os.path.isabs(candidate) and os.path.exists(candidate)):
            return found or candidate
    message = f"{candidates[0]} is not installed (apt-get install {package}; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def metric(daemon: Daemon, name: str, **labels: str) -> float:
    """The sum of the daemon's ``/metrics`` samples named ``name`` whose labels include ``labels``."""
    text = requests.get(f"{daemon.url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())
