"""The daemon over real HTTP: OpenAI shapes (with the official client), adapter selection, admin routes, errors."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import requests
from daemons import Daemon
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.profiles import load_profile
from edge_runtime.runtime.core import AdapterSpec, Runtime
from edge_runtime.runtime.engine import SamplingParams

CHAT = [{"role": "user", "content": "List three things a drone needs."}]


def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)


def test_openai_client_chat_with_an_adapter_reports_what_ran(daemon: Daemon, adapters_dir: Path) -> None:
    raw = client(daemon).chat.completions.with_raw_response.create(model="a", messages=CHAT, max_tokens=8,
                                                                   temperature=0)
    completion = raw.parse()
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    sha = _sha256(adapters_dir / "a.gguf")
    assert raw.headers["X-Edge-Adapters"] == f"a@{sha[:16]}:1"
    assert completion.model_extra is not None
    assert completion.model_extra["adapters"] == [{"name": "a", "sha256": sha[:16], "scale": 1.0}]


def test_streamed_text_equals_the_non_streamed_text(daemon: Daemon) -> None:
    api = client(daemon)
    whole = api.chat.completions.create(model="b", messages=CHAT, max_tokens=16, temperature=0)
    stream = api.chat.completions.create(model="b", messages=CHAT, max_tokens=16, temperature=0, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream]
    assert "".join(pieces) == whole.choices[0].message.content
    text = api.completions.create(model="base", prompt="Once upon a time", max_tokens=10, temperature=0)
    streamed = api.completions.create(model="base", prompt="Once upon a time", max_tokens=10, temperature=0,
                                      stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    assert text.model_extra is not None and text.model_extra["adapters"] == []


def test_model_adapter_and_adapters_fields_select_the_same_adapter(daemon: Daemon) -> None:
    body = {"messages": CHAT, "max_tokens": 8, "temperature": 0}
    by_model = _post(daemon, "/v1/chat/completions", body | {"model": "c"}).json()
    by_field = _post(daemon, "/v1/chat/completions", body | {"adapter": "c"}).json()
    by_list = _post(daemon, "/v1/chat/completions", body | {"adapters": [{"name": "c", "scale": 1.0}]}).json()
    base = _post(daemon, "/v1/chat/completions", body | {"model": "SmolLM2-135M-Instruct.Q4_1"}).json()
    texts = [r["choices"][0]["message"]["content"] for r in (by_model, by_field, by_list, base)]
    assert texts[0] == texts[1] == texts[2] != texts[3]
    assert base["adapters"] == []


def test_interleaved_adapter_sequence_matches_fresh_single_adapter_runs(daemon: Daemon, adapters_dir: Path,
                                                                       serve_profile: Path) -> None:
    sequence: list[list[AdapterSpec]] = [[], [("a", 1.0)], [("b", 1.0)], [("a", 1.0)], [("a", 0.5), ("b", 0.5)],
                                         [], [("b", 1.0)]]
    served = [_chat_text(daemon, spec) for spec in sequence]
    fresh = {str(spec): _fresh_text(serve_profile, adapters_dir, spec) for spec in sequence}
    assert served == [fresh[str(spec)] for spec in sequence]
    assert len(set(served)) == 4


def test_models_and_adapters_routes(daemon: Daemon, adapters_dir: Path) -> None:
    models = client(daemon).models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct.Q4_1", "a", "b", "c"]
    listing = requests.get(f"{daemon.url}/v1/adapters", timeout=10).json()["data"]
    entry = next(a for a in listing if a["name"] == "c")
    assert entry["sha256"] == _sha256(adapters_dir / "c.gguf")
    assert entry["size_bytes"] == (adapters_dir / "c.gguf").stat().st_size
    assert entry["state"] in {"cached", "resident"} and entry["pinned"] is False


def test_load_and_evict_routes_change_the_state(daemon: Daemon) -> None:
    loaded = _post(daemon, "/v1/adapters/b/load", None)
    assert loaded.status_code == 200 and loaded.json()["state"] == "resident"
    evicted = requests.delete(f"{daemon.url}/v1/adapters/b", timeout=10)
    assert evicted.status_code == 200 and evicted.json() | {"users": 0} == evicted.json()
    assert evicted.json()["evicted"] is True and evicted.json()["state"] == "cached"
    assert _post(daemon, "/v1/adapters/zzz/load", None).status_code == 404


def test_health_and_metrics_parse_as_prometheus_text(daemon: Daemon) -> None:
    assert requests.get(f"{daemon.url}/health", timeout=10).json()["status"] == "ok"
    _chat_text(daemon, [("a", 1.0)])
    response = requests.get(f"{daemon.url}/metrics", timeout=10)
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in ["edge_rt_requests", "edge_rt_adapter_loads", "edge_rt_adapter_evictions", "edge_rt_adapter_switches",
                 "edge_rt_adapter_load_seconds", "edge_rt_time_to_first_token_seconds", "edge_rt_tokens_generated",
                 "edge_rt_resident_adapter_bytes", "edge_rt_rss_bytes", "edge_rt_runtime_budget_bytes"]:
        assert name in families, name
    requests_ok = [s for s in families["edge_rt_requests"].samples
                   if s.name == "edge_rt_requests_total" and s.labels == {"adapter": "a", "status": "200"}]
    assert requests_ok and requests_ok[0].value >= 1
    assert families["edge_rt_rss_bytes"].samples[0].value > 100 * 2**20
    assert families["edge_rt_runtime_budget_bytes"].samples[0].value == 1024 * 2**20


# -- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"messages": CHAT, "n": 2}).encode(), 400, "only n=1"),
    (json.dumps({"messages": CHAT, "temperature": 9}).encode(), 400, "temperature must be"),
    (json.dumps({"messages": []}).encode(), 400, "messages must be a non-empty list"),
    (json.dumps({"messages": CHAT, "model": "../../etc/passwd"}).encode(), 400, "invalid name"),
    (json.dumps({"messages": CHAT, "adapter": "/etc/passwd"}).encode(), 400, "invalid name"),
    (json.dumps({"messages": CHAT, "adapter": "a\u0000b"}).encode(), 400, "invalid name"),
    (json.dumps({"messages": CHAT, "model": "legal-review-v9"}).encode(), 404, "unknown adapter"),
    (json.dumps({"messages": CHAT, "adapters": [{"name": n} for n in "abcab"]}).encode(), 400, "up to 4"),
    (json.dumps({"messages": [{"role": ["user"], "content": "x"}]}).encode(), 400, "needs a role"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                 "max_tokens": 1}).encode(), 200, ""),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "not valid Unicode"),
    (b'{"prompt": "\\ud800"}', 400, "not valid Unicode"),
    (b"[" * 50_000, 400, "not valid JSON"),
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    (json.dumps({"messages": CHAT, "model": "a", "adapters": []}).encode(), 400, "adapters is empty"),
])
def test_bad_requests_get_openai_shaped_errors_and_the_daemon_keeps_serving(daemon: Daemon, body: bytes,
                                                                            status: int, words: str) -> None:
    path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
    response = requests.post(f"{daemon.url}{path}", data=body, timeout=30)
    assert response.status_code == status, response.text
    if status == 200:  # a non-text content part is ignored, not a crash
        return
    error = response.json()["error"]
    assert words in error["message"] and error["type"] and error["code"] == status
    assert _chat_text(daemon, []) != ""


def test_prompt_longer_than_the_context_is_400(daemon: Daemon) -> None:
    response = _post(daemon, "/v1/completions", {"prompt": "word " * 3000, "max_tokens": 4})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "context_length_exceeded"


def test_body_over_the_cap_is_413(daemon: Daemon) -> None:
    response = _post(daemon, "/v1/completions", {"prompt": "x" * (80 * 1024), "max_tokens": 1})
    assert response.status_code == 413
    assert "error" in response.json()


@pytest.mark.parametrize("path", ["/v1/adapters/%2e%2e%2f%2e%2e%2fetc%2fpasswd/load", "/v1/adapters/..%2Fx/load",
                                  "/v1/adapters/%00/load"])
def test_hostile_adapter_names_in_paths_never_reach_the_filesystem(daemon: Daemon, path: str) -> None:
    response = requests.post(f"{daemon.url}{path}", timeout=10)
    assert response.status_code == 400
    assert "invalid name" in response.json()["error"]["message"]


def _post(daemon: Daemon, path: str, body: object) -> requests.Response:
    return requests.post(f"{daemon.url}{path}", json=body, timeout=60)


def _chat_text(daemon: Daemon, spec: list[AdapterSpec]) -> str:
    body = {"messages": CHAT, "max_tokens": 12, "temperature": 0,
            "adapters": [{"name": n, "scale": s} for n, s in spec]}
    response = _post(daemon, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def _fresh_text(profile: Path, adapters_dir: Path, spec: list[AdapterSpec]) -> str:
    runtime = Runtime(load_profile(str(profile)))
    try:
        runtime.adapters.add_directory(adapters_dir)
        prompt = runtime.engine.chat_prompt(CHAT)
        return runtime.generate(prompt, SamplingParams(max_tokens=12), adapters=spec)[0].text
    finally:
        runtime.close()


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_plan_predicts_the_running_daemons_rss_within_ten_percent(daemon: Daemon, serve_profile: Path,
                                                                  base_model: Path) -> None:
    from edge_runtime.runtime.core import plan_for

    warm = _post(daemon, "/v1/completions", {"prompt": "The robot walked along the river. " * 70, "max_tokens": 2})
    assert warm.status_code == 200
    text = requests.get(f"{daemon.url}/metrics", timeout=10).text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    predicted = plan_for(load_profile(str(serve_profile)), base_model).fixed_bytes \
        + values["edge_rt_resident_adapter_bytes"]
    assert abs(values["edge_rt_rss_bytes"] - predicted) <= 0.10 * values["edge_rt_rss_bytes"], (
        values["edge_rt_rss_bytes"] / 2**20, predicted / 2**20)
