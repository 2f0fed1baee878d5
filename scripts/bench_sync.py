"""Benchmark: `edge-rt sync` of a ~100 MB adapter over loopback against a plain aiohttp download, in one run.

Converts a real ~100 MB f16 adapter for the embedded SmolLM2 (every linear layer, rank 164), publishes it with a
signed manifest, serves the CDN folder from a separate process (aiohttp, FileResponse: Range/If-Range/ETag) and
measures, best of --repeat:
  1. plain: aiohttp GET of the blob, bytes thrown into /dev/null (no hashing, no disk);
  2. edge-rt: CdnClient.ensure_cached into an empty cache: manifest fetch + signature/version/expiry checks,
     download, streaming sha256, fsync, atomic rename, fsync of the directory;
  3. resume: the server cuts the first blob response at 50% (connection reset); edge-rt resumes with Range +
     If-Range. Reports the bytes sent after the cut as a share of the file.
Goals: edge-rt throughput >= 0.5x plain; bytes re-sent after a cut at 50% <= 55% of the file.

It also prints the ceiling sha256 alone puts on the ratio when the plain download already keeps every core busy
(loopback on a 2-core machine: the client and the server each take one): plain / (plain + sha256 of the bytes in
memory). The sha256 check before the blob becomes visible is not optional, so no implementation beats that ceiling
on such a machine; on a device's real link (tens of MB/s) the hash is hidden behind the network.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

RANK = 164  # 30 layers x 7 projections x rank 164 x f16 = ~100 MB


def build_cdn(work: Path) -> tuple[Path, Path, str]:
    """Convert and publish the adapter; return (CDN folder, public key path, blob path relative to the CDN)."""
    from bench_convert import write_adapter  # scripts/ is on sys.path when this file runs as a script

    from converters import convert_peft_to_gguf
    from edge_runtime.distribution.keys import generate_key, load_private_key
    from edge_runtime.distribution.publish import publish
    from edge_runtime.runtime.models import default_model_path

    sources = work / "adapters"
    convert_peft_to_gguf(write_adapter(work / "peft", RANK, 30), base=default_model_path(),
                         output=sources / "big-task.gguf", outtype="f16")
    private, public = generate_key(work / "cdn.key")
    result = publish(sources, work / "cdn", key=load_private_key(private))
    return work / "cdn", public, result.manifest.adapters[0].path


def serve(root: Path, port_file: Path) -> None:
    """The CDN process: static files with Range support, a one-shot cut at 50%, and /stats (body bytes sent)."""
    state = {"cut_next": False, "blob_bytes": 0, "blob_requests": 0}

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        if path == "stats":
            return web.json_response(state)
        if path == "cut-next":
            state["cut_next"], state["blob_bytes"], state["blob_requests"] = True, 0, 0
            return web.json_response(state)
        file = root / path
        if ".." in path.split("/") or not file.is_file():
            return web.Response(status=404)
        if not path.startswith("blobs/"):
            return web.FileResponse(file)
        state["blob_requests"] += 1
        if state["cut_next"]:
            state["cut_next"] = False
            return await _cut(request, file, state)
        return web.FileResponse(file, chunk_size=256 * 1024)

    async def count(request: web.Request, response: web.StreamResponse) -> None:
        if request.match_info.get("path", "").startswith("blobs/") and not request.get("cut"):
            state["blob_bytes"] += response.content_length or 0

    async def _cut(request: web.Request, file: Path, stats: dict[str, int | bool]) -> web.StreamResponse:
        request["cut"] = True
        st = file.stat()
        size = st.st_size
        response = web.StreamResponse(headers={"ETag": f'"{st.st_mtime_ns:x}-{st.st_size:x}"'})
        response.content_length = size
        await response.prepare(request)
        half = file.read_bytes()[: size // 2]
        await response.write(half)
        stats["blob_bytes"] = int(stats["blob_bytes"]) + len(half)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/{path:.*}", handle)
        app.on_response_prepare.append(count)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_file.write_text(str(runner.addresses[0][1]))
        await asyncio.Event().wait()

    asyncio.run(main())


async def plain_download(url: str) -> float:
    """Seconds for aiohttp to fetch ``url`` into /dev/null."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        start = time.perf_counter()
        async with session.get(url) as response:
            with open(os.devnull, "wb") as sink:
                async for chunk in response.content.iter_chunked(256 * 1024):
                    sink.write(chunk)
        return time.perf_counter() - start


