"""OpenAI request parsing and response shapes: `/v1/completions` and `/v1/chat/completions`.

Adapter selection follows vLLM's convention: ``model`` equal to an adapter's name selects it, the base model's id
or ``base`` selects none. Extension fields: ``adapter: "name"`` and ``adapters: [{"name": ..., "scale": ...}]``
(composition, up to four). An unknown adapter is an error, never a silent fallback to the base model.

Honesty about fields: what llama.cpp gives us is implemented (``response_format`` as a grammar, the penalties,
``logprobs``, ``stream_options.include_usage``); a field that would change the answer's meaning and is not
implemented is a 400 naming it (``UNSUPPORTED``), unless it carries its neutral value; other fields (``user``,
``metadata``, ``store``, ``service_tier``, ``parallel_tool_calls``...) do not change the answer and are accepted.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import NoneType
from typing import TYPE_CHECKING, Any, Protocol

from edge_runtime.errors import AdapterNotFound, InvalidRequest
from edge_runtime.runtime.generation import MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob
from edge_runtime.runtime.requests import MAX_COMPOSED_ADAPTERS, AdapterRequest, AppliedAdapter

if TYPE_CHECKING:
    from edge_runtime.distribution.transfer import TransferProgress
    from edge_runtime.runtime.versions import AdapterInfo

BASE_ALIASES = frozenset({"", "base"})
DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 4
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' integer logprobs (OpenAI's limit)
_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
# Fields that change what is asked and are not implemented, with their neutral values (which pass) and what they
# would need. Anything else not parsed below is accepted: it does not change the answer.
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "n": ((None, 1), "only n=1 is supported"),
    "best_of": ((None, 1), "only best_of=1 is supported"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "echo": ((None, False), "echo is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only the text modality is supported"),
    "web_search_options": ((None,), "web search is not supported"),
}


class Catalog(Protocol):
    """The adapters a request may name (the adapter manager is one)."""

    def is_known(self, name: str) -> bool:
        """True when ``name`` may be requested."""

    def names(self) -> list[str]:
        """Every name, sorted (only for the error that lists them)."""

    def refusal(self, name: str) -> str | None:
        """Why ``name`` is not served when a file or CDN entry of that name was refused (another base...), else None."""


@dataclass(frozen=True)
class ParsedRequest:
    """A validated completion request."""

    chat: bool
    model: str
    base_id: str
    prompt_text: str | None
    messages: list[dict[str, str]] | None
    params: SamplingParams
    adapters: tuple[AdapterRequest, ...]
    stream: bool
    json_output: bool = False  # response_format json_object or json_schema: generation follows a JSON grammar
    json_schema: dict[str, Any] | None = None  # the schema of json_schema (None: any JSON object)
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage

    def with_deadline(self, deadline: float) -> ParsedRequest:
        """This request ended by the engine at ``deadline`` (``time.monotonic()`` seconds) with GenerationTimeout."""
        return dataclasses.replace(self, params=dataclasses.replace(self.params, deadline=deadline))

    def constrained(self, grammar: str) -> ParsedRequest:
        """This request with its output held to ``grammar`` (GBNF, from ``Engine.json_grammar``)."""
        return dataclasses.replace(self, params=dataclasses.replace(self.params, grammar=grammar))


def parse_request(
    body: Any, *, chat: bool, base_id: str, known_adapters: Catalog, max_tokens_cap: int
) -> ParsedRequest:
    """Validate an OpenAI request body; raise ``InvalidRequest`` (400) or ``AdapterNotFound`` (404)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    for name, (neutral, reason) in UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise InvalidRequest(f"{reason} ({name})", param=name)
    model = body.get("model", base_id)
    if not isinstance(model, str):
        raise InvalidRequest("model must be a string", param="model")
    stream = _boolean(body, "stream")
    json_output, json_schema = _response_format(body.get("response_format"))
    return ParsedRequest(
        chat=chat,
        model=model or base_id,
        base_id=base_id,
        prompt_text=None if chat else _prompt(body.get("prompt")),
        messages=_messages(body.get("messages")) if chat else None,
        params=_sampling(body, max_tokens_cap, chat=chat),
        adapters=_adapters(body, model, base_id, known_adapters),
        stream=stream,
        json_output=json_output,
        json_schema=json_schema,
        include_usage=_include_usage(body.get("stream_options"), stream),
    )


