"""The request scheduler: a bounded queue feeding the engine's sequence slots, grouped by adapter set.

The engine decodes up to ``parallel`` generations together (continuous batching: a new one joins at the next step
boundary; the engine serves adapter sets in turns of up to ``turn_s`` seconds, see ``runtime/turns.py``). Whenever a
slot is free, the next job is the oldest one that uses an adapter set already running or applied last (it batches with
them, and its prompt prefix may still be cached) — unless some job has waited longer than ``max_wait_s``, in which
case the oldest job goes next, so no request starves behind a busy adapter. A job whose adapters do not fit in the
memory budget beside the adapters running jobs hold waits for one of them to finish (it fails only when nothing
else runs).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from edge_runtime.errors import BudgetExceeded, QueueFull
from edge_runtime.runtime.core import Runtime
from edge_runtime.runtime.generation import Chunk, SamplingParams
from edge_runtime.runtime.requests import AdapterRequest, AppliedAdapter

_DONE = object()
# Queued grammars (GBNF text, up to 1 MiB each: a 6.4 KB schema became 970 KB) are held until their job runs; sixteen
# of them took a daemon 73 MiB over its budget. Their text is bounded in total, as the queue's length is.
MAX_QUEUED_GRAMMAR_BYTES = 4 << 20


@dataclass
class Job:
    """One queued generation and the channel its chunks come back through."""

    prompt: list[int]
    params: SamplingParams
    adapters: tuple[AdapterRequest, ...]
    enqueued: float
    sequence: int
    cancel: threading.Event = field(default_factory=threading.Event)
    applied: list[AppliedAdapter] = field(default_factory=list)
    generated: int = 0  # tokens the engine produced for it, delivered or not (a client may leave mid-answer)
    started: float | None = None  # time.monotonic() when it got a sequence slot
    _chunks: asyncio.Queue[object] = field(default_factory=asyncio.Queue)

    @property
    def adapter_key(self) -> tuple[AdapterRequest, ...]:
        """The adapter set this job runs under (what a switch is measured against)."""
        return self.adapters

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The generated chunks as they arrive; raises what the generation raised."""
        while True:
            item = await self._chunks.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Chunk)
            yield item


