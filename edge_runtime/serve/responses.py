"""Errors as HTTP answers: the OpenAI-shaped JSON body and status an error class declares, without the daemon's
file-system layout. Shared by the error middleware and by streams, which report a late error as their last event.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from edge_runtime.errors import CacheMiss, EdgeRtError, MemoryPressure, QueueFull, Unauthorized
from edge_runtime.serve import openai_api

__all__ = ["error_payload", "error_response", "public_message"]


def error_response(exc: BaseException) -> web.Response:
    """The OpenAI-shaped JSON answer for ``exc``: the status its class declares, 500 for an unexpected error."""
    status, body, headers = error_payload(exc)
    return web.json_response(body, status=status, headers=headers)


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """(HTTP status, OpenAI error body, extra headers) for ``exc``; a stream sends the body as its last event.

    A 507 or a cache miss will not change on a retry: ``x-should-retry: false`` keeps the official client (which
    retries 5xx) from asking twice more.
    """
    if isinstance(exc, EdgeRtError):
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, (QueueFull, MemoryPressure)) else None
        if exc.http_status == 507 or isinstance(exc, CacheMiss):
            headers = {"x-should-retry": "false"}
        if isinstance(exc, Unauthorized):  # lets a browser ask for the key (as the password) on the status page
            headers = {"WWW-Authenticate": 'Basic realm="edge-rt", charset="UTF-8"'}
        body = openai_api.error_body(
            public_message(str(exc)), exc.error_type, code=exc.http_status, param=getattr(exc, "param", None)
        )
        return exc.http_status, body, headers
    if isinstance(exc, web.HTTPException):
        message = exc.reason
        if isinstance(exc, web.HTTPRequestEntityTooLarge):  # its text names both sizes
            message = f"{exc.text} bytes: the daemon's --max-body-kb bounds a request's JSON body, prompt included"
        return exc.status, openai_api.error_body(message, "invalid_request_error", code=exc.status), None
    return 500, openai_api.error_body("internal error; see the daemon's log", "server_error", code=500), None


def public_message(message: str) -> str:
    """``message`` without the daemon's file-system layout: every absolute path is cut to its file name."""
    return _PATH.sub(lambda match: match.group(0).rstrip("/").rsplit("/", 1)[-1], message)


# Absolute paths, not the path part of a URL nor the daemon's own routes ("use /v1/completions" must stay whole).
_PATH = re.compile(r"(?<![\w:/.])(?!/v1/)(?:/[\w.@+=,~-]+)+/?")
