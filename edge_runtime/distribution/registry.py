"""One repository on an OCI registry, spoken to as the distribution specification says.

Reads: the release manifest by tag (conditional on the registry's digest ETag, so an unchanged release costs one
304), the signed document and adapter blobs by digest (``transfer.download``: Range resume, bounds, sha256).
Writes: ``HEAD`` a blob by digest before uploading it (a blob the registry has is never sent again); an upload is
``POST`` then either one ``PUT ?digest=`` (small blobs) or ``PATCH`` chunks with ``Content-Range`` then a closing
``PUT``; a chunk that fails is retried after asking the registry how far the upload got (``GET`` on the upload
location answers ``Range: 0-N``), so a cut connection resends only what the registry lacks; a registry that cannot
resume that upload (distribution 2.8 when part of the chunk was written) gets the blob again from byte 0.

HTTPS by default; plain HTTP only for loopback hosts (as Docker treats them) or hosts listed in
``EDGE_RT_INSECURE_REGISTRIES``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import json
import logging
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp
from yarl import URL

from edge_runtime import settings
from edge_runtime.distribution.http import create_session
from edge_runtime.distribution.oci import MAX_OCI_MANIFEST_BYTES, OCI_MANIFEST_TYPE, Descriptor, OciReference
from edge_runtime.distribution.registry_auth import RegistryAuth, auth_errors
from edge_runtime.distribution.transfer import (
    UNUSABLE_ANSWERS,
    Fetched,
    TransferSettings,
    fetch_bounded,
    unusable_answer,
)
from edge_runtime.errors import IntegrityError, LengthExceeded, RegistryAuthFailed, RemoteNotFound, TransferFailed

__all__ = ["Registry", "registry_url", "uses_plain_http"]

log = logging.getLogger(__name__)
T = TypeVar("T")
UPLOAD_CHUNK_BYTES = 8 << 20
MAX_ERROR_BYTES = 4096
_RETRYABLE = frozenset({408, 425, 429, 500, 502, 503, 504})
_NETWORK_ERRORS = (
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    ConnectionResetError,
    asyncio.TimeoutError,
)


def uses_plain_http(reference: OciReference) -> bool:
    """True for a loopback registry (``localhost``, 127.0.0.0/8, ::1) or one listed in EDGE_RT_INSECURE_REGISTRIES."""
    if (
        reference.host.lower() in settings.insecure_registries()
        or reference.hostname.lower() in settings.insecure_registries()
    ):
        return True
    if reference.hostname.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(reference.hostname).is_loopback
    except ValueError:
        return False


def registry_url(reference: OciReference) -> URL:
    """``https://HOST/v2/REPO`` (``http://`` under ``uses_plain_http``): the root of the repository's API."""
    scheme = "http" if uses_plain_http(reference) else "https"
    return URL(f"{scheme}://{reference.host}/v2/{reference.repository}")


class _Retry(Exception):
    """A registry write failed in a way trying again may fix."""


