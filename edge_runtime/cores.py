"""The CPU cores this process may use, and how much CPU time its threads were denied.

Usable cores are the fewer of the CPUs in the affinity mask (``taskset``, a container's cpuset) and the cgroup CPU
quota rounded up (``docker --cpus 1.5``: two cores' worth of threads, each running part of the time). The quota is
read from cgroup v2's ``cpu.max`` (and v1's ``cpu.cfs_quota_us`` on hosts that still mount it) of this process's
cgroup and of every parent, the tightest winning. Physical core counts (psutil) say what the board has, not what a
process on a shared device may use.

Contention is read from ``/proc/self/task/<tid>/schedstat``: per thread, the nanoseconds it ran and the
nanoseconds it was runnable but waited for a CPU. A decode whose threads wait is slow because the device is busy.
Idle CPU time, the spare capacity, is the ``idle`` and ``iowait`` columns of ``/proc/stat``'s lines for the CPUs in
this process's affinity mask.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CoreBudget",
    "ThreadTimes",
    "cgroup_quota_cores",
    "core_budget",
    "idle_cpu_seconds",
    "native_threads",
    "process_threads",
    "thread_times",
]

_MAX_READ = 64 * 1024  # /proc and cgroup files are tiny; never read more than this from them
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/stat's unit (USER_HZ)


@dataclass(frozen=True)
class CoreBudget:
    """How many cores this process may use, and why: the affinity mask and the cgroup quota (None = no quota)."""

    affinity: int
    quota: float | None

    @property
    def usable(self) -> int:
        """Whole cores a thread pool should count on: the affinity mask, capped by the quota rounded up."""
        if self.quota is None:
            return self.affinity
        return max(1, min(self.affinity, math.ceil(self.quota - 1e-9)))

    def describe(self) -> str:
        """``2 (affinity 2 CPUs, cgroup quota none)``: the number and where it comes from."""
        quota = "none" if self.quota is None else f"{self.quota:g} CPUs"
        return f"{self.usable} (affinity {self.affinity} CPUs, cgroup quota {quota})"


def core_budget(*, proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> CoreBudget:
    """The cores this process may use now (``proc`` and ``cgroup_root`` point elsewhere only in tests)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    return CoreBudget(affinity=affinity, quota=cgroup_quota_cores(proc=proc, cgroup_root=cgroup_root))


def cgroup_quota_cores(*, proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The tightest CPU quota (in cores) over this process's cgroup and its parents, v2 or v1; None when unlimited."""
    quotas: list[float] = []
    for line in _read(proc / "self" / "cgroup").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            quotas += _v2_quotas(cgroup_root, path)
        elif "cpu" in controllers.split(","):
            quotas += _v1_quotas(cgroup_root / controllers, path)
    return min(quotas) if quotas else None


def _ancestors(root: Path, path: str) -> list[Path]:
    """``root/a/b``, ``root/a``, ``root`` for path ``/a/b``; only plain names (a path never leaves ``root``)."""
    parts = [part for part in path.strip().split("/") if part not in ("", ".", "..")]
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_quotas(root: Path, path: str) -> list[float]:
    quotas = []
    for folder in _ancestors(root, path):
        fields = _read(folder / "cpu.max").split()
        if len(fields) == 2 and fields[0] != "max":
            quota, period = _number(fields[0]), _number(fields[1])
            if quota and period:
                quotas.append(quota / period)
    return quotas


def _v1_quotas(root: Path, path: str) -> list[float]:
    quotas = []
    for folder in _ancestors(root, path):
        quota, period = _number(_read(folder / "cpu.cfs_quota_us")), _number(_read(folder / "cpu.cfs_period_us"))
        if quota and quota > 0 and period:
            quotas.append(quota / period)
    return quotas


def _number(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def _read(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            return handle.read(_MAX_READ).decode("ascii", errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class ThreadTimes:
    """CPU time of a set of threads, in seconds: ``ran`` on a CPU, ``waited`` runnable for one (contention)."""

    ran: float
    waited: float

    def __sub__(self, other: ThreadTimes) -> ThreadTimes:
        return ThreadTimes(ran=self.ran - other.ran, waited=self.waited - other.waited)

    @property
    def contention(self) -> float:
        """The share of the time these threads wanted a CPU that they spent waiting for one (0..1)."""
        ran, waited = max(0.0, self.ran), max(0.0, self.waited)  # a thread that ended leaves the sum
        return waited / (ran + waited) if ran + waited > 0 else 0.0


def process_threads(*, proc: Path = Path("/proc")) -> list[int]:
    """Native ids of this process's threads (Python's and those libraries started)."""
    try:
        return sorted(int(entry.name) for entry in os.scandir(proc / "self" / "task") if entry.name.isdigit())
    except OSError:
        return []


def native_threads(worker: int | None) -> list[int]:
    """Native ids of the threads that run a model: ``worker`` (the thread that calls llama.cpp) and every thread of
    the process that Python did not start (llama.cpp's OpenMP or ggml threads)."""
    python = {thread.native_id for thread in threading.enumerate()}
    return [tid for tid in process_threads() if tid == worker or tid not in python]


def idle_cpu_seconds(*, proc: Path = Path("/proc")) -> float | None:
    """Seconds the CPUs this process may run on (its affinity mask) spent idle or waiting for I/O since boot, from
    ``/proc/stat``'s per-CPU lines (idle CPUs outside a cpuset are no room for this process); None without them."""
    try:
        allowed: set[int] | None = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        allowed = None
    total, seen = 0, False
    for line in _read(proc / "stat").splitlines():
        fields = line.split()
        if len(fields) < 6 or not fields[0].startswith("cpu") or not fields[0][3:].isdigit():
            continue
        if allowed is not None and int(fields[0][3:]) not in allowed:
            continue
        idle, iowait = _number(fields[4]), _number(fields[5])
        if idle is None or iowait is None:
            continue
        total, seen = total + idle + iowait, True
    return total / _CLOCK_TICKS if seen else None


def thread_times(thread_ids: Iterable[int] | None = None, *, proc: Path = Path("/proc")) -> ThreadTimes:
    """Summed schedstat times of this process's threads ``thread_ids`` (an iterable of native ids; None: all)."""
    task_dir = proc / "self" / "task"
    names = [str(int(tid)) for tid in (process_threads(proc=proc) if thread_ids is None else thread_ids)]
    ran = waited = 0
    for name in names:
        fields = _read(task_dir / name / "schedstat").split()
        if len(fields) >= 2:
            ran += _number(fields[0]) or 0
            waited += _number(fields[1]) or 0
    return ThreadTimes(ran=ran / 1e9, waited=waited / 1e9)