def _response_format(value: Any) -> tuple[bool, dict[str, Any] | None]:
    """(whether the output must be JSON, the schema it must match)."""
    if value is None:
        return False, None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind != "json_schema":
        raise InvalidRequest(
            'response_format must be {"type": "text"}, {"type": "json_object"} or '
            '{"type": "json_schema", "json_schema": {...}}',
            param="response_format",
        )
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("name"), str)
        or not isinstance(schema, (dict, NoneType))
        or not isinstance(spec.get("strict"), (bool, NoneType))
    ):
        raise InvalidRequest(
            'response_format.json_schema must be {"name": "...", "schema": {...}, "strict": true|false}',
            param="response_format",
        )
    return True, schema


def _include_usage(value: Any, stream: bool) -> bool:
    if value is None:
        return False
    if not stream:
        raise InvalidRequest("stream_options is only allowed with stream: true", param="stream_options")
    if not isinstance(value, dict):
        raise InvalidRequest("stream_options must be an object", param="stream_options")
    return _boolean(value, "include_usage", param="stream_options")


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value:
        raise InvalidRequest("prompt must be a non-empty string", param="prompt")
    return _utf8(value, "prompt")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    messages = []
    for index, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRequest(f"messages[{index}] needs a role among {sorted(_ROLES)}", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(
                p["text"]
                for p in content
                if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            )
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{index}].content must be text", param="messages")
        messages.append({"role": role, "content": _utf8(content, "messages")})
    return messages


def _utf8(text: str, param: str) -> str:
    # JSON can carry lone surrogates (\ud800) that no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{param} holds text that is not valid Unicode", param=param) from exc
    return text


