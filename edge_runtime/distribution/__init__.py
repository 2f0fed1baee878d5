"""Adapter distribution: publish a signed CDN folder, and on the device fetch, verify and cache adapters.

Nothing here knows llama.cpp or the daemon: the cache holds verified files, and the daemon decides what to load.
Names load on first use: importing this package (or one leaf) does not import the others.
"""

from __future__ import annotations

from typing import Any

from edge_runtime.lazy import lazy_attributes

__all__ = ["AdapterStore", "CachedAdapter", "CdnClient", "Manifest", "ManifestEntry", "SyncReport", "SyncSettings",
           "generate_key", "load_private_key", "load_public_key", "publish", "read_manifest", "run_sync"]

_LAZY = {"CdnClient": "client", "SyncReport": "client", "SyncSettings": "client", "run_sync": "client",
         "generate_key": "keys", "load_private_key": "keys", "load_public_key": "keys", "Manifest": "manifest",
         "ManifestEntry": "manifest", "read_manifest": "manifest", "publish": "publish", "AdapterStore": "store",
         "CachedAdapter": "store"}

_load = lazy_attributes(__name__, {name: f".{module}" for name, module in _LAZY.items()})


def __getattr__(name: str) -> Any:
    return _load(name)
