"""OpenAI request parsing and response shapes: `/v1/completions` and `/v1/chat/completions`.

Adapter selection follows vLLM's convention: ``model`` equal to an adapter's name selects it, the base model's id
or ``base`` selects none. Extension fields: ``adapter: "name"`` and ``adapters: [{"name": ..., "scale": ...}]``
(composition, up to four). An unknown adapter is an error, never a silent fallback to the base model.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from edge_runtime.errors import AdapterNotFound, InvalidRequest
from edge_runtime.names import validate_name
from edge_runtime.runtime.adapters import MAX_COMPOSED_ADAPTERS
from edge_runtime.runtime.core import AdapterSpec, AppliedAdapter
from edge_runtime.runtime.engine import SamplingParams

BASE_ALIASES = frozenset({"", "base"})
DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 4
_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


@dataclass(frozen=True)
class ParsedRequest:
    """A validated completion request."""

    chat: bool
    model: str
    base_id: str
    prompt_text: str | None
    messages: list[dict[str, str]] | None
    params: SamplingParams
    adapters: tuple[AdapterSpec, ...]
    stream: bool


def parse_request(body: Any, *, chat: bool, base_id: str, known_adapters: set[str],
                  max_tokens_cap: int) -> ParsedRequest:
    """Validate an OpenAI request body; raise ``InvalidRequest`` (400) or ``AdapterNotFound`` (404)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if body.get("n", 1) != 1:
        raise InvalidRequest("only n=1 is supported", param="n")
    model = body.get("model", base_id)
    if not isinstance(model, str):
        raise InvalidRequest("model must be a string", param="model")
    return ParsedRequest(
        chat=chat, model=model or base_id, base_id=base_id,
        prompt_text=None if chat else _prompt(body.get("prompt")),
        messages=_messages(body.get("messages")) if chat else None,
        params=_sampling(body, max_tokens_cap), adapters=_adapters(body, model, base_id, known_adapters),
        stream=_boolean(body, "stream"),
    )


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
            content = "".join(p["text"] for p in content
                              if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
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


def _sampling(body: dict[str, Any], max_tokens_cap: int) -> SamplingParams:
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
        seed=None if seed is None else seed & 0x7FFFFFFF, stop=tuple(stop),
    )


def _adapters(body: dict[str, Any], model: str, base_id: str, known: set[str]) -> tuple[AdapterSpec, ...]:
    if "adapters" in body:
        items = body["adapters"]
        if not isinstance(items, list) or len(items) > MAX_COMPOSED_ADAPTERS:
            raise InvalidRequest(f"adapters must be a list of up to {MAX_COMPOSED_ADAPTERS} objects",
                                 param="adapters")
        specs = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise InvalidRequest('each adapter is {"name": ..., "scale": ...}', param="adapters")
            specs.append((item["name"], _number(item.get("scale", 1.0), "adapters[].scale", -8.0, 8.0)))
        if not specs and model not in BASE_ALIASES and model != base_id:
            raise InvalidRequest(f"adapters is empty but model names {model!r}; use one of them", param="adapters")
    elif "adapter" in body and body["adapter"] is not None:
        if not isinstance(body["adapter"], str):
            raise InvalidRequest("adapter must be a string", param="adapter")
        specs = [(body["adapter"], 1.0)]
    elif model in BASE_ALIASES or model == base_id:
        specs = []
    else:
        specs = [(model, 1.0)]
    for name, _ in specs:
        validate_name(name)
        if name not in known:
            raise AdapterNotFound(name, tuple(sorted(known)), base=base_id)
    if len({name for name, _ in specs}) != len(specs):
        raise InvalidRequest("an adapter appears twice in adapters", param="adapters")
    return tuple(specs)


def _given(body: dict[str, Any], key: str, default: Any) -> Any:
    # OpenAI clients send null for "use the default".
    value = body.get(key)
    return default if value is None else value


def _boolean(body: dict[str, Any], key: str) -> bool:
    value = _given(body, key, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{key} must be true or false", param=key)
    return value


def _integer(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(f"{name} must be an integer >= {minimum}", param=name)
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a number from {low:g} to {high:g}", param=name)
    return float(value)


# -- responses --------------------------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    """A response id in OpenAI's style."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def applied_json(applied: list[AppliedAdapter]) -> list[dict[str, Any]]:
    """What ran, as the ``adapters`` response field: name, sha256 prefix and scale."""
    return [{"name": a.name, "sha256": a.sha256[:16], "scale": a.scale} for a in applied]


def served_model(applied: list[AppliedAdapter], base_id: str) -> str:
    """The response's ``model``: what ran (``a`` or ``a+b``), or the base model's id when no adapter did."""
    return "+".join(a.name for a in applied) or base_id


def applied_header(applied: list[AppliedAdapter]) -> str:
    """What ran, as the ``X-Edge-Adapters`` header: ``name@sha256prefix:scale`` comma-separated, or ``base``."""
    return ",".join(f"{a.name}@{a.sha256[:16]}:{a.scale:g}" for a in applied) or "base"


def completion_body(request: ParsedRequest, *, response_id: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int, applied: list[AppliedAdapter]) -> dict[str, Any]:
    """The non-streamed response object."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(finish_reason)}
    if request.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice |= {"text": text, "logprobs": None}
    return {"id": response_id, "object": "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": served_model(applied, request.base_id), "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "adapters": applied_json(applied)}


def chunk_body(request: ParsedRequest, *, response_id: str, text: str | None, finish_reason: str | None,
               applied: list[AppliedAdapter], first: bool = False) -> dict[str, Any]:
    """One Server-Sent Events chunk."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(finish_reason)}
    if request.chat:
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice |= {"text": text or "", "logprobs": None}
    return {"id": response_id, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": int(time.time()), "model": served_model(applied, request.base_id), "choices": [choice],
            "adapters": applied_json(applied)}


def error_body(message: str, error_type: str, *, code: str | int | None = None,
               param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": error_type, "code": code, "param": param}}


def _finish(reason: str | None) -> str | None:
    # OpenAI knows stop and length; a cancelled generation ends like a stop.
    return None if reason is None else "length" if reason == "length" else "stop"
