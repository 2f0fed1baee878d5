"""Benchmark: a simulated fleet of N devices following one origin: a real nginx, then a real distribution registry.

Each device is the real CDN client (``CdnClient``: manifest with If-None-Match, signature and version floors,
downloads into its own verified cache) with no model loaded, refreshing on ``RefreshSchedule`` (first refresh spread
over a start window, +-jitter on the interval, backoff after failures). All N devices start at the same instant, as
after a power cut. Figures come from the origin's own access log (nginx: millisecond times; the registry: second
resolution), not from the clients:

  (a) start-of-fleet: the request-rate histogram while N devices boot at once (spread over the window?), and
      that every device verified the first manifest;
  (b) steady state: origin requests and bytes per device per refresh when nothing changed (a 304);
  (c) an update (one adapter's content changes): origin requests and bytes per device, that each device fetched
      the new blob exactly once, the time until 50% and 99% of devices verified the new manifest and hold the blob;
  (d) an outage of the origin for two intervals: requests per device while it is down (backoff) and the rate
      after it returns.

Bounded in time and count: defaults N=500, window 20 s, interval 30 s: about four minutes per origin on a busy
2-core machine. Run: ``python scripts/bench_fleet.py [--devices 500] [--interval 30] [--window 20]
[--origins nginx,registry]``. Needs nginx-light and docker-registry (``.ci/run`` installs them).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))  # the tests' origin launchers
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


@dataclass
class Request:
    """One request the origin answered."""

    time: float
    method: str
    path: str
    status: int
    bytes: int


@dataclass
class Device:
    """One simulated device: a real CDN client and cache, refreshing on its own jittered schedule."""

    index: int
    client: object
    rng: random.Random
    verified: dict[int, float] = field(default_factory=dict)  # manifest version -> when every adapter was cached
    refreshes: list[float] = field(default_factory=list)  # when each refresh started
    failures: int = 0
    errors: int = 0


@dataclass
class Origin:
    """One origin under test: its CDN address, how to publish to it, how to read its access log."""

    name: str
    cdn: str
    publish: Callable[[Path], object]
    log: Callable[[], list[Request]]
    stop: Callable[[], None]
    start: Callable[[], None]


def build_sources(work: Path) -> tuple[Path, Path]:
    """Two small real adapters for SmolLM2 (v1), and v2 where brand-voice has new content."""
    from peft_dirs import lora_tensors, write_peft_dir

    from converters import convert_peft_to_gguf
    from edge_runtime.runtime.models import default_model_path

    v1, v2 = work / "v1", work / "v2"
    v1.mkdir()
    v2.mkdir()
    for name, rank, seed, folder in (("json-extract", 2, 1, v1), ("brand-voice", 4, 2, v1), ("brand-voice", 4, 3, v2)):
        peft = write_peft_dir(work / f"peft-{name}-{seed}", r=rank,
                              tensors=lora_tensors(["q_proj", "k_proj"], rank=rank, seed=seed))
        convert_peft_to_gguf(peft, base=default_model_path(), output=folder / f"{name}.gguf")
    shutil.copy(v1 / "json-extract.gguf", v2 / "json-extract.gguf")  # unchanged in v2: the same bytes
    return v1, v2


@contextmanager
def nginx_origin(work: Path, key: object) -> Iterator[Origin]:
    from nginx import run_nginx

    from edge_runtime.distribution.publish import publish

    with run_nginx(worker_connections=4096) as server:
        def log() -> list[Request]:
            return [Request(float(e[7]), e[0], e[1], int(e[2]), int(e[3])) for e in server.log() if len(e) == 8]

        yield Origin("nginx", server.url, lambda src: publish(src, server.root, key=key), log,  # type: ignore[arg-type]
                     stop=lambda: _move(server.root, work / "nginx-away"),
                     start=lambda: _move(work / "nginx-away", server.root))


def _move(source: Path, target: Path) -> None:
    """Take the published folder away (nginx answers 404) or put it back: the origin's content outage."""
    shutil.move(str(source), str(target))


@contextmanager
def registry_origin(work: Path, key: object) -> Iterator[Origin]:
    from registry import run_registry

    from edge_runtime.distribution.oci import parse_reference
    from edge_runtime.distribution.oci_publish import publish_oci

    with run_registry() as server:
        reference = server.reference()

        def publish(src: Path) -> object:
            return asyncio.run(publish_oci(src, parse_reference(reference), key=key))  # type: ignore[arg-type]

        def log() -> list[Request]:
            return [Request(e.time, e.method, e.path, e.status, e.bytes) for e in server.log()]

        repository = server.data / "docker/registry/v2/repositories/edge"
        yield Origin("registry", reference, publish, log, stop=lambda: _move(repository, work / "registry-away"),
                     start=lambda: _move(work / "registry-away", repository))


