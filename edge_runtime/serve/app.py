"""The daemon's HTTP API (aiohttp): OpenAI-compatible completions with adapter selection, admin routes, metrics.

Handlers parse, hand work to the scheduler (which runs llama.cpp on the engine's thread) and respond; the event loop
never blocks on the model. Every error leaves as OpenAI-shaped JSON with the status its error class declares.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from edge_runtime.distribution.client import CdnClient
from edge_runtime.errors import (
    BodyTimeout,
    CacheMiss,
    ContextOverflow,
    EdgeRtError,
    Forbidden,
    MemoryPressure,
    QueueFull,
    ShuttingDown,
    Unauthorized,
)
from edge_runtime.names import validate_name
from edge_runtime.runtime.budget import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE, READ_BUFFER_BYTES
from edge_runtime.runtime.core import AppliedAdapter, Runtime
from edge_runtime.runtime.engine import Engine
from edge_runtime.serve import openai_api
from edge_runtime.serve.follower import CdnFollower
from edge_runtime.serve.intake import SMALL_BODY_BYTES, RequestIntake
from edge_runtime.serve.metrics import Metrics
from edge_runtime.serve.scheduler import Job, Scheduler
from edge_runtime.serve.status import RecentRequest

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_S = 4.0  # a running generation's time to finish after SIGTERM (run the app with a longer timeout)
CLIENT_CLOSED_REQUEST = 499  # the status nginx logs for a client that left before the answer (metrics and log only)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ServerConfig:
    """How the daemon serves: limits and the optional API key."""

    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE
    max_wait_s: float = 2.0
    max_tokens: int | None = None  # cap on a request's max_tokens; None = the context length
    preload: tuple[str, ...] = ()  # adapters made resident before serving (pulled first when only remote)
    body_timeout_s: float = 30.0  # a client that stalls its body longer is answered 408 and disconnected
    body_gap_s: float = 5.0  # ... and one that sends nothing for this long inside its body
    adapters_dir: Path | None = None  # --adapters-dir: rescanned on SIGHUP; /load picks up a new file in it
    loopback_only: bool = True  # bound to 127.0.0.1: a request naming another host is a DNS-rebinding attempt


RUNTIME = web.AppKey("runtime", Runtime)
SCHEDULER = web.AppKey("scheduler", Scheduler)
METRICS = web.AppKey("metrics", Metrics)
CONFIG = web.AppKey("config", ServerConfig)
FOLLOWER = web.AppKey("follower", CdnFollower)
RECENT = web.AppKey("recent", deque)  # the last RECENT_REQUESTS answered requests, for the status page
STARTED = web.AppKey("started", float)
RECENT_REQUESTS = 20
REQUEST_WORK = web.AppKey("request_work", ThreadPoolExecutor)  # tokenizing and parsing large bodies
REQUEST_WORKERS = 2
INTAKE = web.AppKey("intake", RequestIntake)
routes = web.RouteTableDef()


def create_app(config: ServerConfig, runtime: Runtime, *, cdn: CdnClient | None = None) -> web.Application:
    """The aiohttp application serving ``runtime`` (and pulling adapters from ``cdn`` on demand when given)."""
    app = web.Application(client_max_size=config.max_body_bytes, handler_args={"read_bufsize": READ_BUFFER_BYTES},
                          middlewares=[_access_log, _errors, _browser_guard, _auth])
    app[CONFIG] = config
    app[RUNTIME] = runtime
    app[SCHEDULER] = Scheduler(runtime, max_queue=config.max_queue, max_wait_s=config.max_wait_s)
    app[INTAKE] = RequestIntake(reads=runtime.plan.request_reads, max_waiting=config.max_queue,
                                budget_bytes=runtime.profile.runtime_budget_bytes, body_timeout_s=config.body_timeout_s,
                                body_gap_s=config.body_gap_s)
    if config.max_body_bytes > runtime.plan.max_body_bytes or config.max_queue > runtime.plan.max_queue:
        log.warning("the memory plan counts request buffers for bodies of %d bytes and %d waiting requests, this "
                    "server allows %d and %d: bursts can cross the budget", runtime.plan.max_body_bytes,
                    runtime.plan.max_queue, config.max_body_bytes, config.max_queue)
    app[METRICS] = Metrics(runtime, app[SCHEDULER], app[INTAKE])
    app[RECENT], app[STARTED] = deque(maxlen=RECENT_REQUESTS), time.time()
    from edge_runtime.serve import admin  # its routes use this module's keys: imported once this module is

    app.add_routes(routes)
    app.add_routes(admin.routes)
    app.cleanup_ctx.append(_scheduler_lifecycle)
    app.cleanup_ctx.append(_request_work_lifecycle)
    app.on_shutdown.append(_drop_queued)
    if cdn is not None:
        app[FOLLOWER] = CdnFollower(cdn, runtime.adapters)
        app[FOLLOWER].on_pull = app[METRICS].observe_pull
        app.cleanup_ctx.append(_follower_lifecycle)
    app.on_startup.append(_preload)  # after every cleanup_ctx start: CDN adapters are known by then
    app.cleanup_ctx.append(admin.rescan_on_sighup)  # always: an unhandled SIGHUP would end the daemon
    return app


async def _preload(app: web.Application) -> None:
    manager = app[RUNTIME].adapters
    for name in app[CONFIG].preload:
        await pull_remote(app, [validate_name(name)])
        await asyncio.get_running_loop().run_in_executor(None, manager.ensure_resident, name)


async def _request_work_lifecycle(app: web.Application) -> AsyncIterator[None]:
    app[REQUEST_WORK] = ThreadPoolExecutor(max_workers=REQUEST_WORKERS, thread_name_prefix="edge-rt-request")
    yield
    # Requests still tokenizing finish before the runtime (and the vocabulary they read) is freed.
    await asyncio.to_thread(app[REQUEST_WORK].shutdown, wait=True, cancel_futures=True)


async def _scheduler_lifecycle(app: web.Application) -> AsyncIterator[None]:
    scheduler = app[SCHEDULER]
    scheduler.start()
    yield
    await scheduler.stop()


async def _drop_queued(app: web.Application) -> None:
    # on_shutdown runs before aiohttp waits for handlers: queued requests get a 503 now, not a dropped connection.
    # The running generation gets SHUTDOWN_GRACE_S to finish, then stops at its next token and its answer ends
    # cleanly (finish_reason "cancelled"), before aiohttp's own timeout would cut the connection mid-response.
    scheduler = app[SCHEDULER]
    log.info("shutting down: %d queued requests answered 503; a running generation gets %g s to finish",
             scheduler.queued, SHUTDOWN_GRACE_S)
    scheduler.drop_pending()
    asyncio.get_running_loop().call_later(SHUTDOWN_GRACE_S, scheduler.cancel_running)


async def _follower_lifecycle(app: web.Application) -> AsyncIterator[None]:
    await app[FOLLOWER].start()
    yield
    await app[FOLLOWER].close()


async def pull_remote(app: web.Application, names: list[str]) -> None:
    """Pull the named adapters the device knows only from the CDN (a no-op without one)."""
    if FOLLOWER in app:
        await app[FOLLOWER].pull(names)


def base_id(runtime: Runtime) -> str:
    """The id clients use for the base model (the GGUF file's stem)."""
    return runtime.model_path.stem


# -- middleware -------------------------------------------------------------------------------------------------


_COMPLETIONS = ("/v1/completions", "/v1/chat/completions")
_QUIET = ("/", "/v1/status", "/health", "/metrics", "/favicon.ico")  # polled: kept out of the recent-requests table
REQUESTED = web.RequestKey("requested", str)  # what a completion request asked for ("a+b", "base"), once parsed
APPLIED = web.RequestKey("applied", str)  # what ran: the X-Edge-Adapters value
TOKENS = web.RequestKey("tokens", tuple)  # (prompt tokens, completion tokens)


@web.middleware
async def _access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One log line per request, rejected ones included; completions are counted by adapter and status."""
    started, status = time.monotonic(), CLIENT_CLOSED_REQUEST
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        requested = request.get(REQUESTED, "-")
        if request.path in _COMPLETIONS:
            request.app[METRICS].requests.labels(requested if requested != "-" else "unparsed", str(status)).inc()
        prompt, completion = request.get(TOKENS, (0, 0))
        if request.path not in _QUIET:
            request.app[RECENT].append(RecentRequest(at=time.time(), method=request.method, path=request.path,
                                                     status=status, requested=requested, ran=request.get(APPLIED, "-"),
                                                     ms=(time.monotonic() - started) * 1000))
        log.info("%s %s status=%d requested=%s ran=%s prompt=%d completion=%d %.0fms", request.method, request.path,
                 status, requested, request.get(APPLIED, "-"), prompt, completion,
                 (time.monotonic() - started) * 1000)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:
        if not isinstance(exc, EdgeRtError):
            log.exception("unexpected error serving %s %s", request.method, request.path)
        elif public_message(str(exc)) != str(exc):  # the client gets the file names only: the log keeps the paths
            log.info("%s %s answered %d: %s", request.method, request.path, exc.http_status, exc)
        response = error_response(exc)
        if isinstance(exc, BodyTimeout) and request.transport is not None:  # the rest of a stalled body is never
            await response.prepare(request)  # read: answer, then close (aiohttp would linger reading it)
            await response.write_eof()
            request.transport.close()
        return response


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
        headers = ({"Retry-After": str(exc.retry_after_s)} if isinstance(exc, (QueueFull, MemoryPressure))
                   else None)
        if exc.http_status == 507 or isinstance(exc, CacheMiss):
            headers = {"x-should-retry": "false"}
        if isinstance(exc, Unauthorized):  # lets a browser ask for the key (as the password) on the status page
            headers = {"WWW-Authenticate": 'Basic realm="edge-rt", charset="UTF-8"'}
        body = openai_api.error_body(public_message(str(exc)), exc.error_type, code=exc.http_status,
                                     param=getattr(exc, "param", None))
        return exc.http_status, body, headers
    if isinstance(exc, web.HTTPException):
        return exc.status, openai_api.error_body(exc.reason, "invalid_request_error", code=exc.status), None
    return 500, openai_api.error_body("internal error; see the daemon's log", "server_error", code=500), None


def _basic_password(header: str) -> str | None:
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")[2]
    except (ValueError, UnicodeDecodeError):
        return None


def public_message(message: str) -> str:
    """``message`` without the daemon's file-system layout: every absolute path is cut to its file name."""
    return _PATH.sub(lambda match: match.group(0).rstrip("/").rsplit("/", 1)[-1], message)


# Absolute paths, not the path part of a URL nor the daemon's own routes ("use /v1/completions" must stay whole).
_PATH = re.compile(r"(?<![\w:/.])(?!/v1/)(?:/[\w.@+=,~-]+)+/?")


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


@web.middleware
async def _browser_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse what a web page can make a browser send: a state-changing request from another site's origin (CSRF
    with a 'simple' text/plain POST needs no preflight), or any request under a host name that only resolves here
    by DNS rebinding."""
    origin = request.headers.get("Origin")
    if origin is not None and request.method not in ("GET", "HEAD") and urlsplit(origin).netloc != request.host:
        raise Forbidden(f"a request from the origin {origin!r} (not this daemon's page)")
    if request.app[CONFIG].loopback_only and (request.url.host or "") not in _LOOPBACK_HOSTS:
        raise Forbidden(f"the host name {request.host!r}: the daemon listens on loopback only")
    return await handler(request)


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = request.app[CONFIG].api_key
    if key and request.path != "/health":
        given = request.headers.get("Authorization", "")  # bytes that are not UTF-8 arrive as surrogate escapes
        if not (hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {key}".encode())
                or _basic_password(given) == key):  # a browser on the status page: any user, the key as password
            raise Unauthorized()
    return await handler(request)


# -- completions ------------------------------------------------------------------------------------------------


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    """OpenAI text completion, streamed or not."""
    return await _complete(request, chat=False)


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI chat completion with the model's own chat template, streamed or not."""
    return await _complete(request, chat=True)