class Registry:
    """A repository on a registry: its URLs, an authenticated session, and the reads and writes edge-rt makes."""

    def __init__(
        self, reference: OciReference, *, transfer: TransferSettings, upload_chunk_bytes: int = UPLOAD_CHUNK_BYTES
    ) -> None:
        self.reference = reference
        self.transfer = transfer
        self.base = registry_url(reference)
        self.auth = RegistryAuth(reference.host, self.base.origin())
        self.upload_chunk_bytes = upload_chunk_bytes
        self.uploaded_bytes = 0  # bytes of blob content sent by this object's uploads
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = create_session(
                connect_timeout_s=self.transfer.connect_timeout_s,
                gap_timeout_s=self.transfer.gap_timeout_s,
                headers={"Accept": OCI_MANIFEST_TYPE},
                middlewares=(self.auth,),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def blob_url(self, digest: str) -> str:
        return str(self.base / "blobs" / digest)

    def manifest_url(self, reference: str) -> str:
        return str(self.base / "manifests" / reference)

    async def release(self, *, etag: str | None = None) -> Fetched:
        """The release manifest under the reference's tag (body None: 304, unchanged since ``etag``)."""
        with auth_errors():
            return await fetch_bounded(
                self.session(),
                self.manifest_url(self.reference.tag),
                limit_bytes=MAX_OCI_MANIFEST_BYTES,
                settings=self.transfer,
                etag=etag,
            )

    async def small_blob(self, descriptor: Descriptor, *, limit_bytes: int) -> bytes:
        """A small blob (the signed document), bounded by its descriptor and ``limit_bytes``, digest-checked."""
        url = self.blob_url(descriptor.digest)
        if descriptor.size > limit_bytes:
            raise LengthExceeded(url, limit_bytes=limit_bytes, received_bytes=descriptor.size)
        with auth_errors():
            fetched = await fetch_bounded(self.session(), url, limit_bytes=descriptor.size, settings=self.transfer)
        body = fetched.body or b""
        actual = hashlib.sha256(body).hexdigest()
        if actual != descriptor.sha256:
            raise IntegrityError(url, expected_sha256=descriptor.sha256, actual_sha256=actual)
        return body

    async def blob_exists(self, digest: str) -> bool:
        """HEAD by digest: True when the repository already holds the blob."""

        async def attempt() -> bool:
            async with self.session().head(self.blob_url(digest)) as response:
                if response.status == 404:
                    return False
                await _raise_for(response, "check blob")
                return True

        return await self._retried(self.blob_url(digest), attempt)

    async def upload(self, digest: str, size: int, read: Callable[[int, int], Awaitable[bytes]]) -> None:
        """Upload blob ``digest`` of ``size`` bytes; ``read(offset, count)`` gives its bytes (file or memory)."""
        with auth_errors():
            await self._upload(digest, size, read)

    async def _upload(self, digest: str, size: int, read: Callable[[int, int], Awaitable[bytes]]) -> None:
        if size <= self.upload_chunk_bytes:  # one POST and one PUT; a failure starts it over
            body = await read(0, size)

            async def monolithic() -> None:
                await self._put(await self._start_upload(), digest, body)

            await self._retried(self.blob_url(digest), monolithic)
            self.uploaded_bytes += size
            return
        location = await self._retried(self.blob_url(digest), self._start_upload)
        offset, failures = 0, 0
        while offset < size:
            chunk = await read(offset, min(self.upload_chunk_bytes, size - offset))
            try:
                location = await self._patch(location, offset, chunk)
                offset += len(chunk)
                self.uploaded_bytes += len(chunk)
            except _Retry as exc:
                failures += 1
                if failures >= self.transfer.max_attempts:
                    raise TransferFailed(
                        location, f"upload failed at byte {offset} of {size}: {exc}", attempts=failures
                    ) from exc
                await asyncio.sleep(self._backoff(failures))
                offset, location = await self._resume_point(location, digest)
                log.info("continuing the upload of %s at byte %d of %d", digest, offset, size)
        await self._retried(location, lambda: self._put(location, digest, b""))

    async def upload_file(self, path: Path, digest: str, size: int) -> None:
        """Upload a file as blob ``digest`` (read in chunks off the event loop)."""

        def read_part(offset: int, count: int) -> bytes:
            with path.open("rb") as handle:
                handle.seek(offset)
                return handle.read(count)

        async def read(offset: int, count: int) -> bytes:
            return await asyncio.to_thread(read_part, offset, count)

        await self.upload(digest, size, read)

    async def upload_bytes(self, body: bytes) -> Descriptor:
        """Upload ``body`` unless the registry has it; its digest and size (media type left to the caller)."""
        digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
        if not await self.blob_exists(digest):

            async def read(offset: int, count: int) -> bytes:
                return body[offset : offset + count]

            await self.upload(digest, len(body), read)
        return Descriptor("", digest, len(body))

    async def put_manifest(self, tag: str, body: bytes) -> str:
        """PUT an OCI image manifest under ``tag``; the digest the registry stored it under."""
        url = self.manifest_url(tag)

        async def attempt() -> str:
            async with self.session().put(url, data=body, headers={"Content-Type": OCI_MANIFEST_TYPE}) as response:
                await _raise_for(response, f"store the manifest {tag}")
                return response.headers.get("Docker-Content-Digest") or f"sha256:{hashlib.sha256(body).hexdigest()}"

        return await self._retried(url, attempt)

    async def _start_upload(self) -> str:
        async with self.session().post(str(self.base / "blobs" / "uploads" / "")) as response:
            await _raise_for(response, "start an upload", expect=(202,))
            return self._location(response)

    async def _patch(self, location: str, offset: int, chunk: bytes) -> str:
        headers = {"Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
        try:
            async with self.session().patch(location, data=chunk, headers=headers) as response:
                if response.status in _RETRYABLE or response.status == 416:
                    raise _Retry(f"HTTP {response.status}")
                await _raise_for(response, "upload a chunk", expect=(202,))
                return self._location(response)
        except _NETWORK_ERRORS as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from exc

    async def _resume_point(self, location: str, digest: str) -> tuple[int, str]:
        """Where an interrupted upload goes on: the registry's offset, or byte 0 of a new upload when the registry
        cannot resume it (distribution 2.8 signs the offset into the upload URL's ``_state``, so an upload whose
        chunk was partly written before the connection dropped is invalid there: BLOB_UPLOAD_INVALID)."""
        try:
            return await self._retried(location, functools.partial(self._upload_status, location))
        except RegistryAuthFailed:
            raise
        except TransferFailed as lost:
            log.info("the registry cannot resume the upload of %s (%s): starting it over", digest, lost.reason)
            return 0, await self._retried(self.blob_url(digest), self._start_upload)

    async def _upload_status(self, location: str) -> tuple[int, str]:
        async with self.session().get(location) as response:
            await _raise_for(response, "resume an upload", expect=(204,))
            last = response.headers.get("Range", "0--1").rpartition("-")[2]
            return (int(last) + 1 if last.isdigit() else 0), self._location(response, default=location)

    async def _put(self, location: str, digest: str, body: bytes) -> None:
        url = URL(location).update_query(digest=digest)
        try:
            async with self.session().put(
                url, data=body, headers={"Content-Type": "application/octet-stream"}
            ) as response:
                await _raise_for(response, "finish an upload", expect=(201,))
        except _NETWORK_ERRORS as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from exc

    def _location(self, response: aiohttp.ClientResponse, default: str | None = None) -> str:
        location = response.headers.get("Location") or default
        if not location:
            raise TransferFailed(str(response.url), "the registry sent no upload Location")
        try:
            joined: URL | None = response.url.join(URL(location))
        except ValueError:  # "http://[::1": yarl refuses it
            joined = None
        if joined is None or joined.scheme not in ("http", "https") or not joined.host:  # file://, ftp://...
            raise TransferFailed(str(response.url), f"the registry sent an unusable upload Location {location[:200]!r}")
        return str(joined)

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.transfer.backoff_max_s, self.transfer.backoff_base_s * 2 ** (attempt - 1)))

    async def _retried(self, url: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt``, retrying connection errors and 408/429/5xx with full-jitter backoff."""
        failures = 0
        while True:
            try:
                with auth_errors():
                    return await attempt()
            except UNUSABLE_ANSWERS as exc:  # a refused redirect or loop, an oversized header: the same again
                raise unusable_answer(url, exc) from exc
            except (_Retry, *_NETWORK_ERRORS) as exc:
                failures += 1
                if failures >= self.transfer.max_attempts:
                    raise TransferFailed(url, f"{type(exc).__name__}: {exc}", attempts=failures) from exc
                await asyncio.sleep(self._backoff(failures))


async def _raise_for(response: aiohttp.ClientResponse, action: str, *, expect: tuple[int, ...] = (200, 201)) -> None:
    """Raise the typed error for an answer that is not one of ``expect`` (retryable ones as ``_Retry``)."""
    status = response.status
    if status in expect or (status < 300 and 200 in expect):
        return
    if status in _RETRYABLE:
        raise _Retry(f"HTTP {status}")
    detail = await _error_detail(response)
    url = str(response.url)
    if status in (401, 403):
        raise RegistryAuthFailed(
            url,
            f"cannot {action}: HTTP {status}{detail}",
            status=status,
            fix="Check that these credentials may pull (and, to publish, push) this repository",
        )
    if status == 404:
        raise RemoteNotFound(
            url,
            f"cannot {action}: HTTP 404{detail}",
            status=404,
            fix="Check the oci:// reference (repository and tag), or publish to it first",
        )
    raise TransferFailed(url, f"cannot {action}: HTTP {status}{detail}", status=status)


async def _error_detail(response: aiohttp.ClientResponse) -> str:
    """The registry's first error code and message (the spec's ``{"errors": [...]}``), bounded."""
    try:
        data = json.loads(await response.content.read(MAX_ERROR_BYTES))
        first = data["errors"][0]
        return f" ({first.get('code')}: {str(first.get('message'))[:200]})"
    except (ValueError, RecursionError, KeyError, IndexError, TypeError, AttributeError, aiohttp.ClientError):
        return ""
