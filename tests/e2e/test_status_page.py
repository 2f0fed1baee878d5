"""The operator's view of a running daemon: its status page in a real headless Chromium, and `edge-rt status`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from daemons import Daemon, require_tool, run_daemon

CHAT = [{"role": "user", "content": "Name a colour."}]


def chromium() -> str:
    return require_tool(("chromium", "chromium-browser"), "chromium")


def browse(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           *extra, url], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def busy_daemon(tmp_path_factory: pytest.TempPathFactory, adapters_dir: Path, serve_profile: Path) -> Daemon:
    log = tmp_path_factory.mktemp("status") / "serve.log"
    with run_daemon("--profile", str(serve_profile), "--adapters-dir", str(adapters_dir), "--preload", "a",
                    log=log) as daemon:
        answered = requests.post(f"{daemon.url}/v1/chat/completions", timeout=60,
                                 json={"model": "b", "messages": CHAT, "max_tokens": 3, "temperature": 0})
        assert answered.status_code == 200
        requests.post(f"{daemon.url}/v1/chat/completions", timeout=60, json={"model": "nope", "messages": CHAT})
        yield daemon


def test_the_status_page_shows_every_adapter_with_its_state_in_a_real_browser(busy_daemon: Daemon,
                                                                             tmp_path: Path) -> None:
    rendered = browse(f"{busy_daemon.url}/", "--dump-dom")
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    dom = rendered.stdout
    states = dict(re.findall(r'data-adapter="([^"]+)" data-state="([^"]+)"', dom))
    assert states == {"a": "resident", "b": "resident", "c": "cached"}
    assert "Memory budget" in dom and "base model" in dom and "/v1/chat/completions" in dom  # recent requests
    assert re.search(r"<td>404</td><td>nope</td>", dom)  # the rejected request is listed too, with what it asked
    shot = tmp_path / "status-page.png"
    taken = browse(f"{busy_daemon.url}/", f"--screenshot={shot}", "--window-size=1200,800", "--hide-scrollbars")
    assert taken.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("EDGE_RT_SCREENSHOT"):  # refresh the README's picture: EDGE_RT_SCREENSHOT=path
        shutil.copy(shot, os.environ["EDGE_RT_SCREENSHOT"])


def test_edge_rt_status_prints_the_same_facts(busy_daemon: Daemon) -> None:
    command = [sys.executable, "-m", "edge_runtime.cli", "status", "--url", busy_daemon.url]
    as_json = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(as_json.stdout)
    assert {a["name"]: a["state"] for a in report["adapters"]} == {"a": "resident", "b": "resident", "c": "cached"}
    assert report["plan"]["budget_bytes"] == 1024 << 20 and report["rss_bytes"] > report["plan"]["model_bytes"]
    assert [(r["status"], r["ran"]) for r in report["recent"]][-2:] == [(404, "-"), (200, report["recent"][-1]["ran"])]
    table = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    assert re.search(r"^  a\s+resident", table, re.M) and re.search(r"^  c\s+cached", table, re.M)
    assert "measured RSS" in table and "recent requests (" in table
    compute = report["compute"]
    assert compute["threads"] >= 1 and compute["usable_cores"] >= compute["threads"]
    assert compute["decode_tokens_per_second"] > 0  # the busy daemon has answered completions
    # the test profile keeps an f16 KV cache: its thread count is fixed, and the status says why
    assert compute["running_threads"] == compute["threads"] and compute["thread_changes"] == 0
    assert compute["thread_policy"].startswith(
        "fixed (an f16 KV cache makes answers depend on the thread count" if compute["threads"] > 1 else "one thread")
    assert f"compute: {compute['threads']} thread" in table and f"usable cores {compute['cores']}, decode " in table


def test_the_page_and_status_are_behind_the_api_key(tmp_path: Path, serve_profile: Path) -> None:
    with run_daemon("--profile", str(serve_profile), "--api-key", "sesame", log=tmp_path / "log") as daemon:
        assert requests.get(f"{daemon.url}/", timeout=10).status_code == 401
        assert requests.get(f"{daemon.url}/", headers={"Authorization": "Bearer sesame"}, timeout=10).ok
        refused = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "status", "--url", daemon.url],
                                 capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 8 and "pass --api-key" in refused.stderr.lower()
        allowed = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "status", "--url", daemon.url,
                                  "--api-key", "sesame"], capture_output=True, text=True, timeout=60, check=False)
        assert allowed.returncode == 0 and "measured RSS" in allowed.stdout