async def _complete(request: web.Request, *, chat: bool) -> web.StreamResponse:
    started = time.monotonic()
    runtime, metrics, intake = request.app[RUNTIME], request.app[METRICS], request.app[INTAKE]
    await intake.admit(lambda: _evict_idle(runtime))  # over the memory budget: 503 before reading the body
    async with intake.slot():  # the body is read, parsed and tokenized by a bounded number of requests at once
        body = await intake.read_json(request, request.app[REQUEST_WORK], max_bytes=request.app[CONFIG].max_body_bytes)
        parsed = openai_api.parse_request(body, chat=chat, base_id=base_id(runtime),
                                          known_adapters=set(runtime.adapters.names()),
                                          max_tokens_cap=request.app[CONFIG].max_tokens or runtime.engine.n_ctx)
        del body
        label = "+".join(sorted(name for name, _ in parsed.adapters)) or "base"
        request[REQUESTED] = label
        if parsed.json_output:  # converting a schema takes up to seconds: off the event loop, before queueing
            grammar = await asyncio.get_running_loop().run_in_executor(
                request.app[REQUEST_WORK], runtime.engine.json_grammar, parsed.json_schema)
            parsed = parsed.constrained(grammar)
        prompt = await _prompt_tokens(request.app, runtime.engine, parsed)
    produced, job = 0, None
    try:
        await pull_remote(request.app, [name for name, _ in parsed.adapters])
        job = request.app[SCHEDULER].submit(prompt, parsed.params, parsed.adapters)
        chunks = job.chunks()
        first = await anext(chunks, None)
        if first is None:  # dropped from the queue by a shutdown
            raise ShuttingDown()
        request[APPLIED] = openai_api.applied_header(job.applied)
        metrics.first_token.labels(label).observe(time.monotonic() - started)
        if parsed.stream:
            response, produced = await _stream(request, parsed, job, first, chunks, len(prompt))
        else:
            response, produced = await _collect(parsed, job, first, chunks, len(prompt))
        return response
    finally:
        if job is not None:
            job.cancel.set()  # a no-op when it finished; stops the generation when the client went away
            request.app[SCHEDULER].discard(job)  # a client gone while queued frees its slot at once
            produced = max(produced, job.generated)  # a client gone mid-answer: what was generated until then
        request[TOKENS] = (len(prompt), produced)
        metrics.tokens.labels(label).inc(produced)


