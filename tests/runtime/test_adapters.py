"""The adapter manager on real llama.cpp: residency under a byte budget, LRU, pins, shared loads, refusals."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.errors import (
    AdapterNotFound,
    BudgetExceeded,
    IncompatibleAdapter,
    InvalidGGUF,
    InvalidName,
    InvalidTransition,
    RuntimeClosed,
)
from edge_runtime.gguf.info import read_info
from edge_runtime.profiles import load_profile
from edge_runtime.runtime.budget import adapter_resident_bytes
from edge_runtime.runtime.core import Runtime
from edge_runtime.runtime.engine import SamplingParams
from edge_runtime.runtime.requests import AdapterRequest
from edge_runtime.runtime.versions import AdapterVersion, VersionState

GREEDY = SamplingParams(max_tokens=6)


@pytest.fixture
def runtime(make_profile: Callable[..., Path], adapter_files: list[Path]) -> Iterator[Runtime]:
    rt = Runtime(load_profile(str(make_profile("adapters-test", budget_mb=1024))), ctx=512)
    for path in adapter_files:
        rt.adapters.add(path.stem, path)
    yield rt
    rt.close()


def fit_budget(runtime: Runtime, adapter_files: list[Path], count: int) -> None:
    """Give the manager room for exactly ``count`` of the test adapters."""
    runtime.adapters.budget_bytes = count * adapter_resident_bytes(adapter_files[0]) + 1024


def states(runtime: Runtime) -> dict[str, str]:
    return {a.name: a.state for a in runtime.adapters.list_adapters()}


def test_least_recently_used_adapter_is_evicted_first(runtime: Runtime, adapter_files: list[Path]) -> None:
    fit_budget(runtime, adapter_files, 2)
    runtime.adapters.ensure_resident("legal-review")
    runtime.adapters.ensure_resident("brand-voice")
    runtime.adapters.ensure_resident("legal-review")  # now brand-voice is the least recently used
    runtime.adapters.ensure_resident("json-extract")
    assert states(runtime) == {"legal-review": "resident", "brand-voice": "cached", "json-extract": "resident",
                               "summarise": "cached", "translate-fr": "cached"}
    assert runtime.adapters.resident_bytes == 2 * adapter_resident_bytes(adapter_files[0])
    assert runtime.adapters.stats.loads == 3 and runtime.adapters.stats.evictions == 1


def test_pinned_adapter_is_never_evicted(runtime: Runtime, adapter_files: list[Path]) -> None:
    fit_budget(runtime, adapter_files, 2)
    runtime.adapters.ensure_resident("legal-review")
    runtime.adapters.pin("legal-review")
    for name in ["brand-voice", "json-extract", "summarise", "translate-fr"]:
        runtime.adapters.ensure_resident(name)
        assert states(runtime)["legal-review"] == "resident"
    assert states(runtime)["translate-fr"] == "resident"


def test_adapter_in_use_is_never_evicted_and_a_full_budget_says_so(runtime: Runtime,
                                                                    adapter_files: list[Path]) -> None:
    fit_budget(runtime, adapter_files, 2)
    with runtime.adapters.lease([AdapterRequest("legal-review", 1.0), AdapterRequest("brand-voice", 1.0)]):
        assert states(runtime)["legal-review"] == "active"
        with pytest.raises(BudgetExceeded) as raised:
            runtime.adapters.ensure_resident("json-extract")
        assert raised.value.needed_bytes == adapter_resident_bytes(adapter_files[2])
        assert raised.value.evictable_bytes == 0
        assert "held by pinned or in-use adapters" in str(raised.value)
        assert runtime.adapters.evict("legal-review") is False
    assert states(runtime)["legal-review"] == "resident"
    assert runtime.adapters.ensure_resident("json-extract").state == "resident"


def test_adapter_larger_than_the_budget_is_refused_and_the_runtime_still_serves(runtime: Runtime) -> None:
    prompt = runtime.engine.tokenize("Hello")
    before = runtime.generate(prompt, GREEDY)[0].text
    runtime.adapters.budget_bytes = 1 << 20
    with pytest.raises(BudgetExceeded, match=r"needs 18\.\d MiB but the adapter budget is 1\.0 MiB"):
        runtime.generate(prompt, GREEDY, adapters=[AdapterRequest("legal-review", 1.0)])
    assert states(runtime)["legal-review"] == "cached"
    assert runtime.generate(prompt, GREEDY)[0].text == before


def test_concurrent_requests_for_one_adapter_share_one_load(runtime: Runtime) -> None:
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def request() -> None:
        try:
            barrier.wait()
            runtime.adapters.ensure_resident("summarise")
        except Exception as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert runtime.adapters.stats.loads == 1
    assert states(runtime)["summarise"] == "resident"


def test_adapter_for_another_base_is_refused_before_llama_cpp_sees_it(runtime: Runtime, adapter_files: list[Path],
                                                                      tmp_path: Path) -> None:
    original = adapter_files[0]
    fingerprint = read_info(original).base_fingerprint
    assert fingerprint is not None
    other = tmp_path / "other-base.gguf"
    other.write_bytes(original.read_bytes().replace(fingerprint.encode(), b"0" * 64))
    with pytest.raises(IncompatibleAdapter, match=r"converted for another base model \(fingerprint 000000000000"):
        runtime.adapters.add("other-base", other)
    assert "other-base" not in runtime.adapters.names()


def test_a_base_model_file_is_not_accepted_as_an_adapter(runtime: Runtime, base_model: Path) -> None:
    with pytest.raises(IncompatibleAdapter, match="is not a LoRA adapter"):
        runtime.adapters.add("base-as-adapter", base_model)


def test_unknown_adapter_fails_closed(runtime: Runtime) -> None:
    with pytest.raises(AdapterNotFound, match="unknown adapter 'nope'.*legal-review"):
        runtime.generate(runtime.engine.tokenize("Hi"), GREEDY, adapters=[AdapterRequest("nope", 1.0)])


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs", "a/b", "", ".hidden", "x\x00y", "a" * 129])
def test_unsafe_adapter_names_are_refused(runtime: Runtime, adapter_files: list[Path], name: str) -> None:
    with pytest.raises(InvalidName):
        runtime.adapters.add(name, adapter_files[0])


def test_an_adapter_version_refuses_illegal_transitions(adapter_files: list[Path]) -> None:
    version = AdapterVersion(name="x", path=adapter_files[0], sha256="0" * 64, size_bytes=1, resident_bytes=1)
    with pytest.raises(InvalidTransition, match="cannot go from cached to resident"):
        version.move_to(VersionState.RESIDENT)  # only through a load
    version.move_to(VersionState.LOADING)
    version.move_to(VersionState.RESIDENT)
    with pytest.raises(InvalidTransition, match="cannot go from resident to cached"):
        version.move_to(VersionState.CACHED)  # memory is only given back through FREEING
    version.move_to(VersionState.RETIRED)
    with pytest.raises(InvalidTransition, match="cannot go from retired to resident"):
        version.move_to(VersionState.RESIDENT)  # a replaced version never serves again
    version.move_to(VersionState.FREEING)
    version.move_to(VersionState.CACHED)
    assert not version.holds_memory


def test_every_version_in_memory_counts_against_the_budget(runtime: Runtime, adapter_files: list[Path]) -> None:
    one = adapter_resident_bytes(adapter_files[0])
    running = runtime.adapters.hold("legal-review", 1.0)
    runtime.adapters.replace("legal-review", adapter_files[1], sha256="ab" * 32)
    assert running.version.state is VersionState.RETIRED and runtime.adapters.resident_bytes == 2 * one
    runtime.adapters.release([running])
    assert running.version.state is VersionState.CACHED and runtime.adapters.resident_bytes == one


def test_more_than_four_composed_adapters_are_refused(runtime: Runtime) -> None:
    with pytest.raises(ValueError, match="at most 4 adapters"):
        runtime.generate(runtime.engine.tokenize("Hi"), GREEDY,
                         adapters=[AdapterRequest(n, 0.2) for n in runtime.adapters.names()])


def test_gpu_layers_without_offload_support_fall_back_to_cpu_with_a_notice(base_model: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    from edge_runtime.runtime.engine import Engine, EngineSettings

    with caplog.at_level("WARNING", logger="edge_runtime.runtime.engine"):
        engine = Engine(base_model, EngineSettings(n_ctx=256, n_gpu_layers=999))
    try:
        assert "cannot offload to a GPU; running all layers on the CPU" in caplog.text
        assert engine.generate(engine.tokenize("Hi"), SamplingParams(max_tokens=2)).completion_tokens == 2
    finally:
        engine.close()


def test_package_exports_the_runtime_lazily() -> None:
    import edge_runtime

    assert edge_runtime.Runtime is Runtime
    assert edge_runtime.SamplingParams is SamplingParams


def test_registering_the_same_content_twice_keeps_the_resident_copy(runtime: Runtime,
                                                                    adapter_files: list[Path]) -> None:
    runtime.adapters.ensure_resident("legal-review")
    again = runtime.adapters.add("legal-review", adapter_files[0])
    assert again.state == "resident" and runtime.adapters.stats.loads == 1
    with pytest.raises(InvalidTransition, match="cannot go from resident to replaced"):
        runtime.adapters.add("legal-review", adapter_files[1])  # other content while loaded: evict first


def test_a_new_version_takes_over_only_once_loaded_and_running_generations_finish_on_the_old(
        runtime: Runtime, adapter_files: list[Path]) -> None:
    prompt = runtime.engine.tokenize("Write one word:")
    old_text = runtime.generate(prompt, GREEDY, adapters=[AdapterRequest("legal-review", 1.0)])[0].text
    new_text = runtime.generate(prompt, GREEDY, adapters=[AdapterRequest("brand-voice", 1.0)])[0].text
    assert old_text != new_text  # the two files compute differently, so the switch is observable
    runtime.adapters.evict("brand-voice")
    one = adapter_resident_bytes(adapter_files[0])
    running = runtime.adapters.hold("legal-review", 1.0)  # a generation in flight on the old version

    updated = runtime.adapters.replace("legal-review", adapter_files[1], sha256="ab" * 32)

    assert (updated.sha256, updated.state) == ("ab" * 32, "resident")
    assert not running.handle.freed and runtime.adapters.resident_bytes == 2 * one  # old kept for its user
    assert runtime.generate(prompt, GREEDY, adapters=[AdapterRequest("legal-review", 1.0)])[0].text == new_text
    runtime.adapters.release([running])
    assert running.handle.freed and runtime.adapters.resident_bytes == one
    assert runtime.adapters.stats.evictions == 1  # brand-voice's; a replaced version is not an eviction


@pytest.mark.parametrize("damage", ["truncated-data", "other-base"])
def test_a_new_version_that_does_not_load_leaves_the_old_one_serving(runtime: Runtime, adapter_files: list[Path],
                                                                     tmp_path: Path, damage: str) -> None:
    prompt = runtime.engine.tokenize("Write one word:")
    before = runtime.generate(prompt, GREEDY, adapters=[AdapterRequest("legal-review", 1.0)])[0].text
    sha_before = runtime.adapters.info("legal-review").sha256
    bad = tmp_path / "bad.gguf"
    data = adapter_files[1].read_bytes()
    if damage == "truncated-data":
        bad.write_bytes(data[: len(data) - 4096])  # header intact, the last tensor short
    else:
        fingerprint = read_info(adapter_files[1]).base_fingerprint
        assert fingerprint is not None
        bad.write_bytes(data.replace(fingerprint.encode(), b"0" * 64))
    error, message = {"truncated-data": (InvalidGGUF, "run past the end of the file"),  # caught before llama.cpp
                      "other-base": (IncompatibleAdapter, "another base")}[damage]
    with pytest.raises(error, match=message):
        runtime.adapters.replace("legal-review", bad, sha256="cd" * 32)
    info = runtime.adapters.info("legal-review")
    assert (info.sha256, info.state) == (sha_before, "resident")
    assert runtime.adapters.resident_bytes == adapter_resident_bytes(adapter_files[0])
    assert runtime.generate(prompt, GREEDY, adapters=[AdapterRequest("legal-review", 1.0)])[0].text == before


def test_a_new_version_without_room_beside_an_in_use_old_one_waits(runtime: Runtime,
                                                                   adapter_files: list[Path]) -> None:
    fit_budget(runtime, adapter_files, 1)
    with runtime.adapters.lease([AdapterRequest("legal-review", 1.0)]):
        with pytest.raises(BudgetExceeded):
            runtime.adapters.replace("legal-review", adapter_files[1], sha256="ab" * 32)
        assert runtime.adapters.info("legal-review").state == "active"
    # Once idle, the old version may be evicted to make room: its file is kept until the new one has loaded.
    assert runtime.adapters.replace("legal-review", adapter_files[1], sha256="ab" * 32).state == "resident"


def test_requests_during_an_update_that_evicted_the_old_version_wait_for_the_new_one(
        runtime: Runtime, adapter_files: list[Path]) -> None:
    fit_budget(runtime, adapter_files, 1)  # room for one version: the idle old one is evicted for the new
    for round_ in range(5):
        runtime.adapters.ensure_resident("legal-review")
        new_sha = f"{round_:02d}" * 32
        errors: list[BaseException] = []
        served: list[str] = []

        def request(served: list[str] = served, errors: list[BaseException] = errors) -> None:
            try:
                with runtime.adapters.lease([AdapterRequest("legal-review", 1.0)]) as held:
                    served.append(held[0].sha256)
            except BaseException as exc:  # collected for the assertion below
                errors.append(exc)

        updater = threading.Thread(target=runtime.adapters.replace, args=("legal-review", adapter_files[round_ % 2]),
                                   kwargs={"sha256": new_sha})
        clients = [threading.Thread(target=request) for _ in range(3)]
        updater.start()
        for client in clients:
            client.start()
        for thread in [updater, *clients]:
            thread.join()
        assert errors == []  # never BudgetExceeded for the old version while the new one loads
        assert runtime.adapters.info("legal-review").sha256 == new_sha and len(served) == 3
        assert runtime.adapters.resident_bytes == adapter_resident_bytes(adapter_files[0])


def test_a_load_orphaned_by_an_update_counts_against_the_budget_until_freed(runtime: Runtime,
                                                                             adapter_files: list[Path]) -> None:
    one = adapter_resident_bytes(adapter_files[0])
    fit_budget(runtime, adapter_files, 2)
    real_load = runtime.engine.load_adapter
    old_loaded, let_go = threading.Event(), threading.Event()

    def gated_load(path: Path | str, *, content_id: str) -> Any:  # the real load, held before it reports back
        handle = real_load(path, content_id=content_id)
        if Path(path) == adapter_files[0] and not old_loaded.is_set():
            old_loaded.set()
            let_go.wait(10)
        return handle

    runtime.engine.load_adapter = gated_load  # type: ignore[method-assign]
    request = threading.Thread(target=runtime.adapters.ensure_resident, args=("legal-review",))
    request.start()
    assert old_loaded.wait(10)  # the old version is in memory, its load not finished
    runtime.adapters.replace("legal-review", adapter_files[1], sha256="ab" * 32)  # the old load is now an orphan
    runtime.adapters.ensure_resident("brand-voice")  # room only by evicting the new version, not beside the orphan
    accounted = runtime.adapters.resident_bytes
    resident = [a.name for a in runtime.adapters.list_adapters() if a.state == "resident"]
    let_go.set()
    request.join()
    assert resident == ["brand-voice"] and accounted == 2 * one  # brand-voice + the orphan still in memory
    # The orphan was freed once its load returned, and its request looked again: it got the new version.
    assert runtime.adapters.resident_bytes == 2 * one and runtime.adapters.stats.loads == 3
    info = runtime.adapters.info("legal-review")
    assert (info.state, info.sha256) == ("resident", "ab" * 32)


def gate_free(runtime: Runtime, file: Path) -> tuple[threading.Event, threading.Event]:
    """Hold the real engine's free of ``file``'s adapter until released (forces an interleaving)."""
    real_free, entered, go = runtime.engine.free_adapter, threading.Event(), threading.Event()

    def gated_free(handle: Any) -> None:
        if handle.path == file and not entered.is_set():
            entered.set()
            go.wait(10)
        real_free(handle)

    runtime.engine.free_adapter = gated_free  # type: ignore[method-assign]
    return entered, go


def test_a_replace_overtaken_by_a_newer_one_still_reports_success(runtime: Runtime, adapter_files: list[Path]) -> None:
    # Regression (review): T1's replace switched, then froze freeing the old version; T2's replace switched again;
    # T1 then raised "cannot go from closed to replaced" though nothing was closed.
    runtime.adapters.ensure_resident("legal-review")
    entered, go = gate_free(runtime, adapter_files[0])
    outcome: list[object] = []
    first = threading.Thread(target=lambda: outcome.append(
        runtime.adapters.replace("legal-review", adapter_files[1], sha256="22" * 32)))
    first.start()
    assert entered.wait(10)
    assert runtime.adapters.replace("legal-review", adapter_files[2], sha256="33" * 32).sha256 == "33" * 32
    go.set()
    first.join(10)
    assert len(outcome) == 1 and getattr(outcome[0], "sha256", None) == "33" * 32


def test_a_name_can_be_re_pointed_once_its_versions_left_service(runtime: Runtime, adapter_files: list[Path]) -> None:
    # Regression (review): a retired version still finishing a generation blocked add() though the name was cached.
    running = runtime.adapters.hold("legal-review", 1.0)
    runtime.adapters.replace("legal-review", adapter_files[1], sha256="ab" * 32)
    assert runtime.adapters.evict("legal-review")
    info = runtime.adapters.add("legal-review", adapter_files[2])
    assert info.state == "cached" and info.sha256 != "ab" * 32
    assert runtime.adapters.resident_bytes == adapter_resident_bytes(adapter_files[0])  # the retired one, in use
    runtime.adapters.release([running])
    assert runtime.adapters.resident_bytes == 0


def test_after_close_a_request_fails_at_once_and_nothing_stays_counted(make_profile: Callable[..., Path],
                                                                        adapter_files: list[Path]) -> None:
    rt = Runtime(load_profile(str(make_profile("closing", budget_mb=1024))), ctx=256)
    rt.adapters.add("legal-review", adapter_files[0])
    rt.adapters.ensure_resident("legal-review")
    rt.adapters.close()
    try:
        assert rt.adapters.stats.evictions == 1 and rt.adapters.resident_bytes == 0
        with pytest.raises(RuntimeClosed):  # it used to reload the file in a loop, forever
            rt.adapters.hold("legal-review", 1.0)
    finally:
        rt.engine.close()


def test_a_hostile_file_in_an_adapters_folder_is_reported_and_the_rest_served(runtime: Runtime, tmp_path: Path,
                                                                               adapter_files: list[Path]) -> None:
    import struct

    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "good.gguf").write_bytes(adapter_files[0].read_bytes())
    nesting = struct.pack("<Q", 1) + b"x" + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 50_000
    (folder / "nested.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + nesting)  # was RecursionError
    added, refused = runtime.adapters.add_directory(folder)
    assert [a.name for a in added] == ["good"] and list(refused) == ["nested.gguf"]
    assert isinstance(refused["nested.gguf"], InvalidGGUF) and "nested deeper" in str(refused["nested.gguf"])
    assert runtime.generate(runtime.engine.tokenize("Hi"), GREEDY,
                            adapters=[AdapterRequest("good", 1.0)])[1][0].name == "good"


def test_a_request_waits_for_a_load_under_way_instead_of_a_spurious_507(runtime: Runtime,
                                                                        adapter_files: list[Path]) -> None:
    # Regression: with room for one adapter, a request arriving while another adapter loaded got BudgetExceeded
    # (the loading bytes count but cannot be evicted) though evicting it afterwards makes room.
    fit_budget(runtime, adapter_files, 1)
    real_load, loading, go = runtime.engine.load_adapter, threading.Event(), threading.Event()

    def gated_load(path: Path | str, *, content_id: str) -> Any:
        if Path(path) == adapter_files[0]:
            loading.set()
            go.wait(10)
        return real_load(path, content_id=content_id)

    runtime.engine.load_adapter = gated_load  # type: ignore[method-assign]
    errors: list[BaseException] = []
    first = threading.Thread(target=runtime.adapters.ensure_resident, args=("legal-review",))
    first.start()
    assert loading.wait(10)
    second = threading.Thread(target=lambda: errors.extend(_catch(runtime.adapters.ensure_resident, "brand-voice")))
    second.start()
    go.set()
    first.join(20)
    second.join(20)
    assert errors == [] and states(runtime)["brand-voice"] == "resident"


def _catch(function: Callable[..., Any], *args: Any) -> list[BaseException]:
    try:
        function(*args)
    except BaseException as exc:  # collected for the assertion
        return [exc]
    return []


def test_a_file_replaced_on_disk_is_never_served_under_the_old_digest(runtime: Runtime, tmp_path: Path,
                                                                      adapter_files: list[Path]) -> None:
    # Regression: after `mv other.gguf legal.gguf`, the next load served the new bytes as the registered sha256.
    served = tmp_path / "legal.gguf"
    served.write_bytes(adapter_files[0].read_bytes())
    registered = runtime.adapters.add("legal", served).sha256
    os.utime(served)  # touched, same bytes: still served
    assert runtime.adapters.ensure_resident("legal").state == "resident" and runtime.adapters.evict("legal")
    replacement = tmp_path / "incoming.gguf"
    replacement.write_bytes(adapter_files[1].read_bytes())
    replacement.replace(served)
    with pytest.raises(InvalidGGUF, match=f"changed on disk since it was registered as {registered[:12]}"):
        runtime.adapters.ensure_resident("legal")
    assert runtime.adapters.info("legal").state == "cached" and runtime.adapters.resident_bytes == 0


def test_folders_fifos_and_devices_named_gguf_are_refused_without_reading_them(runtime: Runtime, tmp_path: Path,
                                                                               adapter_files: list[Path]) -> None:
    # Regression: a FIFO hung the rescan forever, a folder or a dangling link crashed it (and a restart).
    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "dir.gguf").mkdir()
    os.mkfifo(folder / "fifo.gguf")
    (folder / "zero.gguf").symlink_to("/dev/zero")
    (folder / "dangling.gguf").symlink_to(tmp_path / "nowhere")
    (folder / "good.gguf").write_bytes(adapter_files[0].read_bytes())
    added, refused = runtime.adapters.add_directory(folder)
    assert [a.name for a in added] == ["good"]
    assert sorted(refused) == ["dangling.gguf", "dir.gguf", "fifo.gguf", "zero.gguf"]
    assert all(isinstance(e, InvalidGGUF) for e in refused.values())


def test_a_file_still_being_copied_is_not_registered_and_a_folder_in_its_place_is_a_typed_error(
        runtime: Runtime, adapter_files: list[Path], tmp_path: Path) -> None:
    partial = tmp_path / "copying.gguf"
    partial.write_bytes(adapter_files[0].read_bytes()[:3_000_000])  # a rescan in the middle of a copy
    with pytest.raises(InvalidGGUF, match="run past the end of the file"):
        runtime.adapters.add("copying", partial)
    assert "copying" not in runtime.adapters.names()

    replaced = tmp_path / "replaced.gguf"
    replaced.write_bytes(adapter_files[1].read_bytes())
    runtime.adapters.add("replaced", replaced)
    replaced.unlink()
    replaced.mkdir()  # cached, not resident: its next load finds a folder (was IsADirectoryError, a 500)
    with pytest.raises(InvalidGGUF, match="not a regular file"):
        runtime.adapters.ensure_resident("replaced")
    prompt = runtime.engine.tokenize("Hello")
    assert runtime.generate(prompt, SamplingParams(max_tokens=2))[0].completion_tokens > 0  # still serving


def test_rescanning_a_folder_reads_no_file_that_did_not_change(tmp_path: Path, make_profile: Callable[..., Path],
                                                               adapter_files: list[Path]) -> None:
    # Issue 18 item 14: every load of an unknown name re-hashed all of --adapters-dir (300 MB: 1.1 s per request).
    import shutil
    import sys

    from edge_runtime.files import file_sha256

    folder = tmp_path / "adapters"
    folder.mkdir()
    for path in adapter_files[:2]:
        shutil.copy(path, folder / path.name)
    rt = Runtime(load_profile(str(make_profile("rescan-test", budget_mb=1024))), ctx=512)
    try:
        first, _ = rt.adapters.add_directory(folder)
        opened: list[str] = []
        watching = [True]

        def hook(event: str, args: tuple[Any, ...]) -> None:
            if watching[0] and event == "open" and str(args[0]).startswith(str(folder)):
                opened.append(str(args[0]))

        sys.addaudithook(hook)
        try:
            again, refused = rt.adapters.add_directory(folder)
            shutil.copy(adapter_files[2], folder / adapter_files[0].name)  # one file changes: only it is read
            changed, _ = rt.adapters.add_directory(folder)
        finally:
            watching[0] = False
        assert refused == {} and [a.sha256 for a in again] == [a.sha256 for a in first]
        assert set(opened) == {str(folder / adapter_files[0].name)}
        now = {a.name: a.sha256 for a in changed}
        assert now[adapter_files[0].stem] == file_sha256(adapter_files[2]).hexdigest()
    finally:
        rt.close()


def test_an_adapter_for_another_base_is_named_as_such_not_as_unknown(
        tmp_path: Path, make_profile: Callable[..., Path], adapter_files: list[Path],
        gemma_adapter_files: list[Path]) -> None:
    # Issue 18 item 17: it showed as "unknown adapter ... Known adapters: none" (HTTP and --preload).
    import shutil

    folder = tmp_path / "adapters"
    folder.mkdir()
    shutil.copy(adapter_files[0], folder / "mine.gguf")
    shutil.copy(gemma_adapter_files[0], folder / "gemmas.gguf")
    rt = Runtime(load_profile(str(make_profile("other-base-test", budget_mb=1024))), ctx=512)
    try:
        _, refused = rt.adapters.add_directory(folder)
        assert list(refused) == ["gemmas.gguf"]
        with pytest.raises(AdapterNotFound) as missing:
            rt.adapters.ensure_resident("gemmas")
        assert "adapter 'gemmas' is not served" in str(missing.value)
        assert "converted for another base model" in str(missing.value) and "Known adapters: mine" in str(missing.value)
        assert rt.adapters.refusal("mine") is None and rt.adapters.refusal("never-seen") is None
    finally:
        rt.close()