async def edge_rt_sync(base_url: str, cache: Path, public_key: Path) -> float:
    """Seconds for CdnClient to verify the manifest and download, verify and install the adapter."""
    from edge_runtime.distribution.client import CdnClient
    from edge_runtime.distribution.keys import load_public_key

    start = time.perf_counter()
    async with CdnClient(base_url, cache_dir=cache, public_key=load_public_key(public_key), offline=False) as client:
        await client.ensure_cached("big-task")
    return time.perf_counter() - start


async def stats(base_url: str, path: str = "stats") -> dict[str, int]:
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/{path}") as response:
        data: dict[str, int] = await response.json()
        return data


async def measure(base_url: str, blob: str, public_key: Path, work: Path, repeat: int) -> dict[str, float]:
    size = (work / "cdn" / blob).stat().st_size
    plain, ours = [], []
    for attempt in range(repeat):
        plain.append(await plain_download(f"{base_url}/{blob}"))
        ours.append(await edge_rt_sync(base_url, work / f"cache-{attempt}", public_key))
        # Free the copy's page cache: on this VM, page-cache pages never used before cost ~0.25 s per 100 MB on
        # first touch (the hypervisor backs guest RAM lazily), which a device's physical RAM does not.
        shutil.rmtree(work / f"cache-{attempt}")
    data = (work / "cdn" / blob).read_bytes()
    hashing = []
    for _ in range(repeat):
        start = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        hashing.append(time.perf_counter() - start)
    await stats(base_url, "cut-next")
    await edge_rt_sync(base_url, work / "cache-cut", public_key)
    after = await stats(base_url)
    resent = after["blob_bytes"] - size // 2
    return {"size_mb": size / 1e6, "plain_s": min(plain), "edge_rt_s": min(ours),
            "plain_mb_s": size / 1e6 / min(plain), "edge_rt_mb_s": size / 1e6 / min(ours),
            "throughput_ratio": min(plain) / min(ours), "sha256_s": min(hashing),
            "ceiling_ratio": min(plain) / (min(plain) + min(hashing)), "cores": os.cpu_count() or 0,
            "resent_after_cut_share": resent / size,
            "requests_after_cut": after["blob_requests"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--serve", nargs=2, metavar=("ROOT", "PORT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), Path(args.serve[1]))
        return
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as temp:
        work = Path(temp)
        cdn, public_key, blob = build_cdn(work)
        port_file = work / "port"
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(cdn), str(port_file)])
        try:
            while not port_file.exists() or not port_file.read_text():
                time.sleep(0.05)
            result = asyncio.run(measure(f"http://127.0.0.1:{port_file.read_text()}", blob, public_key, work,
                                         args.repeat))
        finally:
            server.terminate()
            server.wait()
    print(f"| {result['size_mb']:.1f} MB adapter over loopback | seconds | MB/s |")
    print("|---|---|---|")
    print(f"| plain aiohttp GET to /dev/null | {result['plain_s']:.3f} | {result['plain_mb_s']:.0f} |")
    print(f"| edge-rt sync (verify manifest, download, sha256, fsync, rename) | {result['edge_rt_s']:.3f} | "
          f"{result['edge_rt_mb_s']:.0f} |")
    print(f"| sha256 of the bytes in memory (no network, no disk) | {result['sha256_s']:.3f} | "
          f"{result['size_mb'] / result['sha256_s']:.0f} |")
    print(f"\nthroughput ratio edge-rt/plain: {result['throughput_ratio']:.2f} (goal >= 0.5); ceiling from sha256 "
          f"alone when the plain download keeps all {result['cores']} cores busy: {result['ceiling_ratio']:.2f}")
    print(f"bytes re-sent after a cut at 50%: {100 * result['resent_after_cut_share']:.1f}% of the file "
          f"in {result['requests_after_cut'] - 1} more request(s) (goal <= 55%)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
