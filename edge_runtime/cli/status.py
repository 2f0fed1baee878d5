"""``edge-rt status``: what a running daemon is doing, in the terminal (the facts of its status page)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import click

from edge_runtime.cli.common import reports_errors
from edge_runtime.errors import TransferFailed
from edge_runtime.runtime.budget import MEMORY_TERMS
from edge_runtime.runtime.governor import threads_text
from edge_runtime.units import duration

__all__ = ["status"]

MAX_STATUS_BYTES = 4 << 20


@click.command()
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, help="The daemon's address.")
@click.option("--api-key", envvar="EDGE_RT_API_KEY", default=None, help="The daemon's API key, if it has one.")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's /v1/status document.")
@reports_errors
def status(url: str, api_key: str | None, as_json: bool) -> None:
    """What a running daemon is doing: the generations running, memory against its budget, adapters and their states,
    CDN, recent requests."""
    report = _fetch(url.rstrip("/") + "/v1/status", api_key)
    click.echo(json.dumps(report, indent=2) if as_json else _table(url, report))


def _fetch(url: str, api_key: str | None) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read(MAX_STATUS_BYTES + 1)
    except urllib.error.HTTPError as exc:
        fix = "Pass --api-key (or EDGE_RT_API_KEY)" if exc.code == 401 else "Is this an edge-rt daemon?"
        raise TransferFailed(url, f"HTTP {exc.code}", status=exc.code, fix=fix) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransferFailed(
            url, f"no daemon answered ({reason})", fix="Start it with `edge-rt serve`, or pass its --url"
        ) from exc
    if len(body) > MAX_STATUS_BYTES:
        raise TransferFailed(url, "the status document is larger than edge-rt reads")
    data: dict[str, Any] = json.loads(body)
    return data


def _generating(
    running: list[dict[str, Any]] | dict[str, Any] | None,
    parallel: int | None = None,
    batch: int | None = None,
    rows: int | None = None,
) -> str:
    """The generations running now, one phrase each ("idle" when none), after how many of the ``parallel`` sequences
    run and the last decode step's ``batch`` (at most ``rows`` per llama_decode) as the status page says them; an
    older daemon reports one or None."""
    jobs = [running] if isinstance(running, dict) else running or []
    phrases = [
        f"under {job['adapters']}: {job['generated_tokens']} tokens"
        + (f", {job['tokens_per_second']:.1f} tok/s" if job.get("tokens_per_second") else "")
        for job in jobs
    ]
    if not phrases:
        return "idle" if parallel is None else f"idle ({parallel} sequence{'s' if parallel != 1 else ''} at most)"
    if parallel is None:  # an older daemon
        return "; ".join(f"generating {phrase}" for phrase in phrases)
    step = (
        f"{batch} together" if rows is None or rows >= (batch or 0) else f"{batch} sequences, {rows} per llama_decode"
    )
    return f"generating {len(jobs)} of {parallel} sequences (last decode step: {step}): " + "; ".join(phrases)


def _table(url: str, report: dict[str, Any]) -> str:
    mib, plan = 1 << 20, report["plan"]
    now = _generating(
        report.get("running"), report.get("parallel"), report.get("last_batch_size"), report.get("last_batch_rows")
    )
    lines = [
        f"{report['model']} under profile {report['profile']} at {url}, up {duration(report['uptime_s'])}, "
        f"{report['queued']} queued, {report.get('waiting_for_downloads', 0)} waiting for downloads, {now}",
        "memory",
    ]
    rows = [(term.describe(plan), plan.get(term.key, 0)) for term in MEMORY_TERMS]
    rows += [
        ("resident adapters", report["resident_adapter_bytes"]),
        ("runtime budget", plan["budget_bytes"]),
        ("measured RSS", report["rss_bytes"]),
    ]
    lines += [f"  {label:<48}{value / mib:>10.1f} MiB" for label, value in rows]
    total = report.get("adapters_total", len(report["adapters"]))
    states = ", ".join(f"{count} {state}" for state, count in report.get("adapter_states", {}).items())
    lines.append(f"adapters ({total}{f': {states}' if states else ''})")
    for a in report["adapters"]:
        state = a["state"]
        if state == "downloading":
            state += f" {100 * a['downloaded_bytes'] / max(1, a['download_total_bytes']):.0f}%"
            if a.get("download_bytes_per_second"):
                state += f" {a['download_bytes_per_second'] / 1e6:.2f} MB/s"
            if a.get("download_eta_s") is not None:
                state += f" ETA {duration(a['download_eta_s'])}, {a.get('waiting_requests', 0)} waiting"
        used = "never used" if not a.get("last_used") else f"used {duration(time.time() - a['last_used'])} ago"
        update = (
            ""
            if not a.get("updated_at")
            else (
                f"  updated {duration(time.time() - a['updated_at'])} ago from {(a.get('replaced_sha256') or '-')[:12]}"
            )
        )
        lines.append(
            f"  {a['name']:<24}{state:<18}{a['size_bytes'] / 1e6:>8.1f} MB  {a['sha256'][:12]}  "
            f"{a['users']} users  {used}{'  pinned' if a.get('pinned') else ''}{update}"
            + (f"  {a['description']}" if a.get("description") else "")
        )
    if total > len(report["adapters"]):
        lines.append(f"  ... {total - len(report['adapters'])} more (edge-rt status --json, or /v1/status?offset=N)")
    cdn = report.get("cdn")
    if cdn:
        refreshed = "never" if not cdn.get("last_refresh") else f"{duration(time.time() - cdn['last_refresh'])} ago"
        lines.append(
            f"cdn {cdn['url']}{' (offline)' if cdn.get('offline') else ''}: manifest version "
            f"{cdn.get('version') or '-'}, refreshed {refreshed}"
            + (f", last error: {cdn['last_error']}" if cdn.get("last_error") else "")
            + (f", updates waiting (metered link): {', '.join(cdn['deferred'])}" if cdn.get("deferred") else "")
        )
    compute = report.get("compute")
    if compute:  # a daemon older than this CLI has none
        threads = threads_text(compute)
        lines.append(
            f"compute: {threads}, usable cores {compute['cores']}, decode "
            f"{compute['decode_tokens_per_second']:.1f} tok/s and CPU contention "
            f"{100 * compute['contention']:.0f}% over the last minute"
        )
        if compute.get("thread_policy"):
            lines.append(f"  threads: {compute['thread_policy']}")
        if compute.get("warning"):
            lines.append(f"  warning: {compute['warning']}")
    lines.append(f"recent requests ({len(report['recent'])})")
    lines += [
        f"  {time.strftime('%H:%M:%S', time.localtime(r['at']))}  {r['method']} {r['path']}  {r['status']}  "
        f"requested {r['requested']}  ran {r['ran']}  {r['ms']:.0f} ms"
        for r in report["recent"]
    ]
    return "\n".join(_printable(line) for line in lines)


def _printable(text: object) -> str:
    """``text`` with control characters escaped: what a daemon reports (request paths) may come from anyone."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
