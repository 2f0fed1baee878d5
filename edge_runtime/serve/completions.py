"""The completion routes: OpenAI text and chat completions, streamed or not, under the adapters a request names.

A request is admitted (memory), read and tokenized in an intake slot, queued on the scheduler (which runs llama.cpp
on the engine's thread) and answered as its chunks arrive; the event loop never blocks on the model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from edge_runtime.errors import ContextOverflow, DownloadWaitTimeout, EdgeRtError, GenerationTimeout, ShuttingDown
from edge_runtime.runtime.core import Runtime
from edge_runtime.runtime.requests import AppliedAdapter
from edge_runtime.serve import openai_api
from edge_runtime.serve.responses import error_payload
from edge_runtime.serve.scheduler import Job
from edge_runtime.serve.state import APPLIED, DAEMON, ENDED_WITH, REQUESTED, TOKENS, Daemon

__all__ = ["routes"]

T = TypeVar("T")
log = logging.getLogger("edge_runtime.serve.app")  # the daemon's request lines keep their logger name
routes = web.RouteTableDef()


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
    daemon = request.app[DAEMON]
    parsed, prompt = await _read(request, daemon, chat=chat)
    deadline = started + daemon.config.request_timeout_s
    parsed = parsed.with_deadline(deadline)  # the engine enforces it inside a token
    produced, job = 0, None
    try:
        names = [a.name for a in parsed.adapters]  # a download goes on past the deadline, for the requests after
        await _by_deadline(daemon.pull_remote(names), deadline, lambda: _download_late(daemon, names))
        job = daemon.scheduler.submit(prompt, parsed.params, parsed.adapters)
        chunks = job.chunks()
        # while queued: the engine enforces the deadline once the job runs; the finally below drops it from the queue
        first = await _by_deadline(
            anext(chunks, None), deadline, lambda: GenerationTimeout(deadline_s=deadline, completion_tokens=0)
        )
        if first is None:  # dropped from the queue by a shutdown
            raise ShuttingDown("the request was still queued")
        if first.finish_reason == "cancelled" and not first.token_ids and daemon.stopping:
            raise ShuttingDown("the generation was stopped before its first token")  # was a 200 with no text
        request[APPLIED] = openai_api.applied_header(job.applied)
        daemon.metrics.first_token.labels(request[REQUESTED]).observe(time.monotonic() - started)
        if parsed.stream:
            response, produced = await _stream(request, parsed, job, first, chunks, len(prompt))
        else:
            response, produced = await _collect(parsed, job, first, chunks, len(prompt))
        return response
    finally:
        if job is not None:
            job.cancel.set()  # a no-op when it finished; stops the generation when the client went away
            daemon.scheduler.discard(job)  # a client gone while queued frees its slot at once
            produced = max(produced, job.generated)  # a client gone mid-answer: what was generated until then
        request[TOKENS] = (len(prompt), produced)
        daemon.metrics.tokens.labels(request[REQUESTED]).inc(produced)


async def _read(request: web.Request, daemon: Daemon, *, chat: bool) -> tuple[openai_api.ParsedRequest, list[int]]:
    """The request parsed and its prompt tokenized, within the intake's memory admission and read slots."""
    runtime, intake = daemon.runtime, daemon.intake
    await intake.admit(lambda: _evict_idle(runtime))  # over the memory budget: 503 before reading the body
    async with intake.slot():  # the body is read, parsed and tokenized by a bounded number of requests at once
        body = await intake.read_json(request, daemon.request_work, max_bytes=daemon.max_body_bytes)
        parsed = openai_api.parse_request(
            body,
            chat=chat,
            base_id=daemon.base_id,
            known_adapters=runtime.adapters,
            max_tokens_cap=daemon.config.max_tokens or runtime.engine.n_ctx,
        )
        del body
        request[REQUESTED] = "+".join(sorted(a.name for a in parsed.adapters)) or "base"
        if parsed.json_output:  # converting a schema takes up to seconds: off the event loop, before queueing
            grammar = await asyncio.get_running_loop().run_in_executor(
                daemon.request_work, runtime.engine.json_grammar, parsed.json_schema
            )
            parsed = parsed.constrained(grammar)
        return parsed, await _prompt_tokens(daemon, parsed)


