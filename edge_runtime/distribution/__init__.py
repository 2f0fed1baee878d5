"""Adapter distribution: publish a signed CDN folder, and on the device fetch, verify and cache adapters.

Nothing here knows llama.cpp or the daemon: the cache holds verified files, and the daemon decides what to load.
"""

from __future__ import annotations

from edge_runtime.distribution.client import CdnClient, SyncReport, SyncSettings, run_sync
from edge_runtime.distribution.keys import generate_key, load_private_key, load_public_key
from edge_runtime.distribution.manifest import Manifest, ManifestEntry, read_manifest
from edge_runtime.distribution.publish import publish
from edge_runtime.distribution.store import AdapterStore, CachedAdapter

__all__ = ["AdapterStore", "CachedAdapter", "CdnClient", "Manifest", "ManifestEntry", "SyncReport", "SyncSettings",
           "generate_key", "load_private_key", "load_public_key", "publish", "read_manifest", "run_sync"]
