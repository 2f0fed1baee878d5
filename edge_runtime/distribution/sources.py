"""Where a CDN folder is read from: ``http(s)://`` (any static server), ``file://`` (a mounted folder),
``hf://ORG/REPO[@REV][/DIR]`` (a Hugging Face Hub repository, read over HTTP at a pinned revision) or
``oci://HOST[:PORT]/REPO[:TAG]`` (a release pushed to an OCI registry, ``oci.py``).

Every source gives the client the same three things: the manifest's bytes (bounded), a blob downloaded into the
store (verified, resumable where the transport allows) and the address of a published file. ``open_source`` picks
one from the URL's scheme.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

import aiohttp

from edge_runtime import hub
from edge_runtime.distribution.http import create_session
from edge_runtime.distribution.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, blob_path
from edge_runtime.distribution.oci import Descriptor, is_oci_reference, parse_reference, read_release
from edge_runtime.distribution.registry import Registry
from edge_runtime.distribution.registry_auth import auth_errors
from edge_runtime.distribution.sink import BlobRequest
from edge_runtime.distribution.store import AdapterStore, CachedAdapter
from edge_runtime.distribution.transfer import (
    Fetched,
    ProgressCallback,
    RateLimiter,
    TransferSettings,
    copy_local,
    download,
    fetch_bounded,
)
from edge_runtime.errors import FileTooLarge, LengthExceeded, RemoteNotFound, SourceUnavailable
from edge_runtime.files import read_bounded


class Source(Protocol):
    """What the client needs of a CDN folder, whatever serves it."""

    def url(self, relative: str) -> str: ...

    async def manifest_bytes(self) -> bytes: ...

    async def fetch(self, request: BlobRequest, progress: ProgressCallback | None) -> CachedAdapter: ...

    async def close(self) -> None: ...


__all__ = ["FileSource", "HttpSource", "HubSource", "OciSource", "Source", "open_source", "read_manifest_file"]


def open_source(cdn: str, store: AdapterStore, transfer: TransferSettings, limiter: RateLimiter) -> Source:
    """The source for ``cdn`` by its scheme; ``SourceUnavailable`` for any other."""
    scheme = urlparse(cdn).scheme
    if scheme in ("http", "https"):
        return HttpSource(cdn, store=store, transfer=transfer, limiter=limiter)
    if scheme == "file":
        return FileSource(Path(unquote(urlparse(cdn).path)), store)
    if hub.is_hub_source(cdn):
        return HubSource(hub.parse_hub_source(cdn), store=store, transfer=transfer, limiter=limiter)
    if is_oci_reference(cdn):
        return OciSource(Registry(parse_reference(cdn), transfer=transfer), store=store, limiter=limiter)
    raise SourceUnavailable(
        cdn,
        "unsupported CDN address",
        fix="Use http(s)://HOST/PATH, file:///PATH, hf://ORG/REPO[@REVISION] or oci://HOST[:PORT]/REPOSITORY[:TAG]",
    )


class HttpSource:
    """A CDN folder served over HTTP(S) by any static server."""

    def __init__(self, base_url: str, *, store: AdapterStore, transfer: TransferSettings, limiter: RateLimiter) -> None:
        self.base_url = base_url
        self.store = store
        self.transfer = transfer
        self.limiter = limiter
        self._session: aiohttp.ClientSession | None = None
        self._manifest: Fetched | None = None  # the last manifest body and its ETag, for If-None-Match

    def url(self, relative: str) -> str:
        """The address of a file of the published folder."""
        return f"{self.base_url}/{relative}"

    def headers(self) -> dict[str, str]:
        """Extra headers every request of this source sends."""
        return {}

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = create_session(
                connect_timeout_s=self.transfer.connect_timeout_s,
                gap_timeout_s=self.transfer.gap_timeout_s,
                headers=self.headers(),
            )
        return self._session

    async def manifest_bytes(self) -> bytes:
        """The manifest; a 304 to If-None-Match re-uses the last body (it is verified again, expiry included)."""
        last = self._manifest
        fetched = await fetch_bounded(
            self.session(),
            self.url(MANIFEST_FILE),
            limit_bytes=MAX_MANIFEST_BYTES,
            settings=self.transfer,
            etag=last.etag if last is not None else None,
        )
        if fetched.body is None:  # 304 Not Modified: only possible when an ETag (and so a body) was kept
            assert last is not None and last.body is not None
            return last.body
        self._manifest = fetched
        return fetched.body

    async def fetch(self, request: BlobRequest, progress: ProgressCallback | None) -> CachedAdapter:
        return await download(
            self.session(), request, store=self.store, settings=self.transfer, limiter=self.limiter, progress=progress
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class FileSource:
    """A published CDN folder on a local or mounted file system."""

    def __init__(self, root: Path, store: AdapterStore) -> None:
        self.root = root
        self.store = store

    def url(self, relative: str) -> str:
        return str(self.root / relative)

    async def manifest_bytes(self) -> bytes:
        return await asyncio.to_thread(read_manifest_file, self.root / MANIFEST_FILE)

    async def fetch(self, request: BlobRequest, progress: ProgressCallback | None) -> CachedAdapter:
        return await asyncio.to_thread(
            copy_local, self.root / blob_path(request.sha256), request, store=self.store, progress=progress
        )

    async def close(self) -> None:
        return None


class HubSource(HttpSource):
    """A CDN folder uploaded to a Hugging Face Hub repository, read over HTTP at a pinned revision."""

    def __init__(
        self, source: hub.HubSource, *, store: AdapterStore, transfer: TransferSettings, limiter: RateLimiter
    ) -> None:
        super().__init__(str(source), store=store, transfer=transfer, limiter=limiter)
        self.source = source

    def url(self, relative: str) -> str:
        return hub.file_url(self.source, relative)

    def headers(self) -> dict[str, str]:
        return hub.auth_headers()


class OciSource:
    """A release pushed to an OCI registry: the signed document is a layer of the tag's manifest, blobs by digest.

    A refresh is one conditional GET of the tag's manifest (``If-None-Match`` with the registry's digest ETag: 304
    when nothing changed); the signed document is fetched only when the manifest names a new one.
    """

    def __init__(self, registry: Registry, *, store: AdapterStore, limiter: RateLimiter) -> None:
        self.registry = registry
        self.store = store
        self.limiter = limiter
        self._release: Fetched | None = None  # the last release manifest and its ETag
        self._document: tuple[Descriptor, bytes] | None = None  # the last signed document and its descriptor

    def url(self, relative: str) -> str:
        """A blob's URL for ``blobs/<sha256>.gguf``; the reference itself for anything else (messages)."""
        sha256 = relative.removeprefix("blobs/").removesuffix(".gguf")
        if relative == blob_path(sha256):
            return self.registry.blob_url(f"sha256:{sha256}")
        return str(self.registry.reference)

    async def manifest_bytes(self) -> bytes:
        """The signed edge-rt manifest of the tag's release (verified by the client like any other)."""
        last = self._release
        fetched = await self.registry.release(etag=last.etag if last is not None else None)
        if fetched.body is None and self._document is not None:  # 304: the release is unchanged
            return self._document[1]
        body = fetched.body if fetched.body is not None else b""
        descriptor = read_release(body, source=self.registry.manifest_url(self.registry.reference.tag))
        if self._document is None or self._document[0].digest != descriptor.digest:
            document = await self.registry.small_blob(descriptor, limit_bytes=MAX_MANIFEST_BYTES)
            self._document = (descriptor, document)
        self._release = fetched
        return self._document[1]

    async def fetch(self, request: BlobRequest, progress: ProgressCallback | None) -> CachedAdapter:
        with auth_errors():
            return await download(
                self.registry.session(),
                request,
                store=self.store,
                settings=self.registry.transfer,
                limiter=self.limiter,
                progress=progress,
            )

    async def close(self) -> None:
        await self.registry.close()


def read_manifest_file(path: Path) -> bytes:
    """A published ``manifest.json`` on disk, bounded like one fetched over HTTP."""
    try:
        return read_bounded(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError as exc:
        raise RemoteNotFound(
            str(path), "no manifest.json there", fix="Point --cdn at a folder written by `edge-rt publish`"
        ) from exc
    except FileTooLarge as exc:
        raise LengthExceeded(str(path), limit_bytes=MAX_MANIFEST_BYTES, received_bytes=MAX_MANIFEST_BYTES + 1) from exc
