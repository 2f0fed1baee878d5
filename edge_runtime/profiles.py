"""Device profiles: what a device has (RAM, cores, GPU, link) and what edge-rt may use of it.

A profile is a TOML file (one per device ships in ``device_profiles/``), or ``auto``, measured from this machine
with psutil when it is loaded. Every ``*_mb`` key is in MiB (2**20 bytes). Files are checked once, here: an
unknown key, a wrong type or an impossible value raises ``InvalidProfile`` naming the file and the dotted key.
Names and aliases are looked up among the shipped profiles, never turned into paths; only a value that contains a
path separator or ends in ``.toml`` is read as a file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import psutil

from edge_runtime.cores import core_budget
from edge_runtime.errors import FileTooLarge, InvalidProfile, ProfileNotFound
from edge_runtime.files import read_bounded

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

__all__ = [
    "AUTO",
    "DEFAULT_PROFILE",
    "KV_TYPES",
    "MAX_PARALLEL",
    "NAME_PATTERN",
    "ComputeSpec",
    "DeviceProfile",
    "MemorySpec",
    "NetworkSpec",
    "StorageSpec",
    "auto_profile",
    "list_profiles",
    "load_profile",
]

AUTO = "auto"
DEFAULT_PROFILE = AUTO
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
KV_TYPES = ("f32", "f16", "q8_0", "q4_0")
MIB = 2**20
MAX_PROFILE_BYTES = 1 << 20
# llama.cpp pads the KV cache to 256 cells with flash attention (32 without): a context of whole 256-token blocks
# is exactly what it allocates either way, so the budget planner's KV formula needs no rounding of its own.
CTX_MULTIPLE = 256
# `auto` cannot know what else runs on this machine: it claims half of RAM for edge-rt and leaves the other half
# to the OS, the page cache and other processes.
AUTO_BUDGET_FRACTION = 0.5
# 2 GiB holds 20-200 adapters of 10-100 MB: the working set of a device, not a mirror of the whole catalogue.
AUTO_ADAPTER_CACHE_MB = 2048
AUTO_CTX = 2048
AUTO_BATCH = 512
# Sequences one context decodes together: beyond 8 a CPU gains little (llama-batched-bench, 2 cores: 2.1x at 8).
MAX_PARALLEL = 8

_NAME = re.compile(NAME_PATTERN)
_PROFILE_PACKAGE = "device_profiles"


class _Section(Protocol):
    """A dataclass that reads one TOML table: ``[memory]``, ``[compute]``, ..."""

    SECTION: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, Any]]


class _Table:
    """One TOML table of a profile: typed getters that name ``source`` and the dotted key in every error."""

    def __init__(self, data: object, *, source: str, prefix: str, keys: tuple[str, ...]) -> None:
        self.source = source
        self.prefix = prefix
        if not isinstance(data, Mapping):
            raise InvalidProfile(source, prefix or None, f"must be a table, not {_toml_type(data)}", value=data)
        self.data: Mapping[str, object] = data
        for key in data:
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise InvalidProfile(source, self.field(key), f"unknown key{hint}; allowed keys: {', '.join(keys)}")

    def field(self, key: str) -> str:
        """The dotted name of ``key`` as users write it: ``memory.ram_mb``."""
        return f"{self.prefix}.{key}" if self.prefix else key

    def invalid(self, key: str, problem: str, value: object = None) -> InvalidProfile:
        """The error for ``key`` (raise it)."""
        return InvalidProfile(self.source, self.field(key), problem, value=value)

    def get(self, key: str, default: object = None) -> object:
        """The raw value of ``key``; missing keys without a default are an error."""
        if key in self.data:
            return self.data[key]
        if default is None:
            raise self.invalid(key, "missing")
        return default

    @classmethod
    def section(cls, spec: type[_Section], data: object, *, source: str) -> _Table:
        """The ``[spec.SECTION]`` table, allowed to hold only the spec's fields."""
        keys = tuple(field.name for field in dataclasses.fields(spec))
        return cls(data, source=source, prefix=spec.SECTION, keys=keys)

    def integer(self, key: str, *, minimum: int) -> int:
        """An integer of at least ``minimum`` (TOML booleans and floats are refused, not coerced)."""
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.invalid(key, f"must be an integer, not {_toml_type(value)}", value)
        if value < minimum:
            raise self.invalid(key, f"must be at least {minimum}", value)
        return value

    def boolean(self, key: str) -> bool:
        """``true`` or ``false``."""
        value = self.get(key)
        if not isinstance(value, bool):
            raise self.invalid(key, f"must be true or false, not {_toml_type(value)}", value)
        return value

    def text(self, key: str) -> str:
        """A non-empty string."""
        return self._string(key, self.get(key))

    def name(self, key: str) -> str:
        """A profile name: lower-case letters, digits, '.', '_', '-'; at most 64 characters."""
        return self._name(key, self.get(key))

    def names(self, key: str) -> tuple[str, ...]:
        """An optional array of distinct names (default: none), each checked like ``name``."""
        value = self.get(key, [])
        if not isinstance(value, list):
            raise self.invalid(key, f"must be an array of names, not {_toml_type(value)}", value)
        names = tuple(self._name(key, item) for item in value)
        for index, name in enumerate(names):
            if name in names[:index]:
                raise self.invalid(key, "lists this name twice", name)
        return names

    def _string(self, key: str, value: object) -> str:
        if not isinstance(value, str):
            raise self.invalid(key, f"must be a string, not {_toml_type(value)}", value)
        if not value.strip():
            raise self.invalid(key, "must not be empty", value)
        return value

    def _name(self, key: str, value: object) -> str:
        name = self._string(key, value)
        if _NAME.fullmatch(name) is None:
            raise self.invalid(key, f"must match {NAME_PATTERN} (lower-case letters, digits, '.', '_', '-')", name)
        return name