async def _collect(parsed: openai_api.ParsedRequest, job: Job, first: Any, chunks: AsyncIterator[Any],
                   prompt_tokens: int) -> tuple[web.Response, int]:
    pieces, token_ids, logprobs, finish = [first.text], list(first.token_ids), list(first.logprobs), first.finish_reason
    async for chunk in chunks:
        pieces.append(chunk.text)
        token_ids += chunk.token_ids
        logprobs += chunk.logprobs
        finish = chunk.finish_reason or finish
    body = openai_api.completion_body(parsed, response_id=openai_api.new_id(parsed.chat), text="".join(pieces),
                                      finish_reason=finish or "stop", prompt_tokens=prompt_tokens,
                                      completion_tokens=len(token_ids), applied=job.applied,
                                      logprobs=openai_api.LogprobsShape(parsed).render(logprobs))
    return web.json_response(body, headers=_applied_headers(job.applied)), len(token_ids)


async def _stream(request: web.Request, parsed: openai_api.ParsedRequest, job: Job, first: Any,
                  chunks: AsyncIterator[Any], prompt_tokens: int) -> tuple[web.StreamResponse, int]:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **_applied_headers(job.applied)})
    await response.prepare(request)
    response_id, tokens, is_first = openai_api.new_id(parsed.chat), 0, True
    shape = openai_api.LogprobsShape(parsed)
    chunk = first
    try:
        while chunk is not None:
            body = openai_api.chunk_body(parsed, response_id=response_id, text=chunk.text,
                                         finish_reason=chunk.finish_reason, applied=job.applied, first=is_first,
                                         logprobs=shape.render(chunk.logprobs) if chunk.token_ids else None)
            await response.write(b"data: " + json.dumps(body).encode() + b"\n\n")
            tokens += len(chunk.token_ids)
            is_first = False
            chunk = await anext(chunks, None)
        if parsed.include_usage:
            usage = openai_api.usage_chunk(parsed, response_id=response_id, prompt_tokens=prompt_tokens,
                                           completion_tokens=tokens, applied=job.applied)
            await response.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        job.cancel.set()  # the client went away: stop generating at the next token
    except Exception as exc:  # after the headers went out the status is fixed: report in the stream
        if not isinstance(exc, EdgeRtError):
            log.exception("generation failed mid-stream")
        await response.write(b"data: " + json.dumps(error_payload(exc)[1]).encode() + b"\n\n")
    return response, tokens


