"""`edge-rt serve --cdn`: adapters a signed CDN offers are listed as remote and pulled on first use."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import requests
from daemons import Daemon, free_port, run_daemon
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.distribution.keys import generate_key, load_private_key
from edge_runtime.distribution.publish import publish

CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture
def cdn(tmp_path: Path, adapters_dir: Path) -> Iterator[tuple[str, Path]]:
    """A signed CDN folder served by a real static HTTP server on 127.0.0.1."""
    key, public = generate_key(tmp_path / "signing.key")
    publish(adapters_dir, tmp_path / "cdn", key=load_private_key(key), allow_renamed=True)  # a, b, c
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(tmp_path / "cdn")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            requests.get(f"{url}/manifest.json", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.05)
    yield url, public
    server.terminate()
    server.wait()


def serve_cdn(tmp_path: Path, profile: Path, cdn: tuple[str, Path], *extra: str,
              log: str = "log") -> AbstractContextManager[Daemon]:
    """`edge-rt serve --cdn` on the test CDN with its public key and a cache under tmp_path."""
    url, public = cdn
    return run_daemon("--profile", str(profile), "--cdn", url, "--public-key", str(public), "--cache-dir",
                      str(tmp_path / "device-cache"), *extra, log=tmp_path / log, env={"HF_HUB_OFFLINE": "0"})


def test_remote_adapter_is_pulled_verified_and_served_on_first_use(tmp_path: Path, serve_profile: Path,
                                                                  adapters_dir: Path,
                                                                  cdn: tuple[str, Path]) -> None:
    cache = tmp_path / "device-cache"
    with serve_cdn(tmp_path, serve_profile, cdn) as daemon:
        states = {a["name"]: a["state"] for a in requests.get(f"{daemon.url}/v1/adapters", timeout=10).json()["data"]}
        assert states == {"a": "remote", "b": "remote", "c": "remote"}
        response = requests.post(f"{daemon.url}/v1/chat/completions", timeout=60,
                                 json={"model": "b", "messages": CHAT, "max_tokens": 6, "temperature": 0})
        assert response.status_code == 200, response.text
        sha = hashlib.sha256((adapters_dir / "b.gguf").read_bytes()).hexdigest()
        assert response.headers["X-Edge-Adapters"] == f"b@{sha[:16]}:1"
        blobs = sorted(p.name for p in (cache / "blobs").iterdir())
        assert blobs == [f"{sha}.gguf"]
        states = {a["name"]: a["state"] for a in requests.get(f"{daemon.url}/v1/adapters", timeout=10).json()["data"]}
        assert states == {"a": "remote", "b": "resident", "c": "remote"}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(
            requests.get(f"{daemon.url}/metrics", timeout=10).text) for s in family.samples}
        assert samples[("edge_rt_pulls_total", (("result", "ok"),))] == 1
        assert samples[("edge_rt_pull_bytes_total", ())] == (adapters_dir / "b.gguf").stat().st_size
        assert samples[("edge_rt_pull_seconds_count", ())] == 1
        assert re.search(r"pulling adapter b from .*\n.*pulled adapter b: [\d.]+ MB downloaded in", daemon.log_text())
        refreshed = requests.post(f"{daemon.url}/v1/sync", timeout=30).json()
        assert refreshed["version"] == 1 and refreshed["offered"] == ["a", "b", "c"]

    # Restarted offline, the daemon serves what it pulled; what it never had is a cache miss (the last manifest).
    with serve_cdn(tmp_path, serve_profile, cdn, "--offline", log="log2") as daemon:
        ok = requests.post(f"{daemon.url}/v1/chat/completions", timeout=60,
                           json={"model": "b", "messages": CHAT, "max_tokens": 6, "temperature": 0})
        assert ok.status_code == 200
        assert ok.json()["choices"][0]["message"]["content"] == response.json()["choices"][0]["message"]["content"]
        missing = requests.post(f"{daemon.url}/v1/chat/completions", timeout=60,
                                json={"model": "a", "messages": CHAT, "max_tokens": 6})
        assert (missing.status_code, missing.json()["error"]["type"]) == (503, "cache_miss")
        assert missing.headers["x-should-retry"] == "false"  # the official client retried it twice
        assert "not cached and the device is offline" in missing.json()["error"]["message"]


def test_preload_pulls_a_remote_adapter_before_serving(tmp_path: Path, serve_profile: Path,
                                                       cdn: tuple[str, Path]) -> None:
    with serve_cdn(tmp_path, serve_profile, cdn, "--preload", "c") as daemon:
        states = {a["name"]: a["state"] for a in requests.get(f"{daemon.url}/v1/adapters", timeout=10).json()["data"]}
        assert states == {"a": "remote", "b": "remote", "c": "resident"}
    failed = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "serve", "--profile", str(serve_profile),
                             "--port", str(free_port()), "--cdn", cdn[0], "--cache-dir", str(tmp_path / "cache"),
                             "--preload", "nope"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HF_HUB_OFFLINE": "0"})
    assert failed.returncode != 0 and "unknown adapter 'nope'" in failed.stderr


def test_sync_route_without_a_cdn_is_a_clear_400(tmp_path: Path, serve_profile: Path) -> None:
    with run_daemon("--profile", str(serve_profile), log=tmp_path / "log") as daemon:
        response = requests.post(f"{daemon.url}/v1/sync", timeout=10)
        assert response.status_code == 400
        assert "start it with --cdn URL" in response.json()["error"]["message"]


def test_a_version_published_while_serving_takes_over_after_a_sync(tmp_path: Path, serve_profile: Path,
                                                                    adapters_dir: Path,
                                                                    cdn: tuple[str, Path]) -> None:
    cache = tmp_path / "device-cache"
    with serve_cdn(tmp_path, serve_profile, cdn) as daemon:
        chat = {"model": "b", "messages": CHAT, "max_tokens": 4, "temperature": 0}
        old = requests.post(f"{daemon.url}/v1/chat/completions", timeout=60, json=chat)
        assert old.status_code == 200
        next_version = tmp_path / "v2"
        next_version.mkdir()
        (next_version / "a.gguf").write_bytes((adapters_dir / "a.gguf").read_bytes())
        (next_version / "b.gguf").write_bytes((adapters_dir / "c.gguf").read_bytes())  # new content for b
        publish(next_version, tmp_path / "cdn", key=load_private_key(tmp_path / "signing.key"), allow_renamed=True)
        new_sha = hashlib.sha256((adapters_dir / "c.gguf").read_bytes()).hexdigest()

        report = requests.post(f"{daemon.url}/v1/sync?wait=true", timeout=60).json()

        assert (report["version"], report["updating"], report["withdrawn"]) == (2, ["b"], ["c"])
        assert report["adapters"]["b"] == new_sha and "c" not in report["adapters"]
        new = requests.post(f"{daemon.url}/v1/chat/completions", timeout=60, json=chat)
        assert new.headers["X-Edge-Adapters"] == f"b@{new_sha[:16]}:1" != old.headers["X-Edge-Adapters"]
        assert sorted(p.name for p in (cache / "blobs").iterdir()) == [f"{new_sha}.gguf"]
        assert (cache / "refs" / "b").read_text().split()[0] == new_sha  # then who verified it (issue 18 item 4)


def pull_then_evict_from_memory(daemon: Daemon, name: str) -> requests.Response:
    """A first request pulls ``name``; evicting it from memory leaves the daemon relying on its cached file."""
    response = requests.post(f"{daemon.url}/v1/chat/completions", timeout=60,
                             json={"model": name, "messages": CHAT, "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200, response.text
    assert requests.delete(f"{daemon.url}/v1/adapters/{name}", timeout=30).json()["state"] == "cached"
    return response


def test_a_cli_sync_on_a_daemons_cache_never_evicts_a_blob_the_daemon_serves(
        tmp_path: Path, serve_profile: Path, adapters_dir: Path, cdn: tuple[str, Path]) -> None:
    # Regression: `sync --cache-mb` in another process evicted the daemon's cached blob; requests then failed 400
    # "not a readable GGUF file" until a restart.
    cache, (url, public) = tmp_path / "device-cache", cdn
    sha = hashlib.sha256((adapters_dir / "a.gguf").read_bytes()).hexdigest()
    with serve_cdn(tmp_path, serve_profile, cdn) as daemon:
        first = pull_then_evict_from_memory(daemon, "a")
        budget_mb = (adapters_dir / "a.gguf").stat().st_size // (1 << 20) + 5  # room for one adapter, not two
        sync = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "sync", "--cdn", url, "--public-key",
                               str(public), "--adapters", "b", "--cache-dir", str(cache), "--cache-mb",
                               str(budget_mb)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "0", "EDGE_RT_HOME": str(tmp_path / "cli")})
        assert sync.returncode == 7 and "adapter_cache_mb" in sync.stderr, sync.stderr  # a is leased: no room
        assert (cache / "blobs" / f"{sha}.gguf").is_file()
        again = requests.post(f"{daemon.url}/v1/chat/completions", timeout=60,
                              json={"model": "a", "messages": CHAT, "max_tokens": 4, "temperature": 0})
        assert again.status_code == 200 and again.headers["X-Edge-Adapters"] == f"a@{sha[:16]}:1"
        assert again.json()["choices"] == first.json()["choices"]


def test_a_daemon_whose_cached_blob_vanished_pulls_it_again_on_the_next_request(
        tmp_path: Path, serve_profile: Path, adapters_dir: Path, cdn: tuple[str, Path]) -> None:
    cache = tmp_path / "device-cache"
    sha = hashlib.sha256((adapters_dir / "a.gguf").read_bytes()).hexdigest()
    with serve_cdn(tmp_path, serve_profile, cdn) as daemon:
        first = pull_then_evict_from_memory(daemon, "a")
        (cache / "blobs" / f"{sha}.gguf").unlink()  # an operator's rm, or a tool that ignores leases
        again = requests.post(f"{daemon.url}/v1/chat/completions", timeout=60,
                              json={"model": "a", "messages": CHAT, "max_tokens": 4, "temperature": 0})
        assert again.status_code == 200, again.text  # was 400 until a restart
        assert again.json()["choices"] == first.json()["choices"]
        assert hashlib.sha256((cache / "blobs" / f"{sha}.gguf").read_bytes()).hexdigest() == sha


def test_two_daemons_on_one_cache_an_update_in_one_never_drops_the_blob_the_other_serves(
        tmp_path: Path, serve_profile: Path, adapters_dir: Path, cdn: tuple[str, Path]) -> None:
    # Regression: the first daemon's update deleted the old blob the second daemon still relied on.
    cache = tmp_path / "device-cache"
    old_sha = hashlib.sha256((adapters_dir / "b.gguf").read_bytes()).hexdigest()
    new_sha = hashlib.sha256((adapters_dir / "c.gguf").read_bytes()).hexdigest()
    with serve_cdn(tmp_path, serve_profile, cdn, log="first") as first, \
            serve_cdn(tmp_path, serve_profile, cdn, log="second") as second:
        before = pull_then_evict_from_memory(second, "b")  # the second daemon relies on the cached old blob
        pull_then_evict_from_memory(first, "b")
        next_version = tmp_path / "v2"
        next_version.mkdir()
        shutil.copy(adapters_dir / "c.gguf", next_version / "b.gguf")  # new content for b
        publish(next_version, tmp_path / "cdn", key=load_private_key(tmp_path / "signing.key"), allow_renamed=True)

        report = requests.post(f"{first.url}/v1/sync?wait=true", timeout=120).json()
        assert (report["updating"], report["adapters"]["b"]) == (["b"], new_sha)
        assert (cache / "blobs" / f"{old_sha}.gguf").is_file()  # leased by the second daemon
        chat = {"model": "b", "messages": CHAT, "max_tokens": 4, "temperature": 0}
        still = requests.post(f"{second.url}/v1/chat/completions", timeout=60, json=chat)
        assert still.status_code == 200 and still.headers["X-Edge-Adapters"] == f"b@{old_sha[:16]}:1"
        assert still.json()["choices"] == before.json()["choices"]

        assert requests.post(f"{second.url}/v1/sync?wait=true", timeout=120).json()["adapters"]["b"] == new_sha
        assert sorted(p.name for p in (cache / "blobs").iterdir()) == [f"{new_sha}.gguf"]  # the last user let go


def _static_server(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            requests.get(f"{url}/manifest.json", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.05)
    return server, url


def _cli_sync(tmp_path: Path, url: str, cache: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_runtime.cli", "sync", "--cdn", url, "--all", "--cache-dir",
                           str(cache), *extra], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "0", "EDGE_RT_HOME": str(tmp_path / "cli")})


def test_a_key_pinned_daemon_serves_only_what_its_signed_manifest_lists_beside_an_unsigned_sync(
        tmp_path: Path, serve_profile: Path, adapters_dir: Path, cdn: tuple[str, Path]) -> None:
    # Issue 18 item 4: after `sync` from a signed and an unsigned CDN into one cache, `serve --public-key` served an
    # adapter only the unsigned manifest lists, and offline served the blob the signed manifest lists as c under a.
    cache, (url, public) = tmp_path / "device-cache", cdn
    sha = {name: hashlib.sha256((adapters_dir / f"{name}.gguf").read_bytes()).hexdigest() for name in "abc"}
    assert _cli_sync(tmp_path, url, cache, "--public-key", str(public)).returncode == 0
    unsigned_src = tmp_path / "unsigned-src"
    unsigned_src.mkdir()
    shutil.copy(adapters_dir / "c.gguf", unsigned_src / "a.gguf")  # "a" with other content
    shutil.copy(adapters_dir / "b.gguf", unsigned_src / "extra.gguf")  # a name the signed CDN never lists
    publish(unsigned_src, tmp_path / "unsigned-cdn", allow_renamed=True)
    server, unsigned_url = _static_server(tmp_path / "unsigned-cdn")
    try:
        synced = _cli_sync(tmp_path, unsigned_url, cache)
        assert synced.returncode == 0, synced.stderr
    finally:
        server.terminate()
        server.wait()
    assert (cache / "refs" / "a").read_text().split() == [sha["c"], f"url:{unsigned_url}"]  # who verified it

    chat = {"messages": CHAT, "max_tokens": 4, "temperature": 0}
    with serve_cdn(tmp_path, serve_profile, cdn) as daemon:
        names = [a["name"] for a in requests.get(f"{daemon.url}/v1/adapters", timeout=10).json()["data"]]
        assert sorted(names) == ["a", "b", "c"]
        extra = requests.post(f"{daemon.url}/v1/chat/completions", timeout=300, json={"model": "extra", **chat})
        assert extra.status_code == 404, extra.text
        served = requests.post(f"{daemon.url}/v1/chat/completions", timeout=300, json={"model": "a", **chat})
        assert served.status_code == 200 and served.headers["X-Edge-Adapters"] == f"a@{sha['a'][:16]}:1"
        assert "verified it, not this daemon's --public-key" in daemon.log_text()

    server, unsigned_url = _static_server(tmp_path / "unsigned-cdn")  # the unsigned sync again, daemon stopped
    try:
        assert _cli_sync(tmp_path, unsigned_url, cache).returncode == 0
    finally:
        server.terminate()
        server.wait()
    with serve_cdn(tmp_path, serve_profile, cdn, "--offline", log="offline") as daemon:
        a = requests.post(f"{daemon.url}/v1/chat/completions", timeout=300, json={"model": "a", **chat})
        assert (a.status_code, a.json()["error"]["type"]) == (503, "cache_miss"), a.text  # never c's blob as a
        assert "cached adapters: b, c" in a.json()["error"]["message"]  # what this daemon may serve
        b = requests.post(f"{daemon.url}/v1/chat/completions", timeout=300, json={"model": "b", **chat})
        assert b.status_code == 200 and b.headers["X-Edge-Adapters"] == f"b@{sha['b'][:16]}:1"


def _slow_profile(tmp_path: Path, profile: Path) -> Path:
    """``profile`` with downloads capped at 800 kbit/s: a 19.6 MB adapter takes minutes to pull."""
    slow = tmp_path / "slow-link.toml"
    slow.write_text(profile.read_text().replace("max_download_kbps = 0", "max_download_kbps = 800"))
    return slow


def _ask_while_pulling(daemon: Daemon, cache: Path, name: str) -> tuple[threading.Thread, dict[str, Any]]:
    """A request for ``name`` that waits for its pull, started and held until bytes of the pull are on disk."""
    outcome: dict[str, Any] = {}

    def ask() -> None:
        try:
            outcome["response"] = requests.post(f"{daemon.url}/v1/chat/completions", timeout=300,
                                                json={"model": name, "messages": CHAT, "max_tokens": 4})
        except requests.RequestException as exc:
            outcome["error"] = exc

    asker = threading.Thread(target=ask)
    asker.start()
    while not any(p.stat().st_size for p in (cache / "partial").glob("*.part")):
        time.sleep(0.05)
    return asker, outcome


def test_a_shutdown_during_a_pull_answers_503_with_the_reason_and_keeps_the_partial(
        tmp_path: Path, serve_profile: Path, adapters_dir: Path, cdn: tuple[str, Path]) -> None:
    # Issue 18 item 2: a request waiting for a download during shutdown got 200 with "" (or no answer), and the log
    # said "pull ... failed after 19.1 s: " with an empty reason.
    cache, size = tmp_path / "device-cache", (adapters_dir / "a.gguf").stat().st_size
    with serve_cdn(tmp_path, _slow_profile(tmp_path, serve_profile), cdn) as daemon:
        asker, outcome = _ask_while_pulling(daemon, cache, "a")
        status = requests.get(f"{daemon.url}/v1/status", timeout=60).json()  # item 20: the operator sees the wait
        [pulled] = [a for a in status["adapters"] if a["name"] == "a"]
        assert status["waiting_for_downloads"] == 1 and pulled["state"] == "downloading", status
        assert pulled["waiting_requests"] == 1 and "download_eta_s" in pulled and "download_bytes_per_second" in pulled
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=120) == 0
        asker.join(timeout=60)
    response = outcome["response"]
    error = response.json()["error"]
    assert (response.status_code, error["type"]) == (503, "server_shutting_down"), response.text
    assert "the download of adapter a was stopped" in error["message"]
    parts = list((cache / "partial").glob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < size  # kept for the resume
    log = daemon.log_text()
    assert re.search(r"pull of adapter a stopped after [\d.]+ s by the shutdown: [\d.]+ MB on disk", log), log[-2000:]
    assert "Traceback" not in log


def test_a_second_ctrl_c_during_a_pull_exits_without_a_traceback(
        tmp_path: Path, serve_profile: Path, adapters_dir: Path, cdn: tuple[str, Path]) -> None:
    cache = tmp_path / "device-cache"
    with serve_cdn(tmp_path, _slow_profile(tmp_path, serve_profile), cdn) as daemon:
        asker, _ = _ask_while_pulling(daemon, cache, "a")
        daemon.process.send_signal(signal.SIGINT)
        daemon.process.send_signal(signal.SIGINT)
        assert daemon.process.wait(timeout=120) == 0
        asker.join(timeout=60)
    assert "Traceback" not in daemon.log_text(), daemon.log_text()[-3000:]
    assert len(list((cache / "partial").glob("*.part"))) == 1


_HOLD_LOCK = """
import sys
from pathlib import Path
from edge_runtime.distribution.store import AdapterStore
with AdapterStore(Path(sys.argv[1])).locked():
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_daemon_waiting_for_a_stopped_cache_gc_names_it_and_exits_on_sigterm(
        tmp_path: Path, serve_profile: Path, cdn: tuple[str, Path]) -> None:
    # Issue 18 item 3: a `cache gc` stopped with Ctrl-Z blocked a daemon's start for ever, and on SIGTERM the daemon
    # said "stopped" but stayed alive inside flock.
    url, public = cdn
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "device-cache")], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        holder.send_signal(signal.SIGSTOP)
        log = tmp_path / "waiting.log"
        with log.open("wb") as sink:
            daemon = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--port", str(free_port()),
                                       "--profile", str(serve_profile), "--cdn", url, "--public-key", str(public),
                                       "--cache-dir", str(tmp_path / "device-cache")], stdout=sink,
                                      stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "0"})
        while f"held by process {holder.pid}" not in log.read_text(errors="replace"):
            assert daemon.poll() is None, log.read_text()
            time.sleep(0.1)
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=120)
        finally:
            if daemon.poll() is None:
                daemon.kill()
        text = log.read_text(errors="replace")
        assert daemon.returncode != -9 and "Traceback" not in text, text[-3000:]
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.communicate("", timeout=30)