class Scheduler:
    """Serves queued jobs on one worker, grouping by adapter set, with a bound on any job's wait."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        max_queue: int = 16,
        max_wait_s: float = 2.0,
        max_grammar_bytes: int = MAX_QUEUED_GRAMMAR_BYTES,
    ) -> None:
        self.runtime = runtime
        self.max_grammar_bytes = max_grammar_bytes
        self.parallel = runtime.engine.parallel
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self._pending: list[Job] = []
        self._wakeup = asyncio.Event()
        self._sequence = itertools.count()
        self._current_key: tuple[AdapterRequest, ...] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-rt-scheduler")
        self._task: asyncio.Task[None] | None = None
        self._running: list[Job] = []
        self.cancelled_jobs = 0  # generations stopped because their client went away or the daemon stopped
        self.decoded_tokens = 0  # tokens generated, whether or not a client received them

    @property
    def queued_grammar_bytes(self) -> int:
        """Bytes of grammar text held by queued jobs."""
        return sum(len(job.params.grammar or "") for job in self._pending)

    @property
    def queued(self) -> int:
        """Jobs waiting (not counting the running ones)."""
        return len(self._pending)

    @property
    def running(self) -> list[Job]:
        """Jobs generating now, oldest first."""
        return list(self._running)

    def submit(self, prompt: Sequence[int], params: SamplingParams, adapters: Sequence[AdapterRequest]) -> Job:
        """Queue a generation; raise ``QueueFull`` when ``max_queue`` jobs are already waiting for a sequence slot
        (jobs that free slots will take as soon as the worker gets to them are not waiting: a burst of ``parallel``
        requests arrives faster than the worker starts them)."""
        waiting = len(self._pending) - max(0, self.parallel - len(self._running))
        if waiting >= self.max_queue:
            raise QueueFull(queued=waiting, limit=self.max_queue)
        grammar = len(params.grammar or "")
        if grammar and grammar + self.queued_grammar_bytes > self.max_grammar_bytes:
            raise QueueFull(
                queued=max(0, waiting),
                limit=self.max_queue,
                grammar_bytes=self.queued_grammar_bytes,
                grammar_limit=self.max_grammar_bytes,
            )
        job = Job(
            prompt=list(prompt),
            params=params,
            adapters=tuple(adapters),
            enqueued=time.monotonic(),
            sequence=next(self._sequence),
        )
        self._pending.append(job)
        self._wakeup.set()
        return job

    def discard(self, job: Job) -> None:
        """Remove ``job`` from the queue if it has not started (its client went away)."""
        if job in self._pending:
            self._pending.remove(job)

    def drop_pending(self) -> None:
        """End every queued job without running it (shutdown); their handlers answer 503."""
        for job in self._pending:
            job.cancel.set()
            job._chunks.put_nowait(_DONE)
        self._pending.clear()

    def cancel_running(self) -> None:
        """Stop the running generations at their next step (they end with finish_reason "cancelled")."""
        for job in self._running:
            job.cancel.set()

    def start(self) -> None:
        """Start serving jobs (call from the event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        """Cancel queued and running jobs, then stop the worker."""
        self.cancel_running()
        self.drop_pending()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        # Running generations end at their next step (cancelled above); wait for the starts off the event loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    def next_job(self, now: float) -> Job:
        """The job to run next: starving jobs first, then the current adapter set, then the oldest."""
        oldest = min(self._pending, key=lambda j: j.sequence)
        if now - oldest.enqueued > self.max_wait_s:
            return oldest
        keys = {self._current_key, *(j.adapter_key for j in self._running)}
        same = [j for j in self._pending if j.adapter_key in keys]
        return min(same, key=lambda j: j.sequence) if same else oldest

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending or len(self._running) >= self.parallel:
                self._wakeup.clear()
                await self._wakeup.wait()
            job = self.next_job(time.monotonic())
            self._pending.remove(job)
            if job.cancel.is_set():
                job._chunks.put_nowait(_DONE)
                continue
            self._running.append(job)
            self._current_key = job.adapter_key
            job.started = time.monotonic()
            try:
                # Holding the adapters may load one from disk: off the event loop.
                await loop.run_in_executor(self._executor, self._start, job, loop)
            except BudgetExceeded as exc:
                self._running.remove(job)
                if not self._running:
                    job._chunks.put_nowait(exc)
                    job._chunks.put_nowait(_DONE)
                    continue
                self._pending.insert(0, job)  # its adapters fit once a running job lets go of its own
                self._wakeup.clear()
                await self._wakeup.wait()
            except BaseException as exc:  # handed to the request's handler, which maps it to an HTTP error
                self._running.remove(job)
                job._chunks.put_nowait(exc)
                job._chunks.put_nowait(_DONE)

    def _start(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        def deliver(item: Chunk | BaseException) -> None:  # on the engine's thread
            if isinstance(item, Chunk):
                self.decoded_tokens += len(item.token_ids)
                job.generated += len(item.token_ids)
                if item.finish_reason == "cancelled":
                    self.cancelled_jobs += 1
            if loop.is_closed():  # a second signal stopped the daemon at once: the engine's close ends this
                return
            try:
                loop.call_soon_threadsafe(job._chunks.put_nowait, item)
                if isinstance(item, BaseException) or item.finish_reason is not None:
                    loop.call_soon_threadsafe(self._finished, job)
            except RuntimeError:  # the loop closed between the check and the call: nobody waits for this answer
                pass

        self.runtime.start(
            job.prompt, job.params, adapters=job.adapters, cancel=job.cancel, deliver=deliver, applied=job.applied
        )

    def _finished(self, job: Job) -> None:
        job._chunks.put_nowait(_DONE)
        if job in self._running:
            self._running.remove(job)
        self._wakeup.set()