async def _prompt_tokens(app: web.Application, engine: Engine, parsed: openai_api.ParsedRequest) -> list[int]:
    """The prompt's tokens, computed off the event loop once its byte length alone does not rule it out.

    A chat template marks every message with at least one token, so the message count is a lower bound too (34,000
    empty messages fit in 1 MiB). Tokenizing runs on the daemon's own small pool: a burst of long prompts waits
    there instead of taking the threads other routes use.
    """
    texts = [m["content"] for m in parsed.messages] if parsed.messages is not None else [parsed.prompt_text or ""]
    markers = len(parsed.messages) if parsed.messages is not None else 0
    # A character is at least one UTF-8 byte: counting characters rules out a megabyte prompt without encoding it.
    for size in (sum(len(text) for text in texts), None):
        text_bytes = size if size is not None else sum(len(text.encode()) for text in texts)
        at_least = engine.min_tokens(text_bytes) + markers
        if at_least >= engine.n_ctx:  # no tokenizing (a second per megabyte) for what cannot fit whatever its tokens
            raise ContextOverflow(prompt_tokens=at_least, context_tokens=engine.n_ctx, prompt_bytes=text_bytes)
    loop = asyncio.get_running_loop()
    if parsed.messages is not None:
        prompt = await loop.run_in_executor(app[REQUEST_WORK], engine.chat_prompt, parsed.messages)
    else:
        prompt = await loop.run_in_executor(app[REQUEST_WORK], engine.tokenize, parsed.prompt_text or "")
    if len(prompt) >= engine.n_ctx:
        raise ContextOverflow(prompt_tokens=len(prompt), context_tokens=engine.n_ctx)
    return prompt


async def _evict_idle(runtime: Runtime) -> bool:
    """Evict the least recently used idle, unpinned adapter; False when there is none."""
    evicted = await asyncio.to_thread(runtime.adapters.evict_least_recent)
    if evicted is not None:
        log.warning("evicted adapter %s to bring memory back under the budget", evicted)
    return evicted is not None


def _applied_headers(applied: list[AppliedAdapter]) -> dict[str, str]:
    return {"X-Edge-Adapters": openai_api.applied_header(applied)}


async def read_json(request: web.Request) -> Any:
    """An admin route's JSON body (at most 64 KiB: names and paths), read in an intake slot within the timeout."""
    intake = request.app[INTAKE]
    async with intake.slot():
        return await intake.read_json(request, request.app[REQUEST_WORK], max_bytes=SMALL_BODY_BYTES)
