"""A daemon on a device with fewer cores than its profile asks for says so once at start, and shows on /metrics and
the status page how many threads it runs, on how many usable cores, how fast it decodes and how long its threads
waited for a CPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from daemons import metric, run_daemon

from edge_runtime.cores import CoreBudget, cgroup_quota_cores


@contextmanager
def pinned_to_one_cpu() -> Iterator[int]:
    """This process (and the daemons it starts meanwhile) on its first CPU only, as `taskset -c N` would."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def test_jetson_profile_on_one_core_warns_once_and_reports_threads_cores_rate_and_contention(tmp_path: Path) -> None:
    cores = CoreBudget(affinity=1, quota=cgroup_quota_cores()).describe()
    with pinned_to_one_cpu(), run_daemon("--profile", "jetson", log=tmp_path / "serve.log") as daemon:
        answer = requests.post(f"{daemon.url}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 16,
                                                                     "temperature": 0}, timeout=120)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 16
        assert metric(daemon, "edge_rt_engine_threads") == 1
        assert metric(daemon, "edge_rt_engine_threads_running") == 1
        assert metric(daemon, "edge_rt_engine_thread_changes_total") == 0  # one thread: nothing to shed
        assert metric(daemon, "edge_rt_usable_cores") == 1
        assert metric(daemon, "edge_rt_decode_tokens_per_second") > 0
        assert metric(daemon, "edge_rt_engine_cpu_seconds_total") > 0
        assert 0 <= metric(daemon, "edge_rt_engine_cpu_contention") <= 1
        assert metric(daemon, "edge_rt_engine_cpu_wait_seconds_total") >= 0
        compute = requests.get(f"{daemon.url}/v1/status", timeout=10).json()["compute"]
        page = requests.get(f"{daemon.url}/", timeout=10).text
        log = daemon.log_text()
    warnings = [line for line in log.splitlines() if "asks for compute.threads" in line]
    assert len(warnings) == 1
    assert (f"profile jetson-orin-nano-8gb asks for compute.threads = 4 + compute.reserve_cores = 2 but this process "
            f"may use {cores} cores: running 1 thread; on the device the profile is for") in warnings[0]
    assert "edge-rt profiles show jetson-orin-nano-8gb > my-device.toml" in warnings[0]
    assert f"(1 thread, usable cores {cores}), up to 2 sequences together, on http://" in log  # jetson: parallel 2
    assert compute["threads"] == 1 and compute["usable_cores"] == 1 and compute["warning"] in warnings[0]
    assert compute["decode_tokens_per_second"] > 0
    assert 'id="threads-warning"' in page and "1 thread · usable cores 1 (affinity 1 CPUs" in page


def test_a_profile_within_the_usable_cores_starts_without_a_warning(tmp_path: Path) -> None:
    with run_daemon("--profile", "phone-4gb", log=tmp_path / "serve.log") as daemon:
        threads = metric(daemon, "edge_rt_engine_threads")
        usable = metric(daemon, "edge_rt_usable_cores")
        log = daemon.log_text()
    assert threads == min(2, usable)
    assert ("asks for compute.threads" in log) == (usable < 2)
    assert "), one sequence at a time, on http://" in log  # phone-4gb ships parallel = 1
