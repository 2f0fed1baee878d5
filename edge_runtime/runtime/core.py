"""The runtime: one resident base model (engine) and its adapters (manager), set up from a device profile."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from edge_runtime.cores import core_budget, native_threads
from edge_runtime.gguf.header import read_header
from edge_runtime.gguf.info import base_fingerprint
from edge_runtime.profiles import DeviceProfile
from edge_runtime.runtime import activation, budget
from edge_runtime.runtime.adapters import AdapterManager, HeldAdapter
from edge_runtime.runtime.engine import Engine
from edge_runtime.runtime.generation import Chunk, Generation, SamplingParams
from edge_runtime.runtime.models import resolve_model
from edge_runtime.runtime.pace import Pace
from edge_runtime.runtime.plan import engine_settings, plan_for_shape, thread_warning
from edge_runtime.runtime.requests import AdapterRequest, AppliedAdapter

log = logging.getLogger(__name__)


class Runtime:
    """The library API the daemon serves: generate with an adapter set, within the profile's memory budget."""

    def __init__(
        self,
        profile: DeviceProfile,
        *,
        model: str | Path | None = None,
        ctx: int | None = None,
        parallel: int | None = None,
        requests: budget.RequestLimits = budget.DEFAULT_REQUEST_LIMITS,
    ) -> None:
        budget.configure_allocator()
        self.profile = profile
        self.model_path = resolve_model(model)
        header = read_header(self.model_path)  # read once: the plan and the fingerprint both come from it
        shape = budget.ModelShape.from_header(header)
        self.plan = plan_for_shape(profile, shape, ctx=ctx, parallel=parallel, requests=requests)
        self.plan.require_fit(profile.name)
        self.base_fingerprint = base_fingerprint(header)
        self.cores = core_budget()
        warning = thread_warning(profile, self.cores)
        if warning:
            log.warning("%s", warning)
        settings = engine_settings(profile, ctx=ctx, parallel=parallel, shape=shape, cores=self.cores)
        self.engine = Engine(self.model_path, settings)
        self.pace = Pace(self.engine_threads)
        self.engine.on_decode_step = self.pace.step  # decode steps of every sequence, batched or alone
        self.adapters = AdapterManager(
            self.engine,
            budget_bytes=self.plan.adapter_budget_bytes,
            base_header=header,
            base_fingerprint=self.base_fingerprint,
        )

    def stream(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        adapters: Sequence[AdapterRequest] = (),
        applied: list[AppliedAdapter] | None = None,
        cancel: Any = None,
    ) -> Iterator[Chunk]:
        """Generate under ``adapters``, streaming; ``applied`` receives what actually ran."""
        with self.adapters.lease(adapters) as held:
            if applied is not None:
                applied.extend(_applied(held, prompt))
            yield from self.engine.stream(prompt, params, adapters=[(h.handle, h.scale) for h in held], cancel=cancel)

    def compute_status(self) -> dict[str, Any]:
        """Threads, usable cores and why, the profile's warning if any, and over the last minute the decode rate
        (tok/s) and the share of CPU-wanted time the engine's threads spent waiting for a CPU (contention)."""
        contention = self.pace.contention()  # samples the threads' times now
        total = self.pace.total
        return {
            "threads": self.engine.threads,
            "running_threads": self.engine.running_threads,
            "thread_policy": _thread_policy(self.engine),
            "thread_changes": self.engine.governor.changes,
            "shed_steps": self.engine.governor.shed_steps,
            "usable_cores": self.cores.usable,
            "cores": self.cores.describe(),
            "warning": thread_warning(self.profile, self.cores),
            "decode_tokens_per_second": round(self.pace.tokens_per_second(), 2),
            "contention": round(contention, 4),
            "cpu_seconds": round(total.ran, 3),
            "cpu_wait_seconds": round(total.waited, 3),
        }

    def engine_threads(self) -> list[int]:
        """Native ids of the threads that run the model: the engine's worker and the threads llama.cpp started
        (every thread of the process that Python did not start)."""
        return native_threads(self.engine.worker_thread_id)

    def start(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        adapters: Sequence[AdapterRequest] = (),
        cancel: threading.Event,
        deliver: Callable[[Chunk | BaseException], None],
        applied: list[AppliedAdapter] | None = None,
    ) -> None:
        """Queue a generation under ``adapters`` beside the others the engine runs: ``deliver`` receives each chunk
        (the last has a ``finish_reason``) or the exception that ended it, on the engine's thread; the adapters stay
        held until then. Raises at once what holding the adapters raises."""
        lease = self.adapters.lease(adapters)
        held = lease.__enter__()
        if applied is not None:
            applied.extend(_applied(held, prompt))

        def release_then_deliver(item: Chunk | BaseException) -> None:
            try:
                if isinstance(item, BaseException) or item.finish_reason is not None:
                    lease.__exit__(None, None, None)  # a caller that sees the end finds the adapters released
            finally:
                deliver(item)

        try:
            self.engine.start(
                prompt,
                params,
                adapters=[(h.handle, h.scale) for h in held],
                cancel=cancel,
                deliver=release_then_deliver,
            )
        except BaseException:
            lease.__exit__(None, None, None)
            raise

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, *, adapters: Sequence[AdapterRequest] = ()
    ) -> tuple[Generation, list[AppliedAdapter]]:
        """Generate under ``adapters`` and return the text and what actually ran."""
        with self.adapters.lease(adapters) as held:
            result = self.engine.generate(prompt, params, adapters=[(h.handle, h.scale) for h in held])
            return result, _applied(held, prompt)

    def close(self) -> None:
        """Free every adapter, then the model."""
        self.adapters.close()
        self.engine.close()


def _applied(held: Sequence[HeldAdapter], prompt: Sequence[int]) -> list[AppliedAdapter]:
    return [
        AppliedAdapter(
            name=h.name, sha256=h.sha256, scale=h.scale, inert=activation.is_inert(prompt, h.handle.invocation)
        )
        for h in held
    ]


def _thread_policy(engine: Engine) -> str:
    """How the engine's thread count may change, in the operator's words."""
    kv = engine.settings.kv_type
    if engine.threads == 1:
        return "one thread"
    if engine.governor.enabled:
        return f"fewer while the device is busy (a {kv} KV cache gives the same answers at any thread count)"
    if not engine.settings.shed_threads:
        return "fixed (shed_threads is off)"
    return f'fixed (an {kv} KV cache makes answers depend on the thread count; kv_type = "q8_0" allows shedding)'
