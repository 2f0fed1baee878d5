"""Device profiles: the shipped TOML files, `auto`, loading by name, alias or path, validation, and the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner

from edge_runtime import profiles
from edge_runtime.cli import main
from edge_runtime.cores import core_budget
from edge_runtime.errors import InvalidProfile, ProfileNotFound
from edge_runtime.profiles import DEFAULT_PROFILE, DeviceProfile, auto_profile, list_profiles, load_profile

SHIPPED_DIR = Path(str(resources.files("device_profiles")))

# name: (ram_mb, runtime_budget_mb, adapter_cache_mb, threads, gpu_layers, ctx, max_download_kbps, metered)
SHIPPED = {
    "jetson-orin-nano-8gb": (8192, 3072, 4096, 4, 999, 4096, 0, False),
    "jetson-orin-nx-16gb": (16384, 8192, 8192, 6, 999, 8192, 0, False),
    "jetson-agx-orin-64gb": (65536, 32768, 32768, 8, 999, 16384, 0, False),
    "raspberry-pi-5-8gb": (8192, 4096, 4096, 3, 0, 2048, 0, False),
    "phone-8gb": (8192, 2560, 2048, 4, 0, 2048, 0, True),
    "phone-4gb": (4096, 1280, 1024, 2, 0, 2048, 0, True),
    "drone-companion-4gb": (4096, 1536, 1024, 2, 0, 1024, 256, True),
    "drone-voxl2-8gb": (8192, 3072, 4096, 3, 0, 2048, 2048, True),
}

VALID: dict[str, Any] = {
    "name": "my-board",
    "description": "A test board",
    "aliases": ["board"],
    "memory": {"ram_mb": 4096, "runtime_budget_mb": 2048},
    "storage": {"adapter_cache_mb": 512},
    "compute": {"threads": 4, "gpu_layers": 0, "ctx": 2048, "batch": 512, "kv_type": "f16"},
    "network": {"max_download_kbps": 0, "metered": False},
}

VALID_TOML = """\
name = "my-board"
description = "A test board"
aliases = ["board"]

[memory]
ram_mb = 4096
runtime_budget_mb = 2048

[storage]
adapter_cache_mb = 512

[compute]
threads = 4
gpu_layers = 0
ctx = 2048
batch = 512
kv_type = "f16"

