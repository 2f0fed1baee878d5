"""The daemon's request handling in process (aiohttp's test server on 127.0.0.1, the real runtime)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.profiles import load_profile
from edge_runtime.runtime.core import Runtime
from edge_runtime.serve.app import create_app
from edge_runtime.serve.state import ServerConfig


@pytest.fixture
def runtime(in_process_profile: Callable[[str], Path]) -> Iterator[Runtime]:
    rt = Runtime(load_profile(str(in_process_profile("app-test"))), ctx=512)
    yield rt
    rt.close()


@pytest.mark.asyncio
async def test_a_prompt_too_long_by_its_bytes_alone_is_refused_without_tokenizing(
        aiohttp_client: Any, runtime_with: Callable[..., Runtime]) -> None:
    runtime = runtime_with(max_body_bytes=4 << 20)
    tokenized: list[int] = []
    real_tokenize = runtime.engine.tokenize

    def counting_tokenize(text: str, **kwargs: Any) -> list[int]:  # the real tokenizer, counted
        tokenized.append(len(text))
        return real_tokenize(text, **kwargs)

    runtime.engine.tokenize = counting_tokenize  # type: ignore[method-assign]
    client = await aiohttp_client(create_app(ServerConfig(), runtime))
    limit = 512 * runtime.engine.max_token_bytes  # no 512-token prompt can hold more bytes than this

    response = await client.post("/v1/completions", json={"prompt": "x" * (limit + 1), "max_tokens": 1})
    error = (await response.json())["error"]
    assert response.status == 400 and error["type"] == "context_length_exceeded"
    assert f"{limit + 1} bytes (at least 513 tokens)" in error["message"] and tokenized == []

    response = await client.post("/v1/completions", json={"prompt": "word " * 600, "max_tokens": 1})
    assert response.status == 400 and "bytes" not in (await response.json())["error"]["message"]
    assert tokenized == [3000]  # short enough in bytes to need its tokens counted


def test_the_longest_token_bounds_how_many_bytes_a_token_covers(runtime: Runtime) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 50 + "\n" + " " * 300 + "=" * 200
    tokens = runtime.engine.tokenize(text, add_bos=False)
    assert runtime.engine.min_tokens(len(text.encode())) <= len(tokens)
    pieces = [len(runtime.engine.detokenize([t]).encode()) for t in tokens]
    assert max(pieces) <= runtime.engine.max_token_bytes


@pytest.mark.asyncio
async def test_an_authorization_header_that_is_not_utf8_is_a_401_not_a_500(aiohttp_client: Any,
                                                                           runtime: Runtime) -> None:
    import asyncio

    client = await aiohttp_client(create_app(ServerConfig(api_key="secret"), runtime))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\xfd\r\n"
                 b"Connection: close\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401") and b"authentication_error" in answer
    ok = await client.get("/v1/models", headers={"Authorization": "Bearer secret"})
    assert ok.status == 200


@pytest.mark.asyncio
async def test_errors_sent_to_clients_name_files_never_server_paths(aiohttp_client: Any, runtime: Runtime,
                                                                    adapter_files: list[Path], tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "deep" / "server" / "layout" / "broken.gguf"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(adapter_files[0].read_bytes())
    runtime.adapters.add("broken", broken)
    broken.write_bytes(b"GGUF\x03")  # damaged on disk after it was registered
    client = await aiohttp_client(create_app(ServerConfig(), runtime))
    with caplog.at_level("INFO", logger="edge_runtime.serve.app"):
        response = await client.post("/v1/completions", json={"prompt": "Hi", "model": "broken", "max_tokens": 1})
    message = (await response.json())["error"]["message"]
    assert response.status == 400 and "broken.gguf" in message and str(tmp_path) not in message
    assert str(broken) in caplog.text  # the operator still sees where


@pytest.mark.asyncio
async def test_a_client_that_stalls_its_body_is_answered_408_and_disconnected(aiohttp_client: Any,
                                                                              runtime: Runtime) -> None:
    import asyncio

    client = await aiohttp_client(create_app(ServerConfig(body_timeout_s=0.5), runtime))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # then nothing more
    await writer.drain()
    assert (await client.get("/health")).status == 200  # others are served meanwhile
    answer = await asyncio.wait_for(reader.read(), timeout=10)  # read() returns at EOF: the server closed
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer


@pytest.mark.asyncio
async def test_every_request_is_logged_and_counted_rejected_ones_too(
        aiohttp_client: Any, runtime_with: Callable[..., Runtime], caplog: pytest.LogCaptureFixture) -> None:
    runtime = runtime_with(max_body_bytes=2048)
    client = await aiohttp_client(create_app(ServerConfig(), runtime))
    with caplog.at_level("INFO", logger="edge_runtime.serve.app"):
        unknown = await client.post("/v1/completions", json={"prompt": "Hi", "model": "gpt-4", "max_tokens": 1})
        too_big = await client.post("/v1/completions", json={"prompt": "x" * 4096, "max_tokens": 1})
        served = await client.post("/v1/completions", json={"prompt": "Hi", "model": "base", "max_tokens": 2})
    message = (await unknown.json())["error"]["message"]
    assert unknown.status == 404 and f"the base model is '{runtime.model_path.stem}' (or 'base')" in message
    assert too_big.status == 413 and served.status == 200
    assert (await served.json())["model"] == runtime.model_path.stem  # what ran, not the alias asked for
    metrics = await (await client.get("/metrics")).text()
    for label, status in (("unparsed", 404), ("unparsed", 413), ("base", 200)):
        assert f'edge_rt_requests_total{{adapter="{label}",status="{status}"}} 1.0' in metrics
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("POST /v1/completions")]
    assert [line.split()[2] for line in lines] == ["status=404", "status=413", "status=200"]
    assert "requested=base ran=base prompt=" in lines[2]


@pytest.mark.asyncio
async def test_the_response_names_what_ran_and_a_507_is_not_worth_retrying(aiohttp_client: Any, runtime: Runtime,
                                                                           adapter_files: list[Path]) -> None:
    runtime.adapters.add("pirate", adapter_files[0])
    runtime.adapters.add("noise", adapter_files[1])
    client = await aiohttp_client(create_app(ServerConfig(), runtime))
    body = {"prompt": "Hi", "model": "pirate", "adapters": [{"name": "noise"}], "max_tokens": 2}
    response = await client.post("/v1/completions", json=body)
    assert (await response.json())["model"] == "noise" and response.headers["X-Edge-Adapters"].startswith("noise@")
    runtime.adapters.budget_bytes = 1024  # nothing fits any more
    runtime.adapters.evict("noise")
    full = await client.post("/v1/completions", json=body)
    assert full.status == 507 and full.headers["x-should-retry"] == "false"


@pytest.mark.asyncio
async def test_many_empty_chat_messages_are_refused_before_tokenizing(
        aiohttp_client: Any, runtime_with: Callable[..., Runtime]) -> None:
    runtime = runtime_with(max_body_bytes=16 << 20)
    # Regression: contents counted 0 bytes, so 34,000 empty messages were tokenized into a 170,000-token prompt.
    rendered: list[int] = []
    real_chat = runtime.engine.chat_prompt

    def counting_chat(messages: Any) -> list[int]:  # the real template and tokenizer, counted
        rendered.append(len(messages))
        return real_chat(messages)

    runtime.engine.chat_prompt = counting_chat  # type: ignore[method-assign]
    # A 16 MiB cap admits the ~102,000 JSON values of the ~1 MB body (at most one per 128 bytes of the cap).
    client = await aiohttp_client(create_app(ServerConfig(), runtime))
    messages = [{"role": "user", "content": ""}] * 34_000
    body = io.BytesIO(json.dumps({"messages": messages, "max_tokens": 1}).encode())
    response = await client.post("/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    error = (await response.json())["error"]
    assert response.status == 400 and "at least 34000 tokens" in error["message"] and rendered == []


@pytest.mark.asyncio
async def test_requests_a_web_page_can_forge_are_refused(aiohttp_client: Any, runtime: Runtime) -> None:
    # Regression: a cross-site text/plain POST (no preflight) ran completions and loaded adapters, and a page on a
    # rebound host name could read /v1/status.
    client = await aiohttp_client(create_app(ServerConfig(), runtime))
    forged = await client.post("/v1/completions", data='{"prompt": "Hi", "max_tokens": 1}',
                               headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert forged.status == 403 and (await forged.json())["error"]["type"] == "forbidden"
    rebound = await client.get("/v1/status", headers={"Host": "evil.example:8080"})
    assert rebound.status == 403
    same_page = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                                  headers={"Origin": f"http://{client.host}:{client.port}"})
    assert same_page.status == 200 and (await client.get("/v1/status")).status == 200
    public = await aiohttp_client(create_app(ServerConfig(loopback_only=False), runtime))
    assert (await public.get("/health", headers={"Host": "device.local"})).status == 200  # a LAN name, bound wide


@pytest.mark.asyncio
async def test_a_request_for_an_adapter_made_for_another_base_says_so(
        aiohttp_client: Any, runtime_with: Callable[..., Runtime], tmp_path: Path, adapter_files: list[Path],
        gemma_adapter_files: list[Path]) -> None:
    # Issue 18 item 17: it was answered "unknown adapter 'x' ... Known adapters: none".
    import shutil

    folder = tmp_path / "adapters"
    folder.mkdir()
    shutil.copy(adapter_files[0], folder / "mine.gguf")
    shutil.copy(gemma_adapter_files[0], folder / "gemmas.gguf")
    runtime = runtime_with()
    runtime.adapters.add_directory(folder)
    client = await aiohttp_client(create_app(ServerConfig(adapters_dir=folder), runtime))
    response = await client.post("/v1/chat/completions", json={"model": "gemmas", "max_tokens": 1,
                                                                "messages": [{"role": "user", "content": "Hi"}]})
    error = (await response.json())["error"]
    assert response.status == 404 and error["type"] == "adapter_not_found"
    assert "adapter 'gemmas' is not served" in error["message"] and "another base model" in error["message"]
    assert "Known adapters: mine" in error["message"]


@pytest.mark.asyncio
async def test_every_completion_carries_the_daemons_deadline_and_passing_it_is_a_504(
        aiohttp_client: Any, runtime_with: Callable[..., Runtime]) -> None:
    # Issue 18 item 1: no request had a deadline; a hostile grammar held the one generation worker for hours.
    runtime = runtime_with()
    late = await aiohttp_client(create_app(ServerConfig(request_timeout_s=1e-6), runtime))
    response = await late.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
    error = (await response.json())["error"]
    assert response.status == 504 and error["type"] == "timeout" and "passed its deadline" in error["message"]
    on_time = await aiohttp_client(create_app(ServerConfig(), runtime))
    served = await on_time.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert served.status == 200 and (await served.json())["usage"]["completion_tokens"] == 4


@pytest.mark.asyncio
async def test_a_stream_that_passes_its_deadline_is_logged_and_counted_as_a_504(
        aiohttp_client: Any, runtime_with: Callable[..., Runtime], caplog: pytest.LogCaptureFixture) -> None:
    # From a new user's walk: a streamed answer cut by --request-timeout was logged and counted as a 200. A grammar
    # asking for 400 numbers keeps the generation going for seconds, past a 4 s deadline; depending on the load the
    # deadline passes before the first token (a plain 504) or after it (an error event in the 200 stream): both
    # are a 504 to the operator.
    runtime = runtime_with()
    client = await aiohttp_client(create_app(ServerConfig(request_timeout_s=4.0), runtime))
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 400, "maxItems": 400}
    with caplog.at_level("INFO", logger="edge_runtime.serve.app"):
        response = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "List numbers."}], "max_tokens": 4000, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
        text = await response.text()
    if response.status == 200:
        assert '"code": 504' in text and "passed its deadline" in text and "[DONE]" not in text
    else:
        assert response.status == 504
    metrics = await (await client.get("/metrics")).text()
    assert 'edge_rt_requests_total{adapter="base",status="504"} 1.0' in metrics
    assert 'status="200"' not in metrics.split("edge_rt_requests_total{", 1)[1].split("\n# ", 1)[0]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("POST /v1/chat/completions")]
    assert len(lines) == 1 and lines[0].split()[2] == "status=504"


@pytest.mark.asyncio
async def test_unauthenticated_requests_neither_forge_log_lines_nor_reach_the_recent_table(
        aiohttp_client: Any, runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    # Issue 18 item 15: `%0a` in a path wrote a second, forged log line; 401s pushed real requests off the status
    # page's recent table; the Basic password was compared with ==.
    import base64

    from edge_runtime.serve.state import DAEMON

    app = create_app(ServerConfig(api_key="sécret"), runtime)
    client = await aiohttp_client(app)
    with caplog.at_level("INFO", logger="edge_runtime.serve.app"):
        forged = await client.get("/v1/x%0a2026-12-07 INFO edge_runtime.serve.app: GET /admin status=200%1b[2J")
    assert forged.status == 401
    lines = [r.getMessage() for r in caplog.records if "/v1/x" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "\x1b" not in lines[0]
    assert "/v1/x\\x0a2026-12-07 INFO" in lines[0] and "\\x1b[2J" in lines[0]
    for _ in range(25):
        assert (await client.get("/v1/models")).status == 401
    good = base64.b64encode("anyone:sécret".encode()).decode()
    bad = base64.b64encode(b"anyone:secret").decode()
    assert (await client.get("/v1/models", headers={"Authorization": f"Basic {bad}"})).status == 401
    assert (await client.get("/v1/models", headers={"Authorization": f"Basic {good}"})).status == 200
    assert [(r.path, r.status) for r in app[DAEMON].recent] == [("/v1/models", 200)]


@pytest.mark.asyncio
async def test_a_404_line_names_the_adapter_asked_for_and_health_logs_at_debug(
        aiohttp_client: Any, runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    # Issue 18 item 20 (the log): 404 lines said requested=-, and /health polls filled the log at INFO.
    client = await aiohttp_client(create_app(ServerConfig(), runtime))
    with caplog.at_level("DEBUG", logger="edge_runtime.serve.app"):
        missing = await client.post("/v1/chat/completions", json={"model": "nope", "messages": [
            {"role": "user", "content": "Hi"}]})
        assert (await client.get("/health")).status == 200
    assert missing.status == 404
    [line] = [r for r in caplog.records if r.getMessage().startswith("POST /v1/chat/completions")]
    assert "status=404 requested=nope " in line.getMessage() and line.levelname == "INFO"
    [health] = [r for r in caplog.records if r.getMessage().startswith("GET /health")]
    assert health.levelname == "DEBUG"


@pytest.mark.asyncio
async def test_a_catalog_of_40000_adapters_keeps_the_page_small_and_the_status_paged(
        aiohttp_client: Any, runtime_with: Callable[..., Runtime]) -> None:
    # Issue 18 item 16: a 40,000-adapter status page was 12 MB, refreshed every 2 s and rendered on the event loop.
    runtime = runtime_with()
    for index in range(40_000):
        runtime.adapters.add_remote(f"remote-{index:05d}", sha256=f"{index:064x}", size_bytes=1000)
    client = await aiohttp_client(create_app(ServerConfig(), runtime))
    page = await (await client.get("/")).text()
    assert len(page.encode()) < 200_000 and "100 of 40000 adapters shown (40000 remote)" in page
    first = await (await client.get("/v1/status")).json()
    assert first["adapters_total"] == 40_000 and len(first["adapters"]) == 1000
    assert first["adapter_states"] == {"remote": 40_000}
    later = await (await client.get("/v1/status?offset=39990&limit=50")).json()
    assert [a["name"] for a in later["adapters"]] == [f"remote-{i:05d}" for i in range(39_990, 40_000)]
    refused = await client.get("/v1/status?limit=20000")
    assert refused.status == 400 and "limit must be a whole number" in (await refused.json())["error"]["message"]


@pytest.mark.asyncio
async def test_an_adapter_file_on_the_device_shows_its_own_description(
        aiohttp_client: Any, runtime: Runtime, tmp_path: Path, base_model: Path) -> None:
    # From a new user's walk: only adapters described by a CDN manifest showed a description; a file converted with
    # --description and served from --adapters-dir showed none (on the page and in `edge-rt status`).
    from peft_dirs import lora_tensors, write_peft_dir

    from converters import convert_peft_to_gguf

    peft_dir = write_peft_dir(tmp_path / "peft", tensors=lora_tensors(["q_proj"], rank=4, layers=range(2), seed=7),
                              r=4, lora_alpha=8, target_modules=["q_proj"])
    path = convert_peft_to_gguf(peft_dir, base=base_model, output=tmp_path / "contracts.gguf", outtype="f32",
                                description="Reviews <contracts>").output
    runtime.adapters.add("contracts", path)
    client = await aiohttp_client(create_app(ServerConfig(), runtime))
    status = await (await client.get("/v1/status")).json()
    [listed] = [a for a in status["adapters"] if a["name"] == "contracts"]
    assert listed["description"] == "Reviews <contracts>"
    page = await (await client.get("/")).text()
    assert "Reviews &lt;contracts&gt;" in page


@pytest.mark.asyncio
async def test_schemas_the_converter_cannot_take_and_oversized_bodies_say_what_to_do(
        aiohttp_client: Any, runtime_with: Callable[..., Runtime]) -> None:
    # From a new user's walk: raw "KeyError: '#/$defs/Q'", "AssertionError: ... use --allow-fetch" (a flag edge-rt
    # does not have) and a bare "Request Entity Too Large".
    client = await aiohttp_client(create_app(ServerConfig(), runtime_with(max_body_bytes=4096)))

    async def refusal(schema: dict[str, Any]) -> str:
        response = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
        error = (await response.json())["error"]
        assert response.status == 400 and error["param"] == "response_format", error
        return str(error["message"])

    root_ref = {"$defs": {"Q": {"type": "integer"}, "P": {"type": "object", "properties": {"n": {"$ref": "#/$defs/Q"}}}},
                "$ref": "#/$defs/P"}
    assert "could not be resolved by llama.cpp's schema converter" in await refusal(root_ref)
    remote = await refusal({"$ref": "https://example.com/schema.json"})
    assert "only local references" in remote and "--allow-fetch" not in remote
    assert "no JSON Schema llama.cpp's converter knows" in await refusal({"type": "frobnicate"})
    too_big = await client.post("/v1/completions", json={"prompt": "x" * 8192, "max_tokens": 1})
    message = (await too_big.json())["error"]["message"]
    assert too_big.status == 413 and "4096" in message and "--max-body-kb" in message


@pytest.mark.asyncio
async def test_a_request_waiting_for_the_engine_gets_its_504_at_its_deadline_not_when_the_engine_frees(
        aiohttp_client: Any, runtime_with: Callable[..., Runtime]) -> None:
    # From the hostile review of #18: a request queued behind a long generation got its 504 only once the worker
    # came free (172.8 s against a 90 s deadline). Here the engine is held by a long grammar generation started
    # outside the daemon (no deadline); the request must be answered while that one still runs.
    import threading

    from edge_runtime.runtime.generation import SamplingParams

    runtime = runtime_with()
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 400, "maxItems": 400}
    grammar = runtime.engine.json_grammar(schema)
    started, stop, finished = threading.Event(), threading.Event(), threading.Event()

    def hold_the_engine() -> None:
        for _ in runtime.engine.stream(runtime.engine.tokenize("Numbers:"), SamplingParams(
                max_tokens=4000, temperature=0.0, grammar=grammar), cancel=stop):
            started.set()
        finished.set()

    holder = threading.Thread(target=hold_the_engine)
    holder.start()
    try:
        assert started.wait(timeout=300)  # hang guard only
        client = await aiohttp_client(create_app(ServerConfig(request_timeout_s=2.0), runtime))
        response = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        error = (await response.json())["error"]
        assert response.status == 504 and error["type"] == "timeout"
        assert not finished.is_set()  # answered while the engine was still busy with the other generation
    finally:
        stop.set()
        holder.join(timeout=300)