async def follow(device: Device, schedule: object, stop: asyncio.Event) -> None:
    """The device's loop: wait its start delay, then sync on its jittered schedule, backing off after failures."""
    from edge_runtime.errors import EdgeRtError

    delay = schedule.start_delay(device.rng)  # type: ignore[attr-defined]
    while not await _sleep_or_stop(delay, stop):
        device.refreshes.append(time.time())
        try:
            report = await device.client.sync()  # type: ignore[attr-defined]
            device.verified.setdefault(report.manifest_version, time.time())
            device.failures = 0
        except EdgeRtError:
            device.failures += 1
            device.errors += 1
        delay = schedule.next_delay(device.rng, failures=device.failures)  # type: ignore[attr-defined]


async def _sleep_or_stop(seconds: float, stop: asyncio.Event) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
        return True
    except asyncio.TimeoutError:
        return False


async def _until(condition: Callable[[], bool], limit_s: float) -> float:
    started = time.monotonic()
    while not condition() and time.monotonic() - started < limit_s:
        await asyncio.sleep(0.2)
    return time.monotonic() - started


def histogram(times: list[float], start: float, seconds: int, *, width: int = 50) -> list[str]:
    """Requests per second as text bars, one line per second from ``start``."""
    counts = Counter(int(t - start) for t in times if start <= t < start + seconds)
    peak = max(counts.values(), default=1)
    return [f"  {s:4d}s {counts.get(s, 0):5d} {'#' * round(width * counts.get(s, 0) / peak)}" for s in range(seconds)]


async def run_fleet(origin: Origin, v1: Path, v2: Path, public: object, work: Path, args: argparse.Namespace) -> None:
    from edge_runtime.distribution.client import CdnClient, SyncSettings
    from edge_runtime.distribution.schedule import RefreshSchedule
    from edge_runtime.distribution.transfer import TransferSettings

    interval, window, n = args.interval, args.window, args.devices
    schedule = RefreshSchedule(interval_s=interval, jitter=0.2, start_window_s=window)
    await asyncio.to_thread(origin.publish, v1)
    await asyncio.sleep(1.5)  # the registry logs whole seconds: keep the publish out of the boot figures
    settings = SyncSettings(transfer=TransferSettings(max_attempts=1, backoff_base_s=0.1), manifest_ttl_s=3600)
    devices = [Device(i, CdnClient(origin.cdn, cache_dir=work / origin.name / f"device-{i}", public_key=public,
                                   offline=False, sync_settings=settings), random.Random(args.seed + i))
               for i in range(n)]
    stop = asyncio.Event()
    t0 = time.time()
    tasks = [asyncio.create_task(follow(d, schedule, stop)) for d in devices]
    await _until(lambda: all(1 in d.verified for d in devices), window + interval)
    booted = sum(1 in d.verified for d in devices)
    steady_from = time.time()
    await asyncio.sleep(interval * 1.25)  # every device refreshes at least once with nothing new
    steady_to = time.time()
    await asyncio.sleep(2.0)  # the registry logs whole seconds: keep the publish out of the steady window
    published = time.time()
    await asyncio.to_thread(origin.publish, v2)
    await _until(lambda: all(2 in d.verified for d in devices), interval * 2.5)
    updated_to = time.time()
    updated = sum(2 in d.verified for d in devices)
    await asyncio.sleep(2.0)  # whole-second logs: keep the outage out of the update figures
    origin.stop()
    down_from = time.time()
    await asyncio.sleep(interval * 2)
    origin.start()
    down_to = time.time()
    await asyncio.sleep(interval * 1.5)
    back_to = time.time()
    stop.set()
    await asyncio.gather(*tasks)
    for device in devices:
        await device.client.close()  # type: ignore[attr-defined]
    await asyncio.sleep(1.5)  # the registry's log lines land
    log = [r for r in origin.log() if r.time >= int(t0) and r.method == "GET"]  # devices only GET; publishes write
    report(origin, devices, log, t0=t0, booted=booted, steady=(steady_from, steady_to), published=published,
           updated=(updated, updated_to), down=(down_from, down_to, back_to), args=args)


