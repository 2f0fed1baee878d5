"""Daemon behaviour under pressure: API keys, a full queue, budgets, disconnects, concurrency and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import requests
from daemons import Daemon, metric, run_daemon

from edge_runtime.profiles import load_profile
from edge_runtime.runtime.budget import adapter_resident_bytes
from edge_runtime.runtime.plan import plan_for

CHAT = [{"role": "user", "content": "Write a long story about a drone."}]
MIB = 1 << 20


def test_api_key_is_required_when_set(tmp_path: Path, serve_profile: Path) -> None:
    with run_daemon("--profile", str(serve_profile), "--api-key", "s3cret", log=tmp_path / "log") as daemon:
        body = {"prompt": "Hi", "max_tokens": 2}
        missing = requests.post(f"{daemon.url}/v1/completions", json=body, timeout=30)
        wrong = requests.post(f"{daemon.url}/v1/completions", json=body, timeout=30,
                              headers={"Authorization": "Bearer nope"})
        right = requests.post(f"{daemon.url}/v1/completions", json=body, timeout=30,
                              headers={"Authorization": "Bearer s3cret"})
        assert missing.status_code == wrong.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        assert right.status_code == 200
        assert requests.get(f"{daemon.url}/health", timeout=10).status_code == 200


def test_full_queue_answers_503_with_retry_after(tmp_path: Path, serve_profile: Path) -> None:
    # Connections enough for the flood: here the queue, not the connection bound (tests/e2e/test_connections.py),
    # answers 503.
    with run_daemon("--profile", str(serve_profile), "--max-queue", "1", "--max-connections", "32",
                    log=tmp_path / "log") as daemon:
        statuses, retry_after = asyncio.run(_flood(daemon.url, 6))
        assert statuses.count(200) >= 1
        assert statuses.count(503) >= 1
        assert retry_after == "1"
        assert metric(daemon, "edge_rt_requests_total", status="503") == statuses.count(503)
        assert requests.post(f"{daemon.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                             timeout=30).status_code == 200


async def _flood(url: str, count: int) -> tuple[list[int], str | None]:
    async with aiohttp.ClientSession() as session:
        async def one() -> tuple[int, str | None]:
            body = {"messages": CHAT, "max_tokens": 64, "temperature": 0}
            async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                await response.read()
                return response.status, response.headers.get("Retry-After")

        results = await asyncio.gather(*(one() for _ in range(count)))
    return [s for s, _ in results], next((r for _, r in results if r), None)


def test_adapter_that_cannot_fit_is_507_and_the_base_still_serves(tmp_path: Path, base_model: Path,
                                                                  adapters_dir: Path,
                                                                  make_profile: Callable[..., Path]) -> None:
    sizing = plan_for(load_profile(str(make_profile("sizing-507", budget_mb=4096, ctx=1024))), base_model)
    adapter = adapter_resident_bytes(adapters_dir / "a.gguf")
    budget_mb = (sizing.fixed_bytes + adapter // 2) // MIB + 1  # room for half an adapter
    profile = make_profile("tiny-507", budget_mb=budget_mb, ctx=1024)
    with run_daemon("--profile", str(profile), "--adapters-dir", str(adapters_dir), log=tmp_path / "log") as daemon:
        body = {"messages": CHAT, "max_tokens": 4, "temperature": 0}
        refused = requests.post(f"{daemon.url}/v1/chat/completions", json=body | {"model": "a"}, timeout=30)
        assert refused.status_code == 507
        assert refused.json()["error"]["type"] == "budget_exceeded"
        assert requests.post(f"{daemon.url}/v1/chat/completions", json=body, timeout=30).status_code == 200


def test_client_disconnect_cancels_its_generation(daemon: Daemon) -> None:
    decoded_before = metric(daemon, "edge_rt_tokens_decoded_total")
    cancelled_before = metric(daemon, "edge_rt_generations_cancelled_total")
    with socket.create_connection(("127.0.0.1", int(daemon.url.rsplit(":", 1)[1])), timeout=30) as raw:
        body = b'{"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 900, ' \
               b'"temperature": 0, "stream": true}'
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while b"data: " not in received:  # streaming has started (headers and events may come apart)
            chunk = raw.recv(65536)
            assert chunk, f"the daemon closed the stream early: {received!r}"
            received += chunk
    deadline = time.monotonic() + 10
    while metric(daemon, "edge_rt_generations_cancelled_total") == cancelled_before:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
    decoded = metric(daemon, "edge_rt_tokens_decoded_total") - decoded_before
    assert decoded < 200  # far from the 900 asked for: it stopped when the client left


def test_a_client_gone_before_its_answer_is_counted_as_499_not_500(daemon: Daemon) -> None:
    before = metric(daemon, "edge_rt_requests_total", status="499")
    errors_before = metric(daemon, "edge_rt_requests_total", status="500")
    generated_before = metric(daemon, "edge_rt_tokens_generated_total")
    with socket.create_connection(("127.0.0.1", int(daemon.url.rsplit(":", 1)[1]))) as raw:
        body = b'{"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 900}'
        decoded = metric(daemon, "edge_rt_tokens_decoded_total")
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 10
        while metric(daemon, "edge_rt_tokens_decoded_total") == decoded:  # wait until it generates (not streamed)
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while metric(daemon, "edge_rt_requests_total", status="499") == before:
        assert time.monotonic() < deadline, "the abandoned request was not counted"
        time.sleep(0.05)
    assert metric(daemon, "edge_rt_requests_total", status="499") == before + 1
    assert metric(daemon, "edge_rt_requests_total", status="500") == errors_before
    # What it generated before the client left is logged and counted, as for an answered request.
    line = [line for line in daemon.log_text().splitlines() if "status=499" in line][-1]
    logged = int(re.search(r"completion=(\d+)", line)[1])  # type: ignore[index]
    assert 0 < logged == metric(daemon, "edge_rt_tokens_generated_total") - generated_before, line


def test_concurrent_clients_on_different_adapters_get_their_own_answers(daemon: Daemon) -> None:
    specs = ["a", "b", "c", "base", "a", "c", "b", "base"]
    solo = {name: _chat(daemon.url, name) for name in set(specs)}

    async def all_at_once() -> list[str]:
        async with aiohttp.ClientSession() as session:
            async def one(name: str) -> str:
                body = {"model": name, "messages": [{"role": "user", "content": "Name a colour."}],
                        "max_tokens": 10, "temperature": 0}
                async with session.post(f"{daemon.url}/v1/chat/completions", json=body) as response:
                    assert response.status == 200
                    payload = await response.json()
                    return str(payload["choices"][0]["message"]["content"])

            return await asyncio.gather(*(one(name) for name in specs))

    assert asyncio.run(all_at_once()) == [solo[name] for name in specs]


def test_sigterm_stops_accepting_finishes_and_exits_zero(tmp_path: Path, serve_profile: Path) -> None:
    with run_daemon("--profile", str(serve_profile), log=tmp_path / "log") as daemon:
        streaming = requests.post(f"{daemon.url}/v1/completions", stream=True, timeout=30,
                                  json={"prompt": "Once upon a time", "max_tokens": 400, "stream": True})
        lines = streaming.iter_lines()  # kept: a dropped line iterator closes the connection
        next(lines)
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=20) == 0
        assert time.monotonic() - started < 15
        streaming.close()
        try:
            requests.get(f"{daemon.url}/health", timeout=2)
            raise AssertionError("the daemon still answers after SIGTERM")
        except requests.ConnectionError:
            pass


def test_sigterm_answers_queued_requests_503_and_lets_the_running_one_end(tmp_path: Path,
                                                                          serve_profile: Path) -> None:
    with run_daemon("--profile", str(serve_profile), "--max-queue", "4", log=tmp_path / "log") as daemon:
        counting = ", ".join(str(n) for n in range(1, 30))  # it goes on counting: no early end of text
        running = requests.post(f"{daemon.url}/v1/completions", stream=True, timeout=30,
                                json={"prompt": counting, "max_tokens": 900, "stream": True, "temperature": 0})
        lines = running.iter_lines()  # kept: a dropped line iterator closes the connection
        next(lines)  # generating now

        async def queue_two_then_stop() -> list[tuple[int, str]]:
            async with aiohttp.ClientSession() as session:
                async def one() -> tuple[int, str]:
                    body = {"prompt": "Hello", "max_tokens": 8}
                    async with session.post(f"{daemon.url}/v1/completions", json=body) as response:
                        return response.status, (await response.json())["error"]["type"]

                waiting = [asyncio.ensure_future(one()) for _ in range(2)]
                deadline = time.monotonic() + 10
                while True:
                    async with session.get(f"{daemon.url}/health") as health:
                        if (await health.json())["queued"] == 2:
                            break
                    assert time.monotonic() < deadline, "the requests never queued"
                    await asyncio.sleep(0.02)
                daemon.process.send_signal(signal.SIGTERM)
                return list(await asyncio.gather(*waiting))

        assert asyncio.run(queue_two_then_stop()) == [(503, "server_shutting_down")] * 2
        assert daemon.process.wait(timeout=20) == 0
        rest = [line for line in lines if line]  # ends cleanly: a final chunk and [DONE], not a cut connection
        events = [json.loads(line[6:]) for line in rest if line.startswith(b"data: {")]
        assert rest[-1] == b"data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "stop"
        assert len(events) < 899  # stopped after the grace period, far from the 900 tokens asked for
        running.close()
        log = daemon.log_text()  # the operator reads what happened and how it ended
        assert "shutting down: 2 queued requests answered 503; 1 running generation gets 4 s to finish" in log
        stopped = re.search(r"edge-rt: stopped after \d+ s, (\d+) tokens generated\n$", log)
        assert stopped is not None and abs(int(stopped[1]) - len(events)) <= 2, log[-400:]


def test_a_bad_file_in_the_adapters_dir_is_reported_and_the_others_are_served(tmp_path: Path, serve_profile: Path,
                                                                               adapters_dir: Path) -> None:
    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "good.gguf").write_bytes((adapters_dir / "a.gguf").read_bytes())
    (folder / "broken.gguf").write_bytes(b"GGUF but not really")
    with run_daemon("--profile", str(serve_profile), "--adapters-dir", str(folder), log=tmp_path / "log") as daemon:
        names = [a["name"] for a in requests.get(f"{daemon.url}/v1/adapters", timeout=10).json()["data"]]
        assert names == ["good"]
        assert f"not serving {folder / 'broken.gguf'}" in daemon.log_text()
        ok = requests.post(f"{daemon.url}/v1/completions", json={"model": "good", "prompt": "Hi", "max_tokens": 2},
                           timeout=30)
        assert ok.status_code == 200


def test_non_loopback_bind_without_api_key_is_refused() -> None:
    completed = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "serve", "--host", "0.0.0.0"],
                               capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 2
    assert "refusing to bind 0.0.0.0 without --api-key" in completed.stderr


def _chat(url: str, name: str) -> str:
    body = {"model": name, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 10,
            "temperature": 0}
    response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def test_preload_makes_adapters_resident_at_start(tmp_path: Path, serve_profile: Path, adapters_dir: Path) -> None:
    with run_daemon("--profile", str(serve_profile), "--adapters-dir", str(adapters_dir), "--preload", "a,c",
                    log=tmp_path / "log") as daemon:
        states = {a["name"]: a["state"] for a in requests.get(f"{daemon.url}/v1/adapters", timeout=10).json()["data"]}
        assert states == {"a": "resident", "b": "cached", "c": "resident"}
        # The banner comes once everything is registered and preloaded, and counts every adapter served.
        assert f"on {daemon.url} with 3 adapters (2 resident, 1 cached)" in daemon.log_text()
        requests.get(f"{daemon.url}/v1/models", timeout=10)
        line = next(ln for ln in daemon.log_text().splitlines() if "GET /v1/models status=200" in ln)
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ", line), line  # timestamped


def serve_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_runtime.cli", "serve", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_a_port_in_use_is_one_clear_line_before_anything_is_loaded() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        completed = serve_cli("--port", str(port))
    assert completed.returncode == 10, completed.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}" in completed.stderr and "pass another --port" in \
        completed.stderr
    assert "Traceback" not in completed.stderr and "serving" not in completed.stderr


def test_options_that_cannot_take_effect_are_refused(tmp_path: Path) -> None:
    missing = serve_cli("--adapters-dir", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr  # a typo used to serve 0 adapters
    (tmp_path / "key.pub").write_text("x")
    lone_key = serve_cli("--public-key", str(tmp_path / "key.pub"))
    assert lone_key.returncode == 2 and "--public-key only applies with --cdn URL" in lone_key.stderr


def test_new_files_in_the_adapters_dir_are_picked_up_by_load_and_by_sighup(tmp_path: Path, serve_profile: Path,
                                                                          adapters_dir: Path) -> None:
    folder = tmp_path / "adapters"
    folder.mkdir()
    shutil.copy(adapters_dir / "a.gguf", folder / "a.gguf")
    with run_daemon("--profile", str(serve_profile), "--adapters-dir", str(folder), log=tmp_path / "log") as daemon:
        shutil.copy(adapters_dir / "b.gguf", folder / "b.gguf")  # dropped in while serving
        loaded = requests.post(f"{daemon.url}/v1/adapters/b/load", timeout=60)
        assert loaded.status_code == 200 and loaded.json()["state"] == "resident"  # was 404 until a restart
        shutil.copy(adapters_dir / "c.gguf", folder / "c.gguf")
        daemon.process.send_signal(signal.SIGHUP)
        for _ in range(100):
            names = [a["name"] for a in requests.get(f"{daemon.url}/v1/adapters", timeout=10).json()["data"]]
            if "c" in names:
                break
            time.sleep(0.05)
        assert names == ["a", "b", "c"] and daemon.process.poll() is None  # SIGHUP rescans, it does not stop
        (folder / "c.gguf").unlink()  # deleted while idle: forgotten at the next rescan (b is resident: kept)
        (folder / "b.gguf").unlink()
        daemon.process.send_signal(signal.SIGHUP)
        for _ in range(100):
            names = [a["name"] for a in requests.get(f"{daemon.url}/v1/adapters", timeout=10).json()["data"]]
            if "c" not in names:
                break
            time.sleep(0.05)
        assert names == ["a", "b"]


def test_vllm_load_and_unload_routes(tmp_path: Path, serve_profile: Path, adapters_dir: Path) -> None:
    with run_daemon("--profile", str(serve_profile), "--adapters-dir", str(adapters_dir),
                    log=tmp_path / "log") as daemon:
        body = {"lora_name": "a", "lora_path": str(adapters_dir / "a.gguf")}
        loaded = requests.post(f"{daemon.url}/v1/load_lora_adapter", json=body, timeout=60)
        assert loaded.status_code == 200 and loaded.json()["state"] == "resident"
        elsewhere = requests.post(f"{daemon.url}/v1/load_lora_adapter", timeout=60,
                                  json={"lora_name": "a", "lora_path": "/etc/passwd"})
        assert elsewhere.status_code == 400 and elsewhere.json()["error"]["param"] == "lora_path"
        unloaded = requests.post(f"{daemon.url}/v1/unload_lora_adapter", json={"lora_name": "a"}, timeout=60)
        assert unloaded.status_code == 200
        assert (unloaded.json()["evicted"], unloaded.json()["state"]) == (True, "cached")
        missing = requests.post(f"{daemon.url}/v1/unload_lora_adapter", json={"lora_name": "zz"}, timeout=60)
        assert missing.status_code == 404


def test_a_second_sigterm_during_the_graceful_shutdown_stops_at_once_and_says_so(tmp_path: Path,
                                                                                 serve_profile: Path) -> None:
    with run_daemon("--profile", str(serve_profile), log=tmp_path / "log") as daemon:
        counting = ", ".join(str(n) for n in range(1, 30))
        running = requests.post(f"{daemon.url}/v1/completions", stream=True, timeout=30,
                                json={"prompt": counting, "max_tokens": 900, "stream": True, "temperature": 0})
        lines = running.iter_lines()
        next(lines)  # generating now: the first SIGTERM gives it 4 s
        daemon.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=20) == 0
        rest = []
        try:
            rest = list(lines)
        except requests.exceptions.RequestException:  # the connection was cut mid-stream: what "at once" means
            pass
        running.close()
        # Not the graceful path (which ends the stream with finish_reason "cancelled" and [DONE] after its 4 s):
        # the second signal cut the answer.
        assert not any(b"[DONE]" in line or b'"cancelled"' in line for line in rest), rest[-3:]
        log = daemon.log_text()
        assert "a second signal during the graceful shutdown: stopping now, running requests are cut" in log
        assert re.search(r"edge-rt: stopped after \d+ s, \d+ tokens generated\n$", log), log[-400:]


def test_a_client_leaving_a_batch_mid_stream_frees_its_sequence_and_the_others_answers_stay(
        tmp_path: Path, serve_profile: Path, adapters_dir: Path) -> None:
    # Issue 19: four streams decode together (--parallel 4); one client drops its connection after its first event.
    # Its sequence is freed and the three others' streamed answers are those each gets alone.
    with run_daemon("--profile", str(serve_profile), "--adapters-dir", str(adapters_dir), "--parallel", "4",
                    log=tmp_path / "log") as daemon:
        specs = [("base", "Name three rivers."), ("a", "Describe a drone."), ("base", "Write a haiku about salt.")]
        solo = [asyncio.run(_one_stream(daemon.url, model, text)) for model, text in specs]
        assert metric(daemon, "edge_rt_parallel_sequences") == 4
        cancelled = metric(daemon, "edge_rt_generations_cancelled_total")
        decoded = metric(daemon, "edge_rt_tokens_decoded_total")

        async def together() -> list[tuple[str, int]]:
            async with aiohttp.ClientSession() as session:
                async def leaver() -> tuple[str, int]:
                    body = {"messages": CHAT, "max_tokens": 900, "temperature": 0, "stream": True}
                    async with session.post(f"{daemon.url}/v1/chat/completions", json=body) as response:
                        async for line in response.content:
                            if line.startswith(b"data: {"):
                                break
                        response.close()  # the client goes away mid-stream
                    return "", 0

                return list(await asyncio.gather(leaver(), *(_one_stream(daemon.url, m, t, session)
                                                             for m, t in specs)))

        results = asyncio.run(together())
        assert results[1:] == solo
        running = metric(daemon, "edge_rt_running_sequences")
        deadline = time.monotonic() + 600  # a guard against a hang only
        while metric(daemon, "edge_rt_generations_cancelled_total") == cancelled or running:
            assert time.monotonic() < deadline, "the leaver's sequence was never freed"
            time.sleep(0.05)
            running = metric(daemon, "edge_rt_running_sequences")
        assert metric(daemon, "edge_rt_generations_cancelled_total") == cancelled + 1
        left = metric(daemon, "edge_rt_tokens_decoded_total") - decoded - sum(tokens for _, tokens in solo)
        assert 1 <= left < 900  # it stopped when the client left, far from the 900 tokens asked for
        assert asyncio.run(_one_stream(daemon.url, *specs[1])) == solo[1]  # and the daemon serves on


async def _one_stream(url: str, model: str, text: str,
                      session: aiohttp.ClientSession | None = None) -> tuple[str, int]:
    """A greedy streamed chat answer's text and its completion tokens (from the usage chunk)."""
    if session is None:
        async with aiohttp.ClientSession() as own:
            return await _one_stream(url, model, text, own)
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 24, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    pieces, tokens = [], 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                pieces += [c["delta"].get("content") or "" for c in event["choices"]]
                tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    return "".join(pieces), tokens