async def _collect(
    parsed: openai_api.ParsedRequest, job: Job, first: Any, chunks: AsyncIterator[Any], prompt_tokens: int
) -> tuple[web.Response, int]:
    pieces, token_ids, logprobs, finish = [first.text], list(first.token_ids), list(first.logprobs), first.finish_reason
    async for chunk in chunks:
        pieces.append(chunk.text)
        token_ids += chunk.token_ids
        logprobs += chunk.logprobs
        finish = chunk.finish_reason or finish
    body = openai_api.completion_body(
        parsed,
        response_id=openai_api.new_id(parsed.chat),
        text="".join(pieces),
        finish_reason=finish or "stop",
        prompt_tokens=prompt_tokens,
        completion_tokens=len(token_ids),
        applied=job.applied,
        logprobs=openai_api.LogprobsShape(parsed).render(logprobs),
    )
    return web.json_response(body, headers=_applied_headers(job.applied)), len(token_ids)


async def _stream(
    request: web.Request,
    parsed: openai_api.ParsedRequest,
    job: Job,
    first: Any,
    chunks: AsyncIterator[Any],
    prompt_tokens: int,
) -> tuple[web.StreamResponse, int]:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **_applied_headers(job.applied)}
    )
    await response.prepare(request)
    response_id, tokens, is_first = openai_api.new_id(parsed.chat), 0, True
    shape = openai_api.LogprobsShape(parsed)
    chunk = first
    try:
        while chunk is not None:
            body = openai_api.chunk_body(
                parsed,
                response_id=response_id,
                text=chunk.text,
                finish_reason=chunk.finish_reason,
                applied=job.applied,
                first=is_first,
                logprobs=shape.render(chunk.logprobs) if chunk.token_ids else None,
            )
            await response.write(b"data: " + json.dumps(body).encode() + b"\n\n")
            tokens += len(chunk.token_ids)
            is_first = False
            chunk = await anext(chunks, None)
        if parsed.include_usage:
            usage = openai_api.usage_chunk(
                parsed,
                response_id=response_id,
                prompt_tokens=prompt_tokens,
                completion_tokens=tokens,
                applied=job.applied,
            )
            await response.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        job.cancel.set()  # the client went away: stop generating at the next token
    except Exception as exc:  # after the headers went out the status is fixed: report in the stream
        if not isinstance(exc, EdgeRtError):
            log.exception("generation failed mid-stream")
        status, body, _ = error_payload(exc)
        request[ENDED_WITH] = status
        await response.write(b"data: " + json.dumps(body).encode() + b"\n\n")
    return response, tokens


async def _by_deadline(work: Awaitable[T], deadline: float, late: Callable[[], EdgeRtError]) -> T:
    """``work``'s result, or ``late()`` raised once ``deadline`` (``time.monotonic()`` seconds) passes; a
    ``TimeoutError`` of the work's own (a download's ``SlowRetrieval``) passes through as it is."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())) as scope:
            return await work
    except TimeoutError:
        if not scope.expired():
            raise
        raise late() from None


def _download_late(daemon: Daemon, names: list[str]) -> DownloadWaitTimeout:
    """The 504 of a request whose deadline passed while adapters it asked for were still downloading."""
    waiting = daemon.follower.waiting if daemon.follower is not None else {}
    return DownloadWaitTimeout(
        adapters=[name for name in names if name in waiting] or names, timeout_s=daemon.config.request_timeout_s
    )


async def _prompt_tokens(daemon: Daemon, parsed: openai_api.ParsedRequest) -> list[int]:
    """The prompt's tokens, computed off the event loop once its byte length alone does not rule it out.

    A chat template marks every message with at least one token, so the message count is a lower bound too (34,000
    empty messages fit in 1 MiB). Tokenizing runs on the daemon's own small pool: a burst of long prompts waits
    there instead of taking the threads other routes use.
    """
    engine = daemon.runtime.engine
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
        prompt = await loop.run_in_executor(daemon.request_work, engine.chat_prompt, parsed.messages)
    else:
        prompt = await loop.run_in_executor(daemon.request_work, engine.tokenize, parsed.prompt_text or "")
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
