"""Adapter distribution: publish a signed CDN folder, and on the device fetch, verify and cache adapters.

Nothing here knows llama.cpp or the daemon: the cache holds verified files, and the daemon decides what to load.
Names load on first use: importing this package (or one leaf) does not import the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_runtime.lazy import lazy_attributes

__all__ = [
    "AdapterStore",
    "CachedAdapter",
    "CdnClient",
    "Manifest",
    "ManifestEntry",
    "SyncReport",
    "SyncSettings",
    "generate_key",
    "load_private_key",
    "load_public_key",
    "publish",
    "read_manifest",
    "run_sync",
]

if TYPE_CHECKING:  # the names as type checkers see them; at run time _LAZY loads each on first use
    from edge_runtime.distribution.client import CdnClient, SyncReport, SyncSettings, run_sync
    from edge_runtime.distribution.keys import generate_key, load_private_key, load_public_key
    from edge_runtime.distribution.manifest import Manifest, ManifestEntry, read_manifest
    from edge_runtime.distribution.publish import publish
    from edge_runtime.distribution.store import AdapterStore, CachedAdapter

_LAZY = {
    "CdnClient": "client",
    "SyncReport": "client",
    "SyncSettings": "client",
    "run_sync": "client",
    "generate_key": "keys",
    "load_private_key": "keys",
    "load_public_key": "keys",
    "Manifest": "manifest",
    "ManifestEntry": "manifest",
    "read_manifest": "manifest",
    "publish": "publish",
    "AdapterStore": "store",
    "CachedAdapter": "store",
}

_load = lazy_attributes(__name__, _LAZY)


def __getattr__(name: str) -> Any:
    return _load(name)
