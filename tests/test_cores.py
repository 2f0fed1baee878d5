"""The cores a process may use (affinity mask, cgroup v2 and v1 quotas) and the contention its threads met."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge_runtime.cores import CoreBudget, cgroup_quota_cores, core_budget, idle_cpu_seconds, thread_times

REPO = Path(__file__).resolve().parent.parent


def fake_system(tmp_path: Path, cgroup_line: str) -> tuple[Path, Path]:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup_line)
    root.mkdir()
    return proc, root


def test_cgroup_v2_quota_is_the_tightest_of_the_process_group_and_its_parents(tmp_path: Path) -> None:
    proc, root = fake_system(tmp_path, "0::/system.slice/edge-rt.service\n")
    (root / "system.slice" / "edge-rt.service").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "system.slice" / "cpu.max").write_text("300000 100000\n")
    (root / "system.slice" / "edge-rt.service" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota_cores(proc=proc, cgroup_root=root) == 1.5
    (root / "system.slice" / "cpu.max").write_text("50000 100000\n")
    assert cgroup_quota_cores(proc=proc, cgroup_root=root) == 0.5


def test_no_quota_when_every_level_says_max_or_has_no_file(tmp_path: Path) -> None:
    proc, root = fake_system(tmp_path, "0::/user.slice\n")
    (root / "user.slice").mkdir()
    (root / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota_cores(proc=proc, cgroup_root=root) is None


def test_cgroup_v1_cfs_quota_is_read_on_hosts_that_mount_it(tmp_path: Path) -> None:
    proc, root = fake_system(tmp_path, "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    group = root / "cpu,cpuacct" / "docker" / "abc"
    group.mkdir(parents=True)
    (group / "cpu.cfs_quota_us").write_text("200000\n")
    (group / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota_cores(proc=proc, cgroup_root=root) == 2.0


def test_a_cgroup_path_never_leaves_the_cgroup_root(tmp_path: Path) -> None:
    proc, root = fake_system(tmp_path, "0::/../../outside\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "cpu.max").write_text("10000 100000\n")
    assert cgroup_quota_cores(proc=proc, cgroup_root=root) is None


@pytest.mark.parametrize(("affinity", "quota", "usable"), [(4, None, 4), (4, 1.5, 2), (4, 0.5, 1), (2, 8.0, 2),
                                                           (8, 3.0, 3)])
def test_usable_cores_are_the_affinity_capped_by_the_quota_rounded_up(affinity: int, quota: float | None,
                                                                      usable: int) -> None:
    budget = CoreBudget(affinity=affinity, quota=quota)
    assert budget.usable == usable
    assert budget.describe().startswith(f"{usable} (affinity {affinity} CPUs, cgroup quota ")


def test_the_affinity_mask_of_this_process_is_counted() -> None:
    assert core_budget().affinity == len(os.sched_getaffinity(0))
    code = "from edge_runtime.cores import core_budget; print(core_budget().affinity)"
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert pinned.stdout.strip() == "1"


def test_thread_times_count_a_busy_threads_cpu_time() -> None:
    ids: list[int] = []

    def spin() -> None:
        ids.append(threading.get_native_id())
        total = 0
        for i in range(3_000_000):
            total += i

    worker = threading.Thread(target=spin)
    worker.start()
    worker.join()
    # The thread has ended; its own schedstat is gone, so read a live one: this thread, before and after work.
    before = thread_times([threading.get_native_id()])
    spin()
    after = thread_times([threading.get_native_id()])
    assert (after - before).ran > 0.01
    assert after.waited >= before.waited
    assert thread_times().ran >= after.ran  # every thread of the process, this one included


def test_idle_time_counts_only_the_cpus_this_process_may_run_on(tmp_path: Path) -> None:
    # From the hostile review of #20: idle CPUs outside a cpuset (taskset, a container) looked like room to take a
    # thread back, so the governor would shed and restore once a second for ever.
    allowed = sorted(os.sched_getaffinity(0))
    outside = max(allowed) + 1
    lines = ["cpu  900 0 0 9000 900 0 0 0 0 0"]  # the total line is not read
    lines += [f"cpu{cpu} 10 0 0 {100 * (cpu + 1)} {cpu} 0 0 0 0 0" for cpu in [*allowed, outside]]
    (tmp_path / "stat").write_text("\n".join(lines) + "\nintr 1 2 3\n")
    expected = sum(100 * (cpu + 1) + cpu for cpu in allowed) / os.sysconf("SC_CLK_TCK")
    assert idle_cpu_seconds(proc=tmp_path) == pytest.approx(expected)
    (tmp_path / "stat").write_text("intr 1 2 3\n")
    assert idle_cpu_seconds(proc=tmp_path) is None