def _toml_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class MemorySpec:
    """The device's RAM and the part of it edge-rt may hold resident, both in MiB."""

    SECTION: ClassVar[str] = "memory"

    ram_mb: int
    runtime_budget_mb: int  # process, base model, KV cache, compute buffers and adapters together

    @classmethod
    def from_dict(cls, data: object, *, source: str) -> MemorySpec:
        """Read and check a ``[memory]`` table, naming ``source`` and the bad key in errors."""
        table = _Table.section(cls, data, source=source)
        ram_mb = table.integer("ram_mb", minimum=1)
        budget_mb = table.integer("runtime_budget_mb", minimum=1)
        if budget_mb > ram_mb:
            raise table.invalid("runtime_budget_mb", f"exceeds memory.ram_mb = {ram_mb}", budget_mb)
        return cls(ram_mb=ram_mb, runtime_budget_mb=budget_mb)


@dataclass(frozen=True)
class StorageSpec:
    """The disk budget of the adapter cache, in MiB."""

    SECTION: ClassVar[str] = "storage"

    adapter_cache_mb: int

    @classmethod
    def from_dict(cls, data: object, *, source: str) -> StorageSpec:
        """Read and check a ``[storage]`` table (adapters load from the cache, so it cannot be empty)."""
        table = _Table.section(cls, data, source=source)
        return cls(adapter_cache_mb=table.integer("adapter_cache_mb", minimum=1))


@dataclass(frozen=True)
class ComputeSpec:
    """How llama.cpp runs: CPU threads, layers offloaded to the GPU, context and batch in tokens, KV cache type,
    and how many sequences are decoded together (``parallel``; ``"auto"`` or absent: decided from the memory plan)."""

    SECTION: ClassVar[str] = "compute"

    threads: int
    gpu_layers: int  # 0 = CPU only; more than the model's layers (999) = all of them
    ctx: int  # tokens of KV per sequence
    batch: int
    kv_type: str
    parallel: int | None = None  # None: auto (runtime.plan picks 1-4 from the budget)
    reserve_cores: int = 0  # cores left to the device's other work: threads never exceed usable cores minus these

    def threads_for(self, usable_cores: int) -> int:
        """The threads to run on a process that may use ``usable_cores``: ``threads``, at most the usable cores
        minus ``reserve_cores``, at least 1. Fixed for a process's life: llama.cpp's answers depend on it."""
        return max(1, min(self.threads, usable_cores - self.reserve_cores))

    @classmethod
    def from_dict(cls, data: object, *, source: str) -> ComputeSpec:
        """Read and check a ``[compute]`` table, naming ``source`` and the bad key in errors."""
        table = _Table.section(cls, data, source=source)
        threads = table.integer("threads", minimum=1)
        gpu_layers = table.integer("gpu_layers", minimum=0)
        ctx = table.integer("ctx", minimum=CTX_MULTIPLE)
        if ctx % CTX_MULTIPLE:
            raise table.invalid("ctx", f"must be a multiple of {CTX_MULTIPLE} tokens (llama.cpp's KV padding)", ctx)
        batch = table.integer("batch", minimum=1)
        if batch > ctx:
            # llama.cpp clamps n_batch to n_ctx: a larger value would size compute buffers that never exist.
            raise table.invalid("batch", f"must not exceed compute.ctx = {ctx}", batch)
        kv_type = table.text("kv_type")
        if kv_type not in KV_TYPES:
            raise table.invalid("kv_type", f"must be one of {', '.join(KV_TYPES)}", kv_type)
        reserve = table.integer("reserve_cores", minimum=0) if "reserve_cores" in table.data else 0
        return cls(
            threads=threads,
            gpu_layers=gpu_layers,
            ctx=ctx,
            batch=batch,
            kv_type=kv_type,
            parallel=_parallel(table),
            reserve_cores=reserve,
        )