def test_a_request_whose_deadline_passes_during_its_adapters_download_is_a_504_and_the_download_goes_on(
        tmp_path: Path, serve_profile: Path, cdn: tuple[str, Path]) -> None:
    # From a new user's walk: --request-timeout 3 and a request for a remote adapter on a slow link waited the
    # whole download (104 s), then got a 504 blaming the generation.
    cache = tmp_path / "device-cache"
    with serve_cdn(tmp_path, _slow_profile(tmp_path, serve_profile), cdn, "--request-timeout", "2") as daemon:
        response = requests.post(f"{daemon.url}/v1/chat/completions", timeout=120,
                                 json={"model": "a", "messages": CHAT, "max_tokens": 4})
        error = response.json()["error"]
        assert (response.status_code, error["type"]) == (504, "timeout"), response.text
        assert "while adapter a was still downloading; the download goes on" in error["message"]
        status = requests.get(f"{daemon.url}/v1/status", timeout=60).json()
        [pulled] = [a for a in status["adapters"] if a["name"] == "a"]
        assert pulled["state"] == "downloading" and status["waiting_for_downloads"] == 0  # it goes on, unwaited
        metrics = requests.get(f"{daemon.url}/metrics", timeout=60).text
        assert 'edge_rt_requests_total{adapter="a",status="504"} 1.0' in metrics
    assert any(p.stat().st_size for p in (cache / "partial").glob("*.part"))