def report(origin: Origin, devices: list[Device], log: list[Request], *, t0: float, booted: int,
           steady: tuple[float, float], published: float, updated: tuple[int, float],
           down: tuple[float, float, float], args: argparse.Namespace) -> None:
    n, window, interval = args.devices, args.window, args.interval
    resolution = 1.0 if origin.name == "registry" else 0.001
    print(f"\n== {origin.name}: {n} devices, start window {window} s, refresh every {interval} s +-20% ==")
    boot = [r for r in log if r.time < steady[0]]
    refresh_paths = {r.path for r in boot if r.path.endswith(("manifest.json", "edge-rt-manifest"))}
    first_reads = sorted(r.time for r in boot if r.path in refresh_paths)[:n]  # each device's first read
    spread = first_reads[-1] - first_reads[0] if first_reads else 0.0
    print(f"(a) start-of-fleet: {booted}/{n} devices verified version 1; {len(boot)} requests "
          f"({len(boot) / n:.2f} per device), first manifest reads spread over {spread:.1f} s "
          f"(window {window} s, log resolution {resolution:g} s); peak "
          f"{max(Counter(int(r.time - t0) for r in boot).values(), default=0)} req/s, mean "
          f"{len(boot) / max(spread, 1.0):.1f} req/s. Requests per second:")
    print("\n".join(histogram([r.time for r in boot], int(t0), int(window) + 3)))
    quiet = [r for r in log if steady[0] <= r.time < steady[1]]
    refreshes = sum(1 for d in devices for t in d.refreshes if steady[0] <= t < steady[1])
    statuses = Counter(r.status for r in quiet)
    print(f"(b) steady state: {refreshes} refreshes, {len(quiet)} origin requests = "
          f"{len(quiet) / max(refreshes, 1):.2f} per refresh, {sum(r.bytes for r in quiet) / max(refreshes, 1):.0f} "
          f"body bytes per refresh; statuses {dict(statuses)}")
    count, finished = updated
    change = [r for r in log if int(published) <= r.time < finished + 1]
    new_blob = [r for r in change if r.status in (200, 206) and r.bytes > 4096]
    times = sorted(d.verified[2] - published for d in devices if 2 in d.verified)
    p50 = times[len(times) // 2] if times else float("nan")
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] if times else float("nan")
    bodies = [r for r in change if r.status in (200, 206)]
    print(f"(c) update: {count}/{n} devices verified version 2 and hold its blob; {len(change)} origin requests "
          f"({len(change) / n:.2f} per device: {len(bodies) / n:.2f} with a body, the rest 304 refreshes; statuses "
          f"{dict(Counter(r.status for r in change))}), {sum(r.bytes for r in change) / n / 1e3:.1f} kB per device, "
          f"large-blob GETs {len(new_blob)} ({len(new_blob) / n:.2f} per device, "
          f"{statistics.mean(r.bytes for r in new_blob) / 1e3 if new_blob else 0:.1f} kB each); reached 50% of "
          f"devices after {p50:.1f} s and 99% after {p99:.1f} s (interval {interval} s)")
    down_from, down_to, back_to = down
    outage = [r for r in log if down_from <= r.time < down_to]
    after = [r for r in log if down_to <= r.time < back_to]
    print(f"(d) origin content gone for {down_to - down_from:.0f} s: {len(outage)} requests "
          f"({len(outage) / n:.2f} per device; a fixed {interval} s period would make "
          f"{(down_to - down_from) / interval:.1f}), then {len(after)} in the {back_to - down_to:.0f} s after it "
          f"returned; {sum(d.errors for d in devices)} failed refreshes in all. Requests per second around it:")
    print("\n".join(histogram([r.time for r in log], int(down_from) - 2, int(back_to - down_from) + 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--interval", type=float, default=30.0, help="refresh interval in seconds")
    parser.add_argument("--window", type=float, default=20.0, help="start window in seconds")
    parser.add_argument("--origins", default="nginx,registry")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not 1 <= args.devices <= 5000:
        parser.error("--devices: 1..5000 (bounded: one process, one thread per device cache)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8 * args.devices + 1024)), hard))
    from edge_runtime.distribution.keys import generate_key, load_private_key, load_public_key

    with open("/proc/loadavg") as handle:
        print(f"load before: {handle.read().strip()}")
    work = Path(tempfile.mkdtemp(prefix="edge-rt-fleet-"))
    try:
        v1, v2 = build_sources(work)
        private, public = generate_key(work / "fleet.key")
        key, pub = load_private_key(private), load_public_key(public)
        launchers: dict[str, Callable[[Path, object], AbstractContextManager[Origin]]] = {
            "nginx": nginx_origin, "registry": registry_origin}
        for name in args.origins.split(","):
            with launchers[name](work, key) as origin:
                asyncio.run(run_fleet(origin, v1, v2, pub, work, args))
            with open("/proc/loadavg") as handle:
                print(f"load after {name}: {handle.read().strip()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