[network]
max_download_kbps = 0
metered = false
"""


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_profile_loads_with_its_vendor_specs_and_budgets(name: str) -> None:
    profile = load_profile(name)
    ram, budget, cache, threads, gpu_layers, ctx, kbps, metered = SHIPPED[name]
    assert profile.name == name
    assert profile.source == str(SHIPPED_DIR / f"{name}.toml")
    assert (profile.memory.ram_mb, profile.memory.runtime_budget_mb) == (ram, budget)
    assert profile.storage.adapter_cache_mb == cache
    assert (profile.compute.threads, profile.compute.gpu_layers, profile.compute.ctx) == (threads, gpu_layers, ctx)
    assert (profile.network.max_download_kbps, profile.network.metered) == (kbps, metered)
    assert profile.compute.kv_type == "q8_0"  # thread-invariant: the governor may shed threads
    assert profile.compute.batch <= profile.compute.ctx
    assert profile.description.strip()


# Devices that run other work (a flight stack, a perception pipeline, ROS 2, the app that calls us) leave cores
# to it; with its q8_0 KV cache the engine may run fewer threads while the device is busy, with the same answers.
RESERVED = {"drone-companion-4gb": 2, "drone-voxl2-8gb": 1, "jetson-orin-nano-8gb": 2, "jetson-orin-nx-16gb": 2,
            "jetson-agx-orin-64gb": 4, "raspberry-pi-5-8gb": 1}


@pytest.mark.parametrize("name", sorted(RESERVED))
def test_profiles_of_devices_that_run_other_work_leave_cores_to_it(name: str) -> None:
    compute = load_profile(name).compute
    assert compute.reserve_cores == RESERVED[name]
    text = (SHIPPED_DIR / f"{name}.toml").read_text()
    assert f"Up to {compute.threads} threads: fewer while the device is busy" in text or "reserve_cores keeps" in text
    assert compute.kv_type == "q8_0"  # what lets the engine shed threads without changing an answer


@pytest.mark.parametrize(("threads", "reserve", "usable", "runs"), [
    (4, 2, 6, 4), (4, 2, 2, 1), (6, 0, 2, 2), (2, 2, 4, 2), (3, 1, 3, 2), (1, 0, 8, 1), (8, 4, 1, 1)])
def test_threads_never_exceed_usable_cores_minus_the_reserved_ones(threads: int, reserve: int, usable: int,
                                                                   runs: int) -> None:
    data = {**VALID, "compute": {**VALID["compute"], "threads": threads, "reserve_cores": reserve}}
    assert DeviceProfile.from_dict(data, source="t").compute.threads_for(usable) == runs


def test_reserve_cores_is_optional_and_round_trips_through_toml(tmp_path: Path) -> None:
    assert DeviceProfile.from_dict(VALID, source="t").compute.reserve_cores == 0
    jetson = load_profile("jetson")
    path = tmp_path / "copy.toml"
    path.write_text(jetson.to_toml())
    assert load_profile(str(path)).compute == jetson.compute


def test_auto_counts_the_cores_of_the_affinity_mask() -> None:
    code = "from edge_runtime.profiles import auto_profile; print(auto_profile().compute.threads)"
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env={**os.environ, "PYTHONPATH": str(SHIPPED_DIR.parent)})
    assert pinned.stdout.strip() == "1"


def test_the_shipped_set_is_exactly_the_documented_devices_plus_auto() -> None:
    assert [profile.name for profile in list_profiles()] == ["auto", *sorted(SHIPPED)]
    assert sorted(path.stem for path in SHIPPED_DIR.glob("*.toml")) == sorted(SHIPPED)


def test_every_shipped_profile_explains_its_budgets_in_comments() -> None:
    for path in SHIPPED_DIR.glob("*.toml"):
        comments = [line for line in path.read_text().splitlines() if line.lstrip().startswith("#")]
        assert len(comments) >= 6, f"{path.name} documents too little"


@pytest.mark.parametrize(("alias", "name"), [
    ("jetson", "jetson-orin-nano-8gb"), ("orin-nx", "jetson-orin-nx-16gb"), ("agx-orin", "jetson-agx-orin-64gb"),
    ("rpi5", "raspberry-pi-5-8gb"), ("pi5", "raspberry-pi-5-8gb"), ("phone", "phone-8gb"),
    ("drone", "drone-companion-4gb"), ("voxl2", "drone-voxl2-8gb"),
    # The board names without their memory size, as users type them (`edge-rt serve --profile jetson-orin-nano`).
    ("jetson-orin-nano", "jetson-orin-nano-8gb"), ("orin-nano", "jetson-orin-nano-8gb"),
    ("jetson-orin-nx", "jetson-orin-nx-16gb"), ("jetson-agx-orin", "jetson-agx-orin-64gb"),
    ("raspberry-pi-5", "raspberry-pi-5-8gb"),
])
def test_aliases_load_their_profile(alias: str, name: str) -> None:
    assert load_profile(alias) == load_profile(name)
    assert alias in load_profile(name).aliases


def test_byte_properties_convert_mib_and_kbps() -> None:
    jetson = load_profile("jetson")
    assert jetson.ram_bytes == 8192 * 2**20
    assert jetson.runtime_budget_bytes == 3072 * 2**20 == 3_221_225_472
    assert jetson.adapter_cache_bytes == 4096 * 2**20
    assert jetson.max_download_bytes_per_second is None
    assert load_profile("drone").max_download_bytes_per_second == 256_000 // 8 == 32_000
    assert jetson.names == ("jetson-orin-nano-8gb", "jetson", "jetson-orin-nano", "orin-nano")


def test_auto_is_this_machine_as_psutil_measures_it() -> None:
    profile = auto_profile()
    ram_mb = psutil.virtual_memory().total // 2**20
    assert DEFAULT_PROFILE == "auto"
    assert profile.name == "auto" and profile.aliases == ()
    assert profile.memory.ram_mb == ram_mb
    assert profile.memory.runtime_budget_mb == ram_mb // 2
    usable = min(psutil.cpu_count(logical=False) or psutil.cpu_count(), core_budget().usable)
    assert profile.compute.threads == usable and profile.compute.reserve_cores == 0
    # q8_0: llama.cpp's results do not depend on the thread count with it, so the engine may shed threads
    assert (profile.compute.ctx, profile.compute.batch, profile.compute.kv_type) == (2048, 512, "q8_0")
    assert profile.compute.gpu_layers == 0
    assert profile.storage.adapter_cache_mb == 2048
    assert (profile.network.max_download_kbps, profile.network.metered) == (0, False)
    assert load_profile("auto") == profile


def test_a_toml_path_loads_and_records_where_it_came_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(VALID_TOML)
    profile = load_profile(str(path))
    assert profile == DeviceProfile.from_dict(VALID, source=str(path))
    assert profile.source == str(path)
    assert (profile.name, profile.aliases, profile.memory.runtime_budget_mb) == ("my-board", ("board",), 2048)

    monkeypatch.chdir(tmp_path)
    assert load_profile("mine.toml").memory.ram_mb == 4096  # a relative path: recognised by its suffix


def test_every_profile_round_trips_through_its_toml_output(tmp_path: Path) -> None:
    for profile in list_profiles():
        path = tmp_path / f"{profile.name}.toml"
        path.write_text(profile.to_toml())
        assert load_profile(str(path)) == dataclasses.replace(profile, source=str(path))


def test_unknown_names_list_the_available_ones() -> None:
    with pytest.raises(ProfileNotFound) as caught:
        load_profile("jetson-nano")
    error = caught.value
    assert isinstance(error, LookupError)
    assert (error.exit_code, error.http_status) == (2, 404)
    assert error.available == ("auto", *sorted(SHIPPED))
    assert "'jetson-nano'" in str(error) and "jetson-orin-nano-8gb" in str(error) and "auto" in str(error)


@pytest.mark.parametrize("name", ["..", "__init__", "device_profiles", "JETSON", ""])
def test_names_are_looked_up_never_opened_as_files(name: str) -> None:
    with pytest.raises(ProfileNotFound):
        load_profile(name)


def test_a_missing_profile_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ProfileNotFound, match="no such profile file") as caught:
        load_profile(str(tmp_path / "absent.toml"))
    assert caught.value.name == str(tmp_path / "absent.toml")


def _with(path: str, value: Any) -> dict[str, Any]:
    """VALID with the dotted key ``path`` set to ``value`` (or removed when value is ``_DELETE``)."""
    data = copy.deepcopy(VALID)
    *tables, key = path.split(".")
    target = data
    for table in tables:
        target = target[table]
    if value is _DELETE:
        del target[key]
    else:
        target[key] = value
    return data


_DELETE = object()

RULES = [
    # (dotted key, bad value, the field the error must name, words the message must contain)
    ("colour", "red", "colour", "unknown key"),
    ("memory.ram_gb", 8, "memory.ram_gb", "did you mean 'ram_mb'"),
    ("gpu", {"layers": 1}, "gpu", "unknown key"),
    ("memory.ram_mb", "8GB", "memory.ram_mb", "must be an integer, not a string"),
    ("memory.ram_mb", True, "memory.ram_mb", "must be an integer, not a boolean"),
    ("memory.ram_mb", 8192.0, "memory.ram_mb", "must be an integer, not a float"),
    ("memory.ram_mb", 0, "memory.ram_mb", "at least 1"),
    ("memory.ram_mb", _DELETE, "memory.ram_mb", "missing"),
    ("memory.runtime_budget_mb", 4097, "memory.runtime_budget_mb", "exceeds memory.ram_mb = 4096"),
    ("memory.runtime_budget_mb", -1, "memory.runtime_budget_mb", "at least 1"),
    ("memory", 4096, "memory", "must be a table, not an integer"),
    ("storage", _DELETE, "storage", "missing"),
    ("storage.adapter_cache_mb", 0, "storage.adapter_cache_mb", "at least 1"),
    ("compute.threads", 0, "compute.threads", "at least 1"),
    ("compute.threads", False, "compute.threads", "not a boolean"),
    ("compute.gpu_layers", -1, "compute.gpu_layers", "at least 0"),
    ("compute.reserve_cores", -1, "compute.reserve_cores", "at least 0"),
    ("compute.reserve_cores", 1.5, "compute.reserve_cores", "must be an integer, not a float"),
    ("compute.ctx", 0, "compute.ctx", "at least 256"),
    ("compute.parallel", 0, "compute.parallel", "from 1 to 8"),
    ("compute.parallel", 9, "compute.parallel", "from 1 to 8"),
    ("compute.parallel", "many", "compute.parallel", 'must be an integer or "auto"'),
    ("compute.parallel", True, "compute.parallel", 'must be an integer or "auto"'),
    ("compute.ctx", 1000, "compute.ctx", "multiple of 256"),
    ("compute.batch", 0, "compute.batch", "at least 1"),
    ("compute.batch", 4096, "compute.batch", "must not exceed compute.ctx = 2048"),
    ("compute.kv_type", "q5_1", "compute.kv_type", "one of f32, f16, q8_0, q4_0"),
    ("compute.kv_type", 16, "compute.kv_type", "must be a string"),
    ("network.max_download_kbps", -5, "network.max_download_kbps", "at least 0"),
    ("network.metered", "no", "network.metered", "true or false"),
    ("network.metered", 0, "network.metered", "true or false"),
    ("name", "", "name", "must not be empty"),
    ("name", _DELETE, "name", "missing"),
    ("name", "Jetson Nano", "name", "must match"),
    ("name", "../etc/passwd", "name", "must match"),
    ("name", "a" * 65, "name", "must match"),
    ("description", 5, "description", "must be a string"),
    ("description", " ", "description", "must not be empty"),
    ("aliases", "board", "aliases", "must be an array"),
    ("aliases", ["Bad Alias"], "aliases", "must match"),
    ("aliases", ["board", "board"], "aliases", "lists this name twice"),
    ("aliases", ["my-board"], "aliases", "repeats the profile's name"),
]


@pytest.mark.parametrize(("key", "value", "field", "words"), RULES, ids=[f"{r[0]}={r[1]!r}"[:40] for r in RULES])
def test_each_validation_rule_names_the_file_and_the_field(key: str, value: Any, field: str, words: str) -> None:
    with pytest.raises(InvalidProfile) as caught:
        DeviceProfile.from_dict(_with(key, value), source="boards/mine.toml")
    error = caught.value
    assert error.field == field and error.source == "boards/mine.toml"
    assert str(error).startswith(f"boards/mine.toml: {field}")
    assert words in str(error)
    assert isinstance(error, ValueError) and (error.exit_code, error.http_status) == (2, 400)


def test_a_bad_value_in_a_file_names_that_file(tmp_path: Path) -> None:
    path = tmp_path / "board.toml"
    path.write_text(VALID_TOML.replace("ram_mb = 4096", 'ram_mb = "8GB"'))
    with pytest.raises(InvalidProfile) as caught:
        load_profile(str(path))
    assert (caught.value.source, caught.value.field, caught.value.value) == (str(path), "memory.ram_mb", "8GB")
    assert str(caught.value).startswith(f"{path}: memory.ram_mb = '8GB': must be an integer")


def test_malformed_toml_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\n[memory\nram_mb = 1\n')
    with pytest.raises(InvalidProfile) as caught:
        load_profile(str(path))
    assert caught.value.field is None
    assert str(caught.value).startswith(f"{path}: not valid TOML")
    assert "line 2, column 8" in str(caught.value)


def test_a_profile_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(VALID_TOML.replace("A test board", "Caf\xe9 board").encode("latin-1"))
    with pytest.raises(InvalidProfile, match="not UTF-8"):
        load_profile(str(path))


def _copy_shipped(directory: Path, *names: str) -> None:
    directory.mkdir()
    for name in names:
        shutil.copy(SHIPPED_DIR / f"{name}.toml", directory / f"{name}.toml")


def test_an_alias_claimed_by_two_shipped_profiles_is_refused(tmp_path: Path) -> None:
    _copy_shipped(tmp_path / "set", "jetson-orin-nano-8gb", "jetson-orin-nx-16gb")
    nx = tmp_path / "set" / "jetson-orin-nx-16gb.toml"
    nx.write_text(nx.read_text().replace('aliases = ["orin-nx", ', 'aliases = ["orin-nx", "jetson", '))
    with pytest.raises(InvalidProfile) as caught:
        profiles._load_directory(tmp_path / "set")
    assert (caught.value.source, caught.value.field, caught.value.value) == (str(nx), "aliases", "jetson")
    assert "already used by profile 'jetson-orin-nano-8gb'" in str(caught.value)


def test_a_shipped_profile_may_not_claim_auto_or_another_file_name(tmp_path: Path) -> None:
    _copy_shipped(tmp_path / "auto-alias", "phone-4gb")
    phone = tmp_path / "auto-alias" / "phone-4gb.toml"
    phone.write_text(phone.read_text().replace("aliases = []", 'aliases = ["auto"]'))
    with pytest.raises(InvalidProfile, match="already used by the built-in auto profile"):
        profiles._load_directory(tmp_path / "auto-alias")

    _copy_shipped(tmp_path / "renamed", "phone-4gb")
    (tmp_path / "renamed" / "phone-4gb.toml").rename(tmp_path / "renamed" / "phone.toml")
    with pytest.raises(InvalidProfile, match="must match the file name phone.toml") as caught:
        profiles._load_directory(tmp_path / "renamed")
    assert caught.value.field == "name"


# -- the CLI ---------------------------------------------------------------------------------------------------------

def test_cli_profiles_lists_every_profile_with_its_budgets() -> None:
    result = CliRunner().invoke(main, ["profiles"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["name", "aliases", "ram", "budget", "cache", "ctx", "parallel", "gpu", "layers",
                                "download"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == ["auto", *sorted(SHIPPED)]
    assert rows["jetson-orin-nano-8gb"].split() == [
        "jetson-orin-nano-8gb", "jetson,", "jetson-orin-nano,", "orin-nano", "8192", "MiB", "3072", "MiB", "4096",
        "MiB", "4096", "2", "999", "unlimited"]
    assert rows["auto"].split()[9] == "auto" and rows["phone-4gb"].split()[9] == "1"  # as the README's table says
    assert rows["drone-companion-4gb"].endswith("256 kbps, metered")
    assert "rpi5, pi5, raspberry-pi-5" in rows["raspberry-pi-5-8gb"]


def test_cli_profiles_show_json_by_alias() -> None:
    result = CliRunner().invoke(main, ["profiles", "show", "jetson", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["name"] == "jetson-orin-nano-8gb" and shown["aliases"] == ["jetson", "jetson-orin-nano", "orin-nano"]
    assert shown["memory"] == {"ram_mb": 8192, "runtime_budget_mb": 3072}
    assert shown["storage"] == {"adapter_cache_mb": 4096}
    assert shown["compute"] == {"threads": 4, "gpu_layers": 999, "ctx": 4096, "batch": 512, "kv_type": "q8_0",
                                "parallel": 2, "reserve_cores": 2}
    assert shown["network"] == {"max_download_kbps": 0, "metered": False}
    assert shown["source"].endswith("jetson-orin-nano-8gb.toml")


def test_cli_profiles_show_prints_toml_a_user_can_start_from(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["profiles", "show", "drone-companion-4gb"])
    assert result.exit_code == 0, result.output
    assert 'name = "drone-companion-4gb"' in result.output
    assert "max_download_kbps = 256\nmetered = true" in result.output
    path = tmp_path / "my-drone.toml"
    path.write_text(result.output.replace('name = "drone-companion-4gb"', 'name = "my-drone"')
                    .replace('aliases = ["drone"]', "aliases = []"))
    mine = CliRunner().invoke(main, ["profiles", "show", str(path), "--json"])
    assert mine.exit_code == 0, mine.output
    assert json.loads(mine.output)["name"] == "my-drone"
    assert json.loads(mine.output)["compute"]["ctx"] == 1024


def test_cli_profiles_show_reports_errors_with_exit_code_2(tmp_path: Path) -> None:
    unknown = CliRunner().invoke(main, ["profiles", "show", "nano"])
    assert unknown.exit_code == 2
    assert "error: 'nano': no such device profile" in unknown.output and "jetson-orin-nano-8gb" in unknown.output

    path = tmp_path / "bad.toml"
    path.write_text(VALID_TOML.replace("ctx = 2048", "ctx = 2000"))
    invalid = CliRunner().invoke(main, ["profiles", "show", str(path)])
    assert invalid.exit_code == 2
    assert f"error: {path}: compute.ctx = 2000: must be a multiple of 256" in invalid.output


def test_parallel_is_auto_unless_a_profile_says_and_round_trips_through_toml(tmp_path: Path) -> None:
    assert DeviceProfile.from_dict(_with("compute.parallel", "auto"), source="x").compute.parallel is None
    four = DeviceProfile.from_dict(_with("compute.parallel", 4), source="x")
    assert four.compute.parallel == 4
    path = tmp_path / "four.toml"
    path.write_text(four.to_toml())
    assert load_profile(str(path)).compute == four.compute
    assert [p.compute.parallel for p in (load_profile("phone-4gb"), load_profile("drone"), load_profile("jetson"),
                                          load_profile("orin-nx"))] == [1, 1, 2, 4]