def _parallel(table: _Table) -> int | None:
    """``compute.parallel``: an integer from 1 to MAX_PARALLEL, or "auto" (the default)."""
    value = table.get("parallel", AUTO)
    if value == AUTO:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise table.invalid("parallel", f'must be an integer or "auto", not {_toml_type(value)}', value)
    if not 1 <= value <= MAX_PARALLEL:
        raise table.invalid("parallel", f"must be from 1 to {MAX_PARALLEL} sequences", value)
    return value


@dataclass(frozen=True)
class NetworkSpec:
    """The download cap in kilobits per second (0 = unlimited) and whether the link is paid per byte."""

    SECTION: ClassVar[str] = "network"

    max_download_kbps: int
    metered: bool

    @classmethod
    def from_dict(cls, data: object, *, source: str) -> NetworkSpec:
        """Read and check a ``[network]`` table, naming ``source`` and the bad key in errors."""
        table = _Table.section(cls, data, source=source)
        return cls(max_download_kbps=table.integer("max_download_kbps", minimum=0), metered=table.boolean("metered"))


_SECTIONS = tuple(spec.SECTION for spec in (MemorySpec, StorageSpec, ComputeSpec, NetworkSpec))


@dataclass(frozen=True)
class DeviceProfile:
    """One device: its name and aliases, memory and disk budgets, compute settings and network limits."""

    name: str
    description: str
    aliases: tuple[str, ...]
    memory: MemorySpec
    storage: StorageSpec
    compute: ComputeSpec
    network: NetworkSpec
    source: str  # the file it was read from, or how `auto` was measured

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str) -> DeviceProfile:
        """Build a profile from parsed TOML, raising ``InvalidProfile`` naming ``source`` and the bad key."""
        top = _Table(data, source=source, prefix="", keys=("name", "description", "aliases", *_SECTIONS))
        name = top.name("name")
        aliases = top.names("aliases")
        if name in aliases:
            raise top.invalid("aliases", "repeats the profile's name", name)
        return cls(
            name=name,
            description=top.text("description"),
            aliases=aliases,
            memory=MemorySpec.from_dict(top.get("memory"), source=source),
            storage=StorageSpec.from_dict(top.get("storage"), source=source),
            compute=ComputeSpec.from_dict(top.get("compute"), source=source),
            network=NetworkSpec.from_dict(top.get("network"), source=source),
            source=source,
        )

    @property
    def names(self) -> tuple[str, ...]:
        """The name, then every alias: each of them loads this profile."""
        return (self.name, *self.aliases)

    @property
    def ram_bytes(self) -> int:
        """Physical RAM in bytes."""
        return self.memory.ram_mb * MIB

    @property
    def runtime_budget_bytes(self) -> int:
        """Bytes edge-rt may hold resident (process, base model, KV cache, compute buffers, adapters)."""
        return self.memory.runtime_budget_mb * MIB

    @property
    def adapter_cache_bytes(self) -> int:
        """Disk budget of the adapter cache in bytes."""
        return self.storage.adapter_cache_mb * MIB

    @property
    def max_download_bytes_per_second(self) -> int | None:
        """The download cap in bytes per second (1 kbps = 125 B/s), or None when unlimited."""
        kbps = self.network.max_download_kbps
        return kbps * 125 if kbps else None

    def to_dict(self) -> dict[str, Any]:
        """The profile as JSON-ready data: the TOML schema's keys plus ``source``."""
        data = dataclasses.asdict(self)
        data["aliases"] = list(self.aliases)
        data["compute"]["parallel"] = self.compute.parallel or AUTO
        return data

    def to_toml(self) -> str:
        """The profile as a TOML document that ``load_profile`` reads back to an equal profile."""
        data = self.to_dict()
        source = data.pop("source").replace("\n", " ")
        lines = [f"# source: {source}"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in data.items() if not isinstance(value, dict)]
        for section in _SECTIONS:
            lines += ["", f"[{section}]", *(f"{key} = {_toml_value(value)}" for key, value in data[section].items())]
        return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    # A JSON string is a TOML basic string, except that TOML also wants DEL escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _parse(raw: bytes, *, source: str) -> DeviceProfile:
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidProfile(source, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidProfile(source, None, f"not valid TOML: {exc}") from exc
    return DeviceProfile.from_dict(data, source=source)


def _load_directory(root: Traversable) -> dict[str, DeviceProfile]:
    """Every ``*.toml`` profile in ``root`` by name; each file is named after its profile, no name is claimed twice."""
    profiles: dict[str, DeviceProfile] = {}
    claimed = {AUTO: "the built-in auto profile"}
    for entry in sorted(root.iterdir(), key=lambda item: item.name):
        if not entry.name.endswith(".toml"):
            continue
        profile = _parse(entry.read_bytes(), source=str(entry))
        if entry.name != f"{profile.name}.toml":
            raise InvalidProfile(profile.source, "name", f"must match the file name {entry.name}", value=profile.name)
        for key in profile.names:
            if key in claimed:
                field = "name" if key == profile.name else "aliases"
                raise InvalidProfile(profile.source, field, f"already used by {claimed[key]}", value=key)
            claimed[key] = f"profile {profile.name!r} ({profile.source})"
        profiles[profile.name] = profile
    return profiles


def _shipped() -> dict[str, DeviceProfile]:
    return _load_directory(resources.files(_PROFILE_PACKAGE))


def _is_path(value: str) -> bool:
    separators = [separator for separator in ("/", os.sep, os.altsep) if separator]
    return value.endswith(".toml") or any(separator in value for separator in separators)


def auto_profile() -> DeviceProfile:
    """This machine as measured now: RAM, the cores this process may use (physical cores, the affinity mask and
    the cgroup CPU quota, the fewest of them); half of RAM as the runtime budget."""
    ram_mb = int(psutil.virtual_memory().total) // MIB
    physical = int(psutil.cpu_count(logical=False) or psutil.cpu_count() or 1)
    budget = core_budget()
    cores = min(physical, budget.usable)
    data = {
        "name": AUTO,
        "description": f"This machine as measured: {cores} usable cores ({physical} physical, affinity "
        f"{budget.affinity}, cgroup quota {budget.quota or 'none'}), {ram_mb} MiB RAM, CPU only",
        "memory": {"ram_mb": ram_mb, "runtime_budget_mb": max(1, int(ram_mb * AUTO_BUDGET_FRACTION))},
        "storage": {"adapter_cache_mb": AUTO_ADAPTER_CACHE_MB},
        # The portable llama.cpp build is CPU-only; a GPU device takes its own profile (gpu_layers > 0).
        "compute": {"threads": cores, "gpu_layers": 0, "ctx": AUTO_CTX, "batch": AUTO_BATCH, "kv_type": "q8_0"},
        "network": {"max_download_kbps": 0, "metered": False},
    }
    return DeviceProfile.from_dict(data, source="auto: measured by psutil, sched_getaffinity and cgroup cpu.max")


def list_profiles() -> list[DeviceProfile]:
    """``auto`` (the default) followed by every shipped profile, by name."""
    return [auto_profile(), *_shipped().values()]


def load_profile(name_alias_or_path: str) -> DeviceProfile:
    """The profile with that name or alias, ``auto``, or the TOML file at that path (it has a '/' or ends in .toml)."""
    if _is_path(name_alias_or_path):
        path = Path(name_alias_or_path)
        try:
            raw = read_bounded(path, MAX_PROFILE_BYTES)
        except FileTooLarge as exc:
            raise InvalidProfile(str(path), None, f"larger than {MAX_PROFILE_BYTES} bytes: not a profile") from exc
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ProfileNotFound(name_alias_or_path, _available(), problem="no such profile file") from exc
        except OSError as exc:
            raise InvalidProfile(str(path), None, f"cannot be read: {exc.strerror or exc}") from exc
        return _parse(raw, source=str(path))
    if name_alias_or_path == AUTO:
        return auto_profile()
    shipped = _shipped()
    for profile in shipped.values():
        if name_alias_or_path in profile.names:
            return profile
    raise ProfileNotFound(name_alias_or_path, (AUTO, *shipped))


def _available() -> tuple[str, ...]:
    return (AUTO, *_shipped())
