"""A real CDN for the distribution tests: an aiohttp server on 127.0.0.1 serving a published folder, with faults.

Each blob request takes the next ``Fault`` from ``FaultCdn.faults`` (then none); the server implements Range and
If-Range itself (strong ETag = the served bytes' sha256) so a test can make it lie in exactly one way. It logs every
request with the body bytes it actually sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from peft_dirs import lora_tensors, write_peft_dir

from edge_runtime.distribution.keys import generate_key, load_private_key, load_public_key
from edge_runtime.distribution.publish import publish

MAX_STALL_S = 5.0  # every sleep in a handler is bounded, so a test's server always shuts down quickly


@dataclass(frozen=True)
class Fault:
    """One way to answer a blob request badly (all fields default to an honest answer)."""

    status: int | None = None  # answer this status with an empty body
    retry_after: str | None = None
    truncate_at: float | None = None  # fraction (< 1), byte count (>= 1) or -1 (one byte short) sent before a reset
    hold_at: float | None = None  # fraction of the body sent before the server stalls (then sends the rest)
    chunked: bool = False  # no Content-Length (chunked transfer encoding)
    flip_bit_at: int | None = None  # byte offset of the blob where one bit flips (same length)
    extra_bytes: int = 0  # body longer than the blob (with a matching Content-Length)
    ignore_range: bool = False  # answer a Range request with 200 and the whole body
    content_range: str | None = None  # a wrong Content-Range on the 206
    body: bytes | None = None  # serve these bytes instead of the blob (the blob changed)
    stall_s: float = 0.0  # send the headers, then nothing for this long
    bytes_per_second: float | None = None  # trickle the body


@dataclass
class Served:
    """One request as the server saw it."""

    path: str
    range: str | None
    if_range: str | None
    status: int
    body_bytes: int = 0
    if_none_match: str | None = None


@dataclass
class FaultCdn:
    """The CDN folder ``root`` over HTTP, answering blob requests with ``faults`` in order."""

    root: Path
    faults: list[Fault | None] = field(default_factory=list)
    manifest: bytes | None = None  # serve these bytes as manifest.json instead of the file
    manifest_piece_bytes: int | None = None  # send the manifest in pieces of this size, each written and drained
    manifest_delay_s: float = 0.0  # answer the manifest only after this long (at most MAX_STALL_S)
    log: list[Served] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._handle)
        return app

    @property
    def blob_requests(self) -> list[Served]:
        return [s for s in self.log if s.path.startswith("blobs/")]

    def body_bytes(self) -> int:
        """Blob body bytes sent so far."""
        return sum(s.body_bytes for s in self.blob_requests)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        served = Served(path, request.headers.get("Range"), request.headers.get("If-Range"), 200,
                        if_none_match=request.headers.get("If-None-Match"))
        self.log.append(served)
        file = self.root / path
        if path == "manifest.json" and (self.manifest is not None or file.is_file()):
            document = self.manifest if self.manifest is not None else file.read_bytes()
            await _sleep_unless_closed(request, min(self.manifest_delay_s, MAX_STALL_S))
            if self.manifest_piece_bytes is not None:
                return await self._manifest_in_pieces(request, served, document, self.manifest_piece_bytes)
            return self._manifest(served, document)
        if ".." in path.split("/") or not file.is_file():
            served.status = 404
            return web.Response(status=404)
        fault = (self.faults.pop(0) if self.faults else None) if path.startswith("blobs/") else None
        return await self._send(request, served, file.read_bytes(), fault or Fault())

    @staticmethod
    def _manifest(served: Served, document: bytes) -> web.Response:
        etag = f'"{hashlib.sha256(document).hexdigest()[:32]}"'
        if served.if_none_match == etag:
            served.status = 304
            return web.Response(status=304, headers={"ETag": etag})
        served.body_bytes = len(document)
        return web.Response(body=document, content_type="application/json", headers={"ETag": etag})

    @staticmethod
    async def _manifest_in_pieces(request: web.Request, served: Served, document: bytes,
                                  piece: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(document)
        await response.prepare(request)
        for start in range(0, len(document), piece):
            await response.write(document[start:start + piece])
            await asyncio.sleep(0)  # let the client see each piece on its own
            served.body_bytes += len(document[start:start + piece])
        return response

    async def _send(self, request: web.Request, served: Served, data: bytes, fault: Fault) -> web.StreamResponse:
        if fault.status is not None:
            served.status = fault.status
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return web.Response(status=fault.status, headers=headers)
        if fault.body is not None:
            data = fault.body
        if fault.flip_bit_at is not None:
            flipped = bytearray(data)
            flipped[fault.flip_bit_at] ^= 0x10
            data = bytes(flipped)
        etag = f'"{hashlib.sha256(data).hexdigest()[:32]}"'
        start = _range_start(served.range) if not fault.ignore_range else None
        if start is not None and served.if_range not in (None, etag):
            start = None  # If-Range names another version: send the whole current one
        body = data[start or 0:] + b"\0" * fault.extra_bytes
        response = web.StreamResponse(status=206 if start is not None else 200,
                                      headers={"ETag": etag, "Accept-Ranges": "bytes"})
        if start is not None:
            response.headers["Content-Range"] = fault.content_range or f"bytes {start}-{len(data) - 1}/{len(data)}"
        if fault.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(body)
        served.status = response.status
        await response.prepare(request)
        await _sleep_unless_closed(request, fault.stall_s)
        limit = len(body) if fault.truncate_at is None else _byte_count(fault.truncate_at, len(body))
        if fault.hold_at is not None:
            held = _byte_count(fault.hold_at, limit)
            await self._write(request, response, served, body[:held], None)
            await _sleep_unless_closed(request, MAX_STALL_S)
            body = body[held:]
            limit -= held
        await self._write(request, response, served, body[:limit], fault.bytes_per_second)
        if limit < len(body) and request.transport is not None:
            request.transport.abort()  # a connection reset mid-transfer
        return response

    @staticmethod
    async def _write(request: web.Request, response: web.StreamResponse, served: Served, body: bytes,
                     bytes_per_second: float | None) -> None:
        if bytes_per_second is None:
            await response.write(body)
            served.body_bytes += len(body)
            return
        started = time.monotonic()
        for index in range(len(body)):
            if request.transport is None or request.transport.is_closing() or time.monotonic() - started > MAX_STALL_S:
                return
            await response.write(body[index:index + 1])
            served.body_bytes += 1
            await asyncio.sleep(1 / bytes_per_second)


def _byte_count(spec: float, length: int) -> int:
    if spec < 0:
        return length + int(spec)
    return int(length * spec) if spec < 1 else int(spec)


def _range_start(header: str | None) -> int | None:
    if not header or not header.startswith("bytes=") or not header.endswith("-"):
        return None
    return int(header[len("bytes="):-1])


async def _sleep_unless_closed(request: web.Request, seconds: float) -> None:
    deadline = time.monotonic() + min(seconds, MAX_STALL_S)
    while time.monotonic() < deadline and request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(0.02)


@pytest.fixture(scope="session")
def adapter_sources(tmp_path_factory: pytest.TempPathFactory, base_model: Path) -> Path:
    """A folder of two small real adapters converted for SmolLM2: json-extract.gguf and brand-voice.gguf."""
    from converters import convert_peft_to_gguf

    folder = tmp_path_factory.mktemp("adapter-sources")
    for name, rank, seed in (("json-extract", 2, 1), ("brand-voice", 4, 2)):
        peft = write_peft_dir(folder / f"peft-{name}", r=rank,
                              tensors=lora_tensors(["q_proj", "k_proj"], rank=rank, seed=seed))
        convert_peft_to_gguf(peft, base=base_model, output=folder / f"{name}.gguf")
        shutil.rmtree(peft)
    return folder


@pytest.fixture(scope="session")
def large_adapter(tmp_path_factory: pytest.TempPathFactory, base_model: Path) -> Path:
    """A folder holding one ~650 KB real adapter (rank 16, every projection of two layers): wide.gguf."""
    from converters import convert_peft_to_gguf

    folder = tmp_path_factory.mktemp("large-adapter")
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = write_peft_dir(tmp_path_factory.mktemp("peft-wide"), r=16, target_modules=modules,
                          tensors=lora_tensors(modules, rank=16, seed=3))
    convert_peft_to_gguf(peft, base=base_model, output=folder / "wide.gguf")
    return folder


@pytest.fixture(scope="session")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Ed25519PrivateKey, Ed25519PublicKey, Path]:
    """A signing key, its public key, and the private key's path (``.pub`` beside it)."""
    private_path, public_path = generate_key(tmp_path_factory.mktemp("keys") / "cdn.key")
    return load_private_key(private_path), load_public_key(public_path), private_path


@pytest.fixture
def cdn_dir(tmp_path: Path, adapter_sources: Path,
            key_pair: tuple[Ed25519PrivateKey, Ed25519PublicKey, Path]) -> Path:
    """A freshly published, signed CDN folder of the two small adapters."""
    publish(adapter_sources, tmp_path / "cdn", key=key_pair[0])
    return tmp_path / "cdn"


def count_connections() -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
    """A TCP handler that counts accepted connections in its ``count`` attribute and closes them."""

    def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler.count += 1  # type: ignore[attr-defined]
        writer.close()

    handler.count = 0  # type: ignore[attr-defined]
    return handler
