"""The cache lock across processes: a bounded wait that names the holder, and a wait a shutdown interrupts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.distribution.recovery import recover as recover_cache
from edge_runtime.distribution.store import AdapterStore
from edge_runtime.errors import CacheBusy

_HOLD = """
import sys
from pathlib import Path
from edge_runtime.distribution.recovery import recover as recover_cache
from edge_runtime.distribution.store import AdapterStore
store = AdapterStore(Path(sys.argv[1]))
with store.locked():
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the cache lock of ``tmp_path / "cache"`` (as a `cache gc` stopped with Ctrl-Z does)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "cache")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None and process.stdout.readline() == "held\n"
    process.send_signal(signal.SIGSTOP)
    yield process
    process.send_signal(signal.SIGCONT)
    process.communicate("", timeout=30)


def test_a_wait_for_a_stopped_holder_ends_with_an_error_naming_its_pid(
        tmp_path: Path, holder: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 18 item 3: a `cache gc` stopped with Ctrl-Z blocked a daemon's start for ever.
    monkeypatch.setenv("EDGE_RT_CACHE_LOCK_TIMEOUT_S", "0.5")
    store = AdapterStore(tmp_path / "cache")
    with pytest.raises(CacheBusy) as busy:
        store.collect_garbage()
    assert busy.value.holder_pid == holder.pid and not busy.value.interrupted
    assert f"process {holder.pid} holds the cache lock" in str(busy.value) and f"kill -CONT {holder.pid}" in str(
        busy.value)
    assert busy.value.exit_code == 1 and busy.value.http_status == 503


def test_closing_the_store_ends_a_wait_for_the_lock(tmp_path: Path, holder: subprocess.Popen[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The daemon said "stopped" on SIGTERM and stayed alive inside flock.
    monkeypatch.setenv("EDGE_RT_CACHE_LOCK_TIMEOUT_S", "3600")
    store = AdapterStore(tmp_path / "cache")
    outcome: list[BaseException] = []

    def recover() -> None:
        try:
            recover_cache(store)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=recover)
    waiter.start()
    store.close()  # what the daemon's shutdown does
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], CacheBusy) and outcome[0].interrupted
    assert outcome[0].holder_pid == holder.pid


def test_the_cli_gives_up_on_a_held_lock_with_its_exit_code_and_the_holder(
        tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "cache", "--cache-dir", str(tmp_path / "cache"),
                           "gc"], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"EDGE_RT_CACHE_LOCK_TIMEOUT_S": "1"})
    assert done.returncode == 1, done.stderr
    assert f"process {holder.pid} holds the cache lock" in done.stderr and "Traceback" not in done.stderr
