"""A fleet's CDN origin is nginx, not a Python test server: publish into it, sync and serve from it."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from daemons import run_daemon
from nginx import Nginx, run_nginx

from edge_runtime.distribution.keys import generate_key

CHAT = [{"role": "user", "content": "Name a colour."}]


def publish_cli(source: Path, origin: Nginx, key: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "publish", str(source), "--out",
                           str(origin.root), "--key", str(key), "--allow-renamed"],  # a, b, c: renamed copies
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def sync_cli(origin: Nginx, public: Path, cache: Path, name: str) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "EDGE_RT_HOME": str(cache.parent / "home")}
    return subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "sync", "--cdn", origin.url, "--public-key",
                             str(public), "--adapters", name, "--cache-dir", str(cache)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def blob_requests(origin: Nginx) -> list[list[str]]:
    return [entry for entry in origin.log() if entry[1].startswith("/blobs/")]


def test_a_published_folder_is_readable_by_an_nginx_running_as_another_user(tmp_path: Path,
                                                                            adapters_dir: Path) -> None:
    key, public = generate_key(tmp_path / "signing.key")
    with run_nginx() as origin:
        publish_cli(adapters_dir, origin, key)  # its workers run as nobody: 0600 files were answered 403
        sync = sync_cli(origin, public, tmp_path / "cache", "a")
        out, err = sync.communicate(timeout=120)
        assert sync.returncode == 0, err
        sha = hashlib.sha256((adapters_dir / "a.gguf").read_bytes()).hexdigest()
        assert (tmp_path / "cache" / "blobs" / f"{sha}.gguf").read_bytes() == (adapters_dir / "a.gguf").read_bytes()
        statuses = {(entry[1], entry[2]) for entry in origin.log() if entry[1] != "/"}  # "/": the readiness probe
        assert statuses == {("/manifest.json", "200"), (f"/blobs/{sha}.gguf", "200")}


def test_a_sync_killed_halfway_resumes_from_nginx_with_range_and_if_range(tmp_path: Path,
                                                                          adapters_dir: Path) -> None:
    key, public = generate_key(tmp_path / "signing.key")
    size = (adapters_dir / "a.gguf").stat().st_size
    with run_nginx(limit_rate="4m") as origin:  # ~5 s for the 19.5 MB adapter
        publish_cli(adapters_dir, origin, key)
        cache = tmp_path / "cache"
        first = sync_cli(origin, public, cache, "a")
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size >= size // 3 for p in (cache / "partial").glob("*.part")) \
                if (cache / "partial").exists() else True:
            assert time.monotonic() < deadline and first.poll() is None, "the first sync never got a third in"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.communicate()
        second = sync_cli(origin, public, cache, "a")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0, err
        cut, resumed = blob_requests(origin)[-2:]
    assert resumed[2] == "206" and resumed[4].startswith("bytes=") and resumed[5] not in ("", "-")
    assert int(cut[3]) + int(resumed[3]) <= size * 1.05  # nothing fetched twice but the bytes lost in the kill
    sha = hashlib.sha256((adapters_dir / "a.gguf").read_bytes()).hexdigest()
    assert hashlib.sha256((cache / "blobs" / f"{sha}.gguf").read_bytes()).hexdigest() == sha


def test_a_daemon_refreshes_with_304_and_takes_a_version_republished_into_nginx(
        tmp_path: Path, serve_profile: Path, adapters_dir: Path) -> None:
    key, public = generate_key(tmp_path / "signing.key")
    with run_nginx() as origin:
        publish_cli(adapters_dir, origin, key)
        with run_daemon("--profile", str(serve_profile), "--cdn", origin.url, "--public-key", str(public),
                        "--cache-dir", str(tmp_path / "device-cache"), log=tmp_path / "log",
                        env={"HF_HUB_OFFLINE": "0"}) as daemon:
            chat = {"model": "b", "messages": CHAT, "max_tokens": 4, "temperature": 0}
            old = requests.post(f"{daemon.url}/v1/chat/completions", timeout=60, json=chat)
            assert old.status_code == 200, old.text
            assert requests.post(f"{daemon.url}/v1/sync", timeout=30).json()["version"] == 1
            refreshes = [entry for entry in origin.log() if entry[1] == "/manifest.json"]
            assert refreshes[-1][2] == "304" and refreshes[-1][6] not in ("", "-")  # If-None-Match, nginx's ETag

            next_version = tmp_path / "v2"
            next_version.mkdir()
            shutil.copy(adapters_dir / "a.gguf", next_version / "a.gguf")
            shutil.copy(adapters_dir / "c.gguf", next_version / "b.gguf")  # new content for b
            publish_cli(next_version, origin, key)
            report = requests.post(f"{daemon.url}/v1/sync?wait=true", timeout=120).json()
            new_sha = hashlib.sha256((adapters_dir / "c.gguf").read_bytes()).hexdigest()
            assert (report["version"], report["updating"], report["adapters"]["b"]) == (2, ["b"], new_sha)
            new = requests.post(f"{daemon.url}/v1/chat/completions", timeout=60, json=chat)
            assert new.headers["X-Edge-Adapters"] == f"b@{new_sha[:16]}:1"
