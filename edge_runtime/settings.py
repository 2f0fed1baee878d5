"""Environment variables, read in this one module and at call time (so tests and daemons can change them).

- ``EDGE_RT_HOME``: edge-rt's state folder (default ``~/.cache/edge-rt``).
- ``EDGE_RT_OFFLINE`` / ``HF_HUB_OFFLINE``: truthy means zero network attempts.
- ``HF_HUB_CACHE``: huggingface_hub's cache folder (huggingface_hub itself reads it only at import).
- ``GOMP_SPINCOUNT`` / ``OMP_WAIT_POLICY`` are libgomp's, not edge-rt's: how llama.cpp's OpenMP threads wait at a
  barrier. edge-rt keeps libgomp's default (fastest while the engine's threads have cores; on a busy device the
  engine sheds threads instead, ``runtime/governor.py``).
- ``HF_ENDPOINT``: the Hub to use for ``hf://`` sources (a mirror or a private Hub; huggingface_hub reads it only at
  import, so edge-rt passes it on each call).
- ``EDGE_RT_REGISTRY_USERNAME`` / ``EDGE_RT_REGISTRY_PASSWORD``: credentials for ``oci://`` registries (before
  ``~/.docker/config.json``).
- ``DOCKER_CONFIG``: the folder of Docker's ``config.json`` (default ``~/.docker``), read for registry ``auths``.
- ``EDGE_RT_INSECURE_REGISTRIES``: comma-separated ``HOST[:PORT]`` registries reached over plain HTTP (loopback
  hosts always are, as Docker treats them).
- ``EDGE_RT_CACHE_LOCK_TIMEOUT_S``: how long to wait for another process's cache lock before giving up (default 60).
"""

from __future__ import annotations

import os
from pathlib import Path

_TRUTHY = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUTHY


def home_dir() -> Path:
    """edge-rt's state folder: ``EDGE_RT_HOME``, else ``~/.cache/edge-rt``."""
    configured = os.environ.get("EDGE_RT_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "edge-rt"


def adapter_cache_dir() -> Path:
    """Default folder of the device's adapter cache."""
    return home_dir() / "adapters"


def offline() -> bool:
    """True when ``EDGE_RT_OFFLINE`` or ``HF_HUB_OFFLINE`` is truthy: no network attempt may be made."""
    return _flag("EDGE_RT_OFFLINE") or _flag("HF_HUB_OFFLINE")


def hf_cache_dir() -> Path | None:
    """``HF_HUB_CACHE`` as set now, or None for huggingface_hub's own default."""
    configured = os.environ.get("HF_HUB_CACHE")
    return Path(configured).expanduser() if configured else None


def cache_lock_timeout_s() -> float:
    """``EDGE_RT_CACHE_LOCK_TIMEOUT_S`` (seconds, default 60): the longest wait for the adapter cache's lock."""
    try:
        return max(0.0, float(os.environ.get("EDGE_RT_CACHE_LOCK_TIMEOUT_S", "60")))
    except ValueError:
        return 60.0


def hf_endpoint() -> str | None:
    """``HF_ENDPOINT`` as set now (e.g. a Hub mirror), or None for huggingface_hub's default (huggingface.co)."""
    configured = os.environ.get("HF_ENDPOINT", "").strip()
    return configured.rstrip("/") or None


def registry_credentials() -> tuple[str, str] | None:
    """``EDGE_RT_REGISTRY_USERNAME`` and ``EDGE_RT_REGISTRY_PASSWORD`` when both are set now, else None."""
    user, password = os.environ.get("EDGE_RT_REGISTRY_USERNAME"), os.environ.get("EDGE_RT_REGISTRY_PASSWORD")
    return (user, password) if user and password is not None else None


def docker_config_file() -> Path:
    """Docker's ``config.json``: in ``DOCKER_CONFIG`` when set, else ``~/.docker``."""
    configured = os.environ.get("DOCKER_CONFIG")
    return (Path(configured).expanduser() if configured else Path.home() / ".docker") / "config.json"


def insecure_registries() -> frozenset[str]:
    """``EDGE_RT_INSECURE_REGISTRIES`` as lower-cased ``HOST[:PORT]`` entries: registries reached over plain HTTP."""
    configured = os.environ.get("EDGE_RT_INSECURE_REGISTRIES", "")
    return frozenset(part.strip().lower() for part in configured.split(",") if part.strip())
