"""The daemon over real HTTP: OpenAI shapes (with the official client), adapter selection, admin routes, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import openai
import pytest
import requests
from daemons import Daemon
from prometheus_client.parser import text_string_to_metric_families

from edge_runtime.profiles import load_profile
from edge_runtime.runtime.core import Runtime
from edge_runtime.runtime.engine import SamplingParams
from edge_runtime.runtime.requests import AdapterRequest

AdapterSpec = tuple[str, float]  # (name, scale): the test data, made AdapterRequests where they run


def adapter_requests(spec: list[AdapterSpec]) -> list[AdapterRequest]:
    return [AdapterRequest(name, scale) for name, scale in spec]

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
    (b"[" * 50_000, 400, "holds more than the 512 JSON arrays, objects and items"),  # under a 64 KiB cap
    (b"[" * 400, 400, "not valid JSON"),
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    (json.dumps({"messages": CHAT, "model": "a", "adapters": []}).encode(), 400, "adapters is empty"),
    (json.dumps({"messages": CHAT, "presence_penalty": 3}).encode(), 400, "presence_penalty must be"),
    (json.dumps({"messages": CHAT, "top_logprobs": 2}).encode(), 400, "top_logprobs needs logprobs"),
    (json.dumps({"messages": CHAT, "logprobs": True, "top_logprobs": 21}).encode(), 400, "from 0 to 20"),
    (json.dumps({"prompt": "x", "logprobs": 6}).encode(), 400, "logprobs must be an integer from 0 to 5"),
    (json.dumps({"messages": CHAT, "stream_options": {"include_usage": True}}).encode(), 400, "stream: true"),
    (json.dumps({"messages": CHAT, "response_format": {"type": "xml"}}).encode(), 400, "response_format must be"),
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


# -- OpenAI compatibility: what the official client sends is honoured or refused, never ignored -----------------

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colours"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                         "colours": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}}}
DESCRIBE = [{"role": "user", "content": "Describe a person in JSON."}]
NAME_AND_AGE = [{"role": "user", "content": "Give a JSON object with a name and an age."}]


def test_json_object_response_format_makes_the_output_a_json_object(daemon: Daemon) -> None:
    before = _chat_text(daemon, [])
    completion = client(daemon).chat.completions.create(model="base", messages=NAME_AND_AGE, max_tokens=48,
                                                        temperature=0, response_format={"type": "json_object"})
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)
    assert _chat_text(daemon, []) == before  # the grammar was this request's only: the next reuses the KV as before


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_response_format_matches_the_schema(daemon: Daemon, stream: bool) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    api = client(daemon)
    if stream:
        chunks = api.chat.completions.create(model="a", messages=DESCRIBE, max_tokens=80, temperature=0,
                                             response_format=response_format, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        completion = api.chat.completions.create(model="a", messages=DESCRIBE, max_tokens=80, temperature=0,
                                                 response_format=response_format)
        assert completion.choices[0].finish_reason == "stop"
        text = completion.choices[0].message.content or ""
    person = json.loads(text)
    assert set(person) == {"name", "age", "colours"}
    assert isinstance(person["name"], str) and len(person["name"]) <= 24
    assert isinstance(person["age"], int) and not isinstance(person["age"], bool)
    assert isinstance(person["colours"], list) and len(person["colours"]) <= 3
    assert all(isinstance(c, str) and len(c) <= 12 for c in person["colours"])


@pytest.mark.parametrize("schema", [{"type": "no-such-type"}, {"$ref": "#/definitions/missing"},
                                    {"type": "string", "maxLength": 100_000},  # crashed llama.cpp's parser
                                    {"type": "string", "pattern": "^a{1,1000000000}$"}])
def test_a_schema_llama_cpp_cannot_use_is_a_400_naming_response_format(daemon: Daemon, schema: object) -> None:
    with client(daemon) as api, pytest.raises(openai.BadRequestError) as refused:  # closed: the error holds a socket
        api.chat.completions.create(model="base", messages=CHAT, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert refused.value.param == "response_format" and "grammar" in refused.value.message
    assert _chat_text(daemon, []) != ""


def test_presence_and_frequency_penalties_change_greedy_output(daemon: Daemon) -> None:
    api = client(daemon)
    ask = [{"role": "user", "content": "Write the word apple five times."}]

    def apples(**penalty: float) -> tuple[str, int]:
        completion = api.chat.completions.create(model="base", messages=ask, max_tokens=24, temperature=0,
                                                 **penalty)
        text = completion.choices[0].message.content or ""
        return text, text.lower().count("apple")

    plain, plain_count = apples()
    assert plain_count >= 6  # unpenalised greedy decoding repeats the word
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        text, count = apples(**penalty)
        assert text != plain and count <= plain_count // 2, (penalty, text)
    assert apples(presence_penalty=0.0, frequency_penalty=0.0)[0] == plain


def test_chat_logprobs_are_the_greedy_tokens_with_sorted_alternatives(daemon: Daemon) -> None:
    api = client(daemon)
    whole = api.chat.completions.create(model="b", messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                        top_logprobs=3)
    content = whole.choices[0].logprobs and whole.choices[0].logprobs.content
    assert content is not None and whole.usage is not None and len(content) == whole.usage.completion_tokens == 8
    assert "".join(entry.token for entry in content) == whole.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes or []).decode() == entry.token
        alternatives = [t.logprob for t in entry.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)
        assert sum(math.exp(a) for a in alternatives) <= 1 + 1e-6
    stream = api.chat.completions.create(model="b", messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                         top_logprobs=3, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = api.chat.completions.create(model="b", messages=CHAT, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == whole.choices[0].message.content


def test_completion_logprobs_have_tokens_offsets_and_top_dicts(daemon: Daemon) -> None:
    api = client(daemon)
    prompt = "Once upon a time"
    whole = api.completions.create(model="base", prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert logprobs.text_offset is not None
    assert "".join(logprobs.tokens) == whole.choices[0].text and len(logprobs.tokens) == 6
    offsets = [len(prompt) + len("".join(logprobs.tokens[:i])) for i in range(6)]
    assert logprobs.text_offset == offsets
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0 and len(top) == 2 and top[token] == logprob == max(top.values())
    stream = api.completions.create(model="base", prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                    stream=True)
    tokens = [t for c in stream if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens or []]
    assert tokens == logprobs.tokens


@pytest.mark.parametrize("chat", [True, False])
def test_include_usage_ends_the_stream_with_a_usage_chunk(daemon: Daemon, chat: bool) -> None:
    api = client(daemon)
    if chat:
        chunks = list(api.chat.completions.create(model="c", messages=CHAT, max_tokens=5, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}))
        whole_usage = api.chat.completions.create(model="c", messages=CHAT, max_tokens=5, temperature=0).usage
    else:
        chunks = list(api.completions.create(model="c", prompt="Hello", max_tokens=5, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
        whole_usage = api.completions.create(model="c", prompt="Hello", max_tokens=5, temperature=0).usage
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and whole_usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        whole_usage.prompt_tokens, 5, whole_usage.prompt_tokens + 5)
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks[:-1])


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("tool_choice", "required"), ("functions", [{"name": "f"}]), ("function_call", "auto"), ("n", 2),
    ("logit_bias", {"50256": -100}), ("best_of", 2), ("echo", True), ("suffix", " the end"),
])
def test_fields_that_would_change_the_answer_are_400s_naming_the_field(daemon: Daemon, field: str,
                                                                        value: object) -> None:
    chat = field not in ("best_of", "echo", "suffix")
    body = {"messages": CHAT} if chat else {"prompt": "Hello"}
    response = _post(daemon, "/v1/chat/completions" if chat else "/v1/completions",
                     body | {"max_tokens": 2, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"


def test_the_official_client_sees_tools_and_n_refused_by_name(daemon: Daemon) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    with client(daemon) as api:  # closed: an error holds its socket
        with pytest.raises(openai.BadRequestError) as tools:
            api.chat.completions.create(model="base", messages=CHAT, max_tokens=2, tools=[tool])
        with pytest.raises(openai.BadRequestError) as n:
            api.chat.completions.create(model="base", messages=CHAT, max_tokens=2, n=2)
    assert (tools.value.param, n.value.param) == ("tools", "n")


def test_fields_that_do_not_change_the_answer_are_accepted(daemon: Daemon) -> None:
    api = client(daemon)
    plain = api.chat.completions.create(model="base", messages=CHAT, max_tokens=6, temperature=0)
    tagged = api.chat.completions.create(model="base", messages=CHAT, max_tokens=6, temperature=0, user="u-1",
                                         metadata={"k": "v"}, store=False, service_tier="auto",
                                         parallel_tool_calls=False, tool_choice="none", n=1,
                                         response_format={"type": "text"}, logit_bias={})
    assert tagged.choices[0].message.content == plain.choices[0].message.content


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
        return runtime.generate(prompt, SamplingParams(max_tokens=12), adapters=adapter_requests(spec))[0].text
    finally:
        runtime.close()


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_plan_predicts_the_running_daemons_rss_within_ten_percent(daemon: Daemon, serve_profile: Path,
                                                                  base_model: Path) -> None:
    from edge_runtime.runtime.plan import plan_for

    warm = _post(daemon, "/v1/completions", {"prompt": "The robot walked along the river. " * 70, "max_tokens": 2})
    assert warm.status_code == 200
    text = requests.get(f"{daemon.url}/metrics", timeout=10).text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    predicted = plan_for(load_profile(str(serve_profile)), base_model).fixed_bytes \
        + values["edge_rt_resident_adapter_bytes"]
    assert abs(values["edge_rt_rss_bytes"] - predicted) <= 0.10 * values["edge_rt_rss_bytes"], (
        values["edge_rt_rss_bytes"] / 2**20, predicted / 2**20)
