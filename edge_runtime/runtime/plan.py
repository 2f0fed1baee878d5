"""Settings and the memory plan, from a device profile: pure (no llama.cpp), so ``edge-rt plan`` runs anywhere.

``engine_settings`` says how the engine sets up its context; ``plan_for`` says where the profile's runtime budget
goes (``budget.py`` holds the byte formulas) for a model file, before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_runtime.cores import CoreBudget, core_budget
from edge_runtime.profiles import DeviceProfile
from edge_runtime.runtime import budget

__all__ = ["EngineSettings", "engine_settings", "plan_for", "plan_for_shape", "thread_warning"]


@dataclass(frozen=True)
class EngineSettings:
    """How the base model and its context are set up (from a device profile, or defaults)."""

    n_ctx: int = 2048  # tokens of KV per sequence
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int | None = None  # None: every physical core this process may use (llama-cpp-python's: half)
    n_gpu_layers: int = 0
    kv_type: str = "f16"
    logits_all: bool = False  # keep every position's logits (evaluation only: costs n_ctx × vocab × 4 bytes)
    shed_threads: bool = True  # run fewer threads while the device is busy, where answers allow (governor.py)
    pool_poll: int = 50  # builds without OpenMP: ggml's thread pool polling level, 0-100 (threadpool.py)
    pool_prio: int = 0  # ... and its workers' priority: -1 SCHED_BATCH, 0 inherited, 1-3 SCHED_FIFO (real-time)
    parallel: int = 1  # sequences decoded together, each with its own n_ctx of KV
    # seconds one adapter set is served for before the next set's turn, when sequences need several (turns.py): a
    # switch costs llama.cpp a graph reserve (~12 ms here), so 0.25 s turns spend ~5% on switches and a request on
    # another set waits at most (sets - 1) turns
    turn_s: float = 0.25


def engine_settings(
    profile: DeviceProfile,
    *,
    ctx: int | None = None,
    parallel: int | None = None,
    shape: budget.ModelShape | None = None,
    cores: CoreBudget | None = None,
) -> EngineSettings:
    """Context settings a profile asks for on a process that may use ``cores`` (default: as measured now; ``ctx``
    and ``parallel`` override the profile's; an ``auto`` parallel is decided from the memory plan of ``shape``, or
    is 1 without it). The thread count never exceeds the usable cores minus the profile's reserved ones."""
    compute = profile.compute
    n_ctx = ctx or compute.ctx
    sequences = parallel or compute.parallel
    if sequences is None:
        sequences = (
            1
            if shape is None
            else budget.auto_parallel(
                shape, budget_bytes=profile.runtime_budget_bytes, ctx=n_ctx, kv_type=compute.kv_type
            )
        )
    return EngineSettings(
        n_ctx=n_ctx,
        n_batch=min(compute.batch, n_ctx),
        n_ubatch=budget.ubatch_for(compute.batch),
        n_threads=compute.threads_for((cores or core_budget()).usable),
        n_gpu_layers=compute.gpu_layers,
        kv_type=compute.kv_type,
        parallel=sequences,
    )


def thread_warning(profile: DeviceProfile, cores: CoreBudget) -> str | None:
    """One line for the operator when the profile asks for more threads than this process may use, else None."""
    compute = profile.compute
    if compute.threads + compute.reserve_cores <= cores.usable:
        return None
    asked = f"compute.threads = {compute.threads}" + (
        f" + compute.reserve_cores = {compute.reserve_cores}" if compute.reserve_cores else ""
    )
    running = compute.threads_for(cores.usable)
    threads = f"{running} thread{'s' if running != 1 else ''}"
    return (
        f"profile {profile.name} asks for {asked} but this process may use {cores.describe()} cores: running "
        f"{threads}; on the device the profile is for, give the process more cores, else write a profile for this "
        f"device (edge-rt profiles show {profile.name} > my-device.toml, then lower compute.threads and "
        "compute.reserve_cores)"
    )


def plan_for(
    profile: DeviceProfile,
    model_path: Path | str,
    *,
    ctx: int | None = None,
    parallel: int | None = None,
    requests: budget.RequestLimits = budget.DEFAULT_REQUEST_LIMITS,
) -> budget.MemoryPlan:
    """The memory plan of serving ``model_path`` under ``profile`` with the daemon's request ``limits``."""
    return plan_for_shape(profile, budget.model_shape(model_path), ctx=ctx, parallel=parallel, requests=requests)


def plan_for_shape(
    profile: DeviceProfile,
    shape: budget.ModelShape,
    *,
    ctx: int | None = None,
    parallel: int | None = None,
    requests: budget.RequestLimits = budget.DEFAULT_REQUEST_LIMITS,
) -> budget.MemoryPlan:
    """The memory plan for a model of ``shape`` (read from its header) under ``profile``: ``ctx`` tokens of KV for
    each of ``parallel`` sequences."""
    settings = engine_settings(profile, ctx=ctx, parallel=parallel, shape=shape)
    return budget.plan_memory(
        shape,
        budget_bytes=profile.runtime_budget_bytes,
        ctx=settings.n_ctx,
        batch=settings.n_batch,
        kv_type=settings.kv_type,
        requests=requests,
        reads=budget.request_reads(settings.n_threads or 1),
        parallel=settings.parallel,
    )