def _sampling(body: dict[str, Any], max_tokens_cap: int, *, chat: bool) -> SamplingParams:
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
    if max_tokens is None:
        max_tokens = max_tokens_cap
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest(f"stop must be a string or a list of up to {MAX_STOP_STRINGS} strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise InvalidRequest("seed must be an integer", param="seed")
    return SamplingParams(
        max_tokens=min(_integer(max_tokens, "max_tokens", minimum=1), max_tokens_cap),
        temperature=_number(_given(body, "temperature", 1.0), "temperature", 0.0, 2.0),
        top_p=_number(_given(body, "top_p", 1.0), "top_p", 0.0, 1.0),
        top_k=_integer(_given(body, "top_k", 0), "top_k", minimum=0),
        seed=None if seed is None else seed & 0x7FFFFFFF,
        stop=tuple(stop),
        presence_penalty=_number(_given(body, "presence_penalty", 0.0), "presence_penalty", -2.0, 2.0),
        frequency_penalty=_number(_given(body, "frequency_penalty", 0.0), "frequency_penalty", -2.0, 2.0),
        logprobs=_chat_logprobs(body) if chat else _completion_logprobs(body),
    )


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """Chat: ``logprobs: true`` and ``top_logprobs`` 0..20 alternatives per token."""
    wanted = _boolean(body, "logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return 0 if wanted else None
    if not wanted:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    return _bounded(top, "top_logprobs", MAX_TOP_LOGPROBS)


def _completion_logprobs(body: dict[str, Any]) -> int | None:
    """Completions: ``logprobs`` 0..5, the alternatives per token."""
    value = body.get("logprobs")
    return None if value is None else _bounded(value, "logprobs", MAX_COMPLETION_LOGPROBS)


def _bounded(value: Any, name: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise InvalidRequest(f"{name} must be an integer from 0 to {high}", param=name)
    return value


def _adapters(body: dict[str, Any], model: str, base_id: str, known: Catalog) -> tuple[AdapterRequest, ...]:
    pairs: list[tuple[str, float]] = []
    if "adapters" in body:
        items = body["adapters"]
        if not isinstance(items, list) or len(items) > MAX_COMPOSED_ADAPTERS:
            raise InvalidRequest(f"adapters must be a list of up to {MAX_COMPOSED_ADAPTERS} objects", param="adapters")
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise InvalidRequest('each adapter is {"name": ..., "scale": ...}', param="adapters")
            pairs.append((item["name"], _number(item.get("scale", 1.0), "adapters[].scale", -8.0, 8.0)))
        if not pairs and model not in BASE_ALIASES and model != base_id:
            raise InvalidRequest(f"adapters is empty but model names {model!r}; use one of them", param="adapters")
    elif "adapter" in body and body["adapter"] is not None:
        if not isinstance(body["adapter"], str):
            raise InvalidRequest("adapter must be a string", param="adapter")
        pairs = [(body["adapter"], 1.0)]
    elif model not in BASE_ALIASES and model != base_id:
        pairs = [(model, 1.0)]
    specs = []
    for name, scale in pairs:  # each name checked, then looked up, in the request's order
        specs.append(AdapterRequest(name, scale))
        if not known.is_known(name):
            raise AdapterNotFound(name, tuple(known.names()), base=base_id, refused=known.refusal(name))
    if len({spec.name for spec in specs}) != len(specs):
        raise InvalidRequest("an adapter appears twice in adapters", param="adapters")
    return tuple(specs)


def _given(body: dict[str, Any], key: str, default: Any) -> Any:
    # OpenAI clients send null for "use the default".
    value = body.get(key)
    return default if value is None else value


def _boolean(body: dict[str, Any], key: str, *, param: str | None = None) -> bool:
    value = _given(body, key, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{key} must be true or false", param=param or key)
    return value


def _integer(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(f"{name} must be an integer >= {minimum}", param=name)
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise InvalidRequest(f"{name} must be a number from {low:g} to {high:g}", param=name)
    return float(value)


# -- responses --------------------------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    """A response id in OpenAI's style."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def applied_json(applied: list[AppliedAdapter]) -> list[dict[str, Any]]:
    """What ran, as the ``adapters`` response field: name, sha256 prefix and scale (``inert: true`` for an aLoRA
    the prompt never invoked)."""
    return [
        {"name": a.name, "sha256": a.sha256[:16], "scale": a.scale} | ({"inert": True} if a.inert else {})
        for a in applied
    ]


def served_model(applied: list[AppliedAdapter], base_id: str) -> str:
    """The response's ``model``: what ran (``a`` or ``a+b``), or the base model's id when no adapter did."""
    return "+".join(a.name for a in applied) or base_id


def applied_header(applied: list[AppliedAdapter]) -> str:
    """What ran, as the ``X-Edge-Adapters`` header: ``name@sha256prefix:scale`` comma-separated (``;inert`` after
    an aLoRA the prompt never invoked), or ``base``."""
    return ",".join(f"{a.name}@{a.sha256[:16]}:{a.scale:g}{';inert' if a.inert else ''}" for a in applied) or "base"


def completion_body(
    request: ParsedRequest,
    *,
    response_id: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    applied: list[AppliedAdapter],
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The non-streamed response object (``logprobs`` from ``LogprobsShape.render``)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(finish_reason), "logprobs": logprobs}
    if request.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": response_id,
        "object": "chat.completion" if request.chat else "text_completion",
        "created": int(time.time()),
        "model": served_model(applied, request.base_id),
        "choices": [choice],
        "usage": usage_json(prompt_tokens, completion_tokens),
        "adapters": applied_json(applied),
    }


def chunk_body(
    request: ParsedRequest,
    *,
    response_id: str,
    text: str | None,
    finish_reason: str | None,
    applied: list[AppliedAdapter],
    first: bool = False,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One Server-Sent Events chunk (with ``usage: null`` when the request asked for a usage chunk at the end)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(finish_reason), "logprobs": logprobs}
    if request.chat:
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    body = _chunk_head(request, response_id, applied) | {"choices": [choice], "adapters": applied_json(applied)}
    return body | {"usage": None} if request.include_usage else body


def usage_chunk(
    request: ParsedRequest,
    *,
    response_id: str,
    prompt_tokens: int,
    completion_tokens: int,
    applied: list[AppliedAdapter],
) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the token counts."""
    return _chunk_head(request, response_id, applied) | {
        "choices": [],
        "adapters": applied_json(applied),
        "usage": usage_json(prompt_tokens, completion_tokens),
    }


def _chunk_head(request: ParsedRequest, response_id: str, applied: list[AppliedAdapter]) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion.chunk" if request.chat else "text_completion",
        "created": int(time.time()),
        "model": served_model(applied, request.base_id),
    }


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class LogprobsShape:
    """A response's ``logprobs`` field in its endpoint's OpenAI shape, chunk after chunk.

    Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``. Completions: ``{"tokens",
    "token_logprobs", "top_logprobs": [{text: logprob}], "text_offset"}``, where the dicts hold the requested
    alternatives plus the sampled token and the offsets count characters from the prompt's start, as OpenAI's do.
    """

    def __init__(self, request: ParsedRequest) -> None:
        self.request = request
        self.offset = len(request.prompt_text or "")

    def render(self, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        """The field for ``entries`` (None when the request did not ask for logprobs)."""
        if self.request.params.logprobs is None:
            return None
        if self.request.chat:
            return {
                "content": [_chat_logprob(e) | {"top_logprobs": [_chat_logprob(t) for t in e.top]} for e in entries],
                "refusal": None,
            }
        tokens = [_text(e.piece) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [_logprob(e) for e in entries],
            "top_logprobs": [_top_dict(e) for e in entries],
            "text_offset": offsets,
        }


def _chat_logprob(entry: TokenLogprob) -> dict[str, Any]:
    return {"token": _text(entry.piece), "logprob": _logprob(entry), "bytes": list(entry.piece)}


def _top_dict(entry: TokenLogprob) -> dict[str, float]:
    top: dict[str, float] = {}
    for alternative in (*entry.top, entry):  # most likely first: a text two tokens share keeps the likelier
        top.setdefault(_text(alternative.piece), _logprob(alternative))
    return top


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def _logprob(entry: TokenLogprob) -> float:
    return max(entry.logprob, -9999.0)  # OpenAI's floor; JSON has no -Infinity


def error_body(
    message: str, error_type: str, *, code: str | int | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": error_type, "code": code, "param": param}}


def _finish(reason: str | None) -> str | None:
    # OpenAI knows stop and length; a cancelled generation ends like a stop.
    return None if reason is None else "length" if reason == "length" else "stop"


def adapter_json(info: AdapterInfo, downloads: dict[str, TransferProgress | None] | None = None) -> dict[str, Any]:
    """An adapter as the API shows it, with its download's progress when a pull is under way."""
    body = {
        "name": info.name,
        "size_bytes": info.size_bytes,
        "resident_bytes": info.resident_bytes,
        "sha256": info.sha256,
        "state": info.state,
        "pinned": info.pinned,
        "users": info.users,
        "last_used": info.last_used or None,
    }
    if downloads and info.name in downloads:  # a pull is under way: its progress, in bytes
        progress = downloads[info.name]
        body |= {
            "state": "downloading",
            "downloaded_bytes": progress.done_bytes if progress else 0,
            "download_total_bytes": progress.total_bytes if progress else info.size_bytes,
        }
    return body
