"""aLoRA through the daemon's HTTP API: the response says whether the adapter was inert, and a document the base
model already read is not read again."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peft_dirs import ASSISTANT_TURN

from edge_runtime.files import file_sha256
from edge_runtime.profiles import load_profile
from edge_runtime.runtime.core import Runtime
from edge_runtime.serve.app import create_app
from edge_runtime.serve.state import ServerConfig

DOCUMENT = " ".join(f"Clause {n}: the supplier delivers {n * 7} units of part {n % 5} by day {n * 3}." for n in
                    range(1, 9))


@pytest.fixture
def runtime(in_process_profile: Callable[[str], Path], alora_files: list[Path]) -> Iterator[Runtime]:
    rt = Runtime(load_profile(str(in_process_profile("alora-http"))), ctx=1024)
    rt.adapters.add("router", alora_files[0])
    yield rt
    rt.close()


@pytest.mark.asyncio
async def test_an_invoked_alora_shares_the_bases_prefix_and_an_uninvoked_one_answers_inert_as_the_base(
        aiohttp_client: Any, runtime: Runtime, alora_files: list[Path]) -> None:
    client = await aiohttp_client(create_app(ServerConfig(), runtime))
    sha = file_sha256(alora_files[0]).hexdigest()[:16]
    messages = [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": "Which team handles this?"}]
    chat = {"messages": messages, "max_tokens": 8, "temperature": 0}
    base = await client.post("/v1/chat/completions", json=chat | {"model": "base"})
    assert base.status == 200 and base.headers["X-Edge-Adapters"] == "base"

    invoked = await client.post("/v1/chat/completions", json=chat | {"model": "router"})
    body = await invoked.json()
    assert invoked.headers["X-Edge-Adapters"] == f"router@{sha}:1"
    assert body["model"] == "router" and body["adapters"] == [{"name": "router", "sha256": sha, "scale": 1.0}]
    # The chat prompt ends with the invocation (the assistant turn): only it was evaluated, not the document.
    assert runtime.engine.last_reused_tokens == body["usage"]["prompt_tokens"] - len(ASSISTANT_TURN)
    assert body["choices"][0]["message"]["content"] != (await base.json())["choices"][0]["message"]["content"]

    completion = {"prompt": f"{DOCUMENT}\nThe largest delivery is", "max_tokens": 8, "temperature": 0}
    inert = await client.post("/v1/completions", json=completion | {"model": "router"})
    inert_body = await inert.json()
    assert inert.headers["X-Edge-Adapters"] == f"router@{sha}:1;inert"
    assert inert_body["adapters"] == [{"name": "router", "sha256": sha, "scale": 1.0, "inert": True}]
    as_base = await (await client.post("/v1/completions", json=completion | {"model": "base"})).json()
    assert inert_body["choices"][0]["text"] == as_base["choices"][0]["text"]

    streamed = await client.post("/v1/completions", json=completion | {"model": "router", "stream": True})
    assert streamed.headers["X-Edge-Adapters"] == f"router@{sha}:1;inert"
    first = (await streamed.content.readline()).decode()
    assert first.startswith("data: ") and '"inert": true' in first
