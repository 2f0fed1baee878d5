"""What the device is doing, for an operator: one set of facts as JSON (``/v1/status``, ``edge-rt status``) and as a
self-refreshing HTML page (``/``) with no external assets (devices are often offline).

The facts: the memory budget split as ``edge-rt plan`` splits it, measured RSS, every adapter with its state
(``remote``, ``downloading`` with progress, ``cached``, ``resident``, ``active``), the CDN the daemon follows, and
the most recent requests; the engine's threads, the cores the process may use, and over the last minute its decode
rate and CPU contention (a busy device is visible, not a mystery).
"""

from __future__ import annotations

import html
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from edge_runtime.runtime.budget import MEMORY_TERMS
from edge_runtime.runtime.governor import threads_text
from edge_runtime.units import duration as _duration
from edge_runtime.units import mib as _mib

__all__ = ["RecentRequest", "render_page"]

REFRESH_S = 2


@dataclass(frozen=True)
class RecentRequest:
    """One answered request, for the page's recent-requests table."""

    at: float  # seconds since the epoch
    method: str
    path: str
    status: int
    requested: str
    ran: str
    ms: float


def recent_json(recent: deque[RecentRequest]) -> list[dict[str, Any]]:
    """The recent requests, newest first."""
    return [asdict(r) for r in reversed(recent)]


_STATE_COLOURS = {
    "remote": "#9aa5b1",
    "downloading": "#d69e2e",
    "cached": "#4a5568",
    "resident": "#2f855a",
    "active": "#c53030",
}
_TERM_COLOURS = {
    "process_bytes": "#718096",
    "model_bytes": "#2b6cb0",
    "kv_cache_bytes": "#6b46c1",
    "compute_bytes": "#b7791f",
    "request_buffer_bytes": "#dd6b20",
}
_BAR = [(term.label, term.key, _TERM_COLOURS[term.key]) for term in MEMORY_TERMS]
_BAR.append(("adapters", "resident_adapter_bytes", "#2f855a"))


def render_page(status: dict[str, Any]) -> str:
    """The status page for ``status`` (the ``/v1/status`` document), refreshing itself every few seconds."""
    plan = status["plan"]
    budget = max(1, plan["budget_bytes"])
    used = sum(plan.get(key, status.get(key, 0)) for _, key, _ in _BAR)
    segments = "".join(
        f'<div class="seg" title="{label}: {_mib(value)}" '
        f'style="width:{100 * value / budget:.2f}%;background:{colour}"></div>'
        for label, key, colour in _BAR
        for value in [plan.get(key, status.get(key, 0))]
    )
    legend = "".join(
        f'<span><i style="background:{colour}"></i>{label} {_mib(plan.get(key, status.get(key, 0)))}</span>'
        for label, key, colour in _BAR
    )
    return _PAGE.format(
        refresh=REFRESH_S,
        title=_e(f"edge-rt · {status['model']}"),
        model=_e(status["model"]),
        profile=_e(status["profile"]),
        uptime=_duration(status["uptime_s"]),
        queued=status["queued"],
        waiting=status.get("waiting_for_downloads", 0),
        running=_running(
            status.get("running", []),
            status.get("parallel", 1),
            status.get("last_batch_size", 0),
            status.get("last_batch_rows"),
        ),
        running_rows=_running_rows(status.get("running", [])),
        segments=segments,
        legend=legend,
        free=_mib(budget - used),
        budget=_mib(budget),
        rss=_mib(status["rss_bytes"]),
        adapters=_adapter_rows(status["adapters"]) + _more_row(status),
        cdn=_cdn(status.get("cdn")),
        recent=_recent_rows(status["recent"]),
        compute=_compute(status["compute"]),
    )


BUSY_CONTENTION = 0.25  # over the last minute: other work took the cores the engine's threads wanted


def _compute(compute: dict[str, Any]) -> str:
    """Threads and usable cores, the last minute's decode rate and contention, and the profile's warning if any."""
    rate = compute["decode_tokens_per_second"]
    speed = f"{rate:.1f} tok/s" if rate else "nothing decoded"
    threads = _e(threads_text(compute))
    line = (
        f'<p id="compute">{threads} · usable cores {_e(compute["cores"])} · decode {speed} '
        f"over the last minute · CPU contention {100 * compute['contention']:.0f}% (share of the time the "
        "engine's threads waited for a CPU)</p>"
    )
    if compute["contention"] >= BUSY_CONTENTION:
        line += (
            f'<p class="error" id="device-busy">the device is busy: the engine\'s threads waited for a CPU '
            f"{100 * compute['contention']:.0f}% of the time they wanted one over the last minute</p>"
        )
    if compute.get("thread_policy"):
        line += f'<p class="sub" id="thread-policy">threads: {_e(compute["thread_policy"])}</p>'
    warning = compute.get("warning")
    return line + (f'<p class="error" id="threads-warning">{_e(warning)}</p>' if warning else "")


def _running(running: list[dict[str, Any]], parallel: int, batch: int, rows: int | None) -> str:
    if not running:
        return f"idle ({parallel} sequence{'s' if parallel != 1 else ''} at most)"
    step = f"{batch} together" if rows is None or rows >= batch else f"{batch} sequences, {rows} per llama_decode"
    return f"generating {len(running)} of {parallel} sequences (last decode step: {step})"


def _more_row(status: dict[str, Any]) -> str:
    shown, total = len(status["adapters"]), status.get("adapters_total", len(status["adapters"]))
    if total <= shown:
        return ""
    states = ", ".join(f"{count} {state}" for state, count in status.get("adapter_states", {}).items())
    return (
        f'<tr><td colspan="7">{shown} of {total} adapters shown ({_e(states)}); all of them: '
        f"<code>/v1/status?offset={shown}&amp;limit=1000</code></td></tr>"
    )


def _adapter_rows(adapters: list[dict[str, Any]]) -> str:
    rows = []
    for a in adapters:
        state = a["state"]
        if state == "downloading":
            done, total = a.get("downloaded_bytes", 0), max(1, a.get("download_total_bytes", 1))
            state_text = f"downloading {100 * done / total:.0f}%"
            if a.get("download_bytes_per_second"):
                state_text += f" at {a['download_bytes_per_second'] / 1e6:.2f} MB/s"
            if a.get("download_eta_s") is not None:
                state_text += f", {_duration(a['download_eta_s'])} left"
            if a.get("waiting_requests"):
                state_text += f", {a['waiting_requests']} requests waiting"
        else:
            state_text = state
        about = _e(a.get("description", ""))
        if a.get("updated_at"):
            about += (
                f' <span class="sub">updated {_duration(time.time() - a["updated_at"])} ago, replacing '
                f"<code>{_e((a.get('replaced_sha256') or '-')[:12])}</code></span>"
            )
        last = "never" if not a.get("last_used") else f"{_duration(time.time() - a['last_used'])} ago"
        rows.append(
            f'<tr data-adapter="{_e(a["name"])}" data-state="{_e(state)}"><td>{_e(a["name"])}</td>'
            f'<td><span class="badge" style="background:{_STATE_COLOURS.get(state, "#4a5568")}">'
            f"{_e(state_text)}</span>{' 📌' if a.get('pinned') else ''}</td>"
            f"<td>{_mib(a['size_bytes'])}</td><td><code>{_e(a['sha256'][:12])}</code></td>"
            f"<td>{a['users']}</td><td>{last}</td><td>{about}</td></tr>"
        )
    return "".join(rows) or '<tr><td colspan="7">no adapters</td></tr>'


def _cdn(cdn: dict[str, Any] | None) -> str:
    if not cdn:
        return "<p>Not following a CDN (start with <code>--cdn URL</code>).</p>"
    refreshed = "never" if not cdn.get("last_refresh") else f"{_duration(time.time() - cdn['last_refresh'])} ago"
    error = f'<p class="error">Last error: {_e(cdn["last_error"])}</p>' if cdn.get("last_error") else ""
    if cdn.get("deferred"):
        error += f"<p>Updates waiting (metered link): {_e(', '.join(cdn['deferred']))}</p>"
    mode = " (offline)" if cdn.get("offline") else ""
    return (
        f"<p><code>{_e(cdn['url'])}</code>{mode} · manifest version {cdn.get('version') or '-'} · refreshed "
        f"{refreshed}</p>{error}"
    )


def _running_rows(running: list[dict[str, Any]]) -> str:
    rows = []
    for r in running:
        rate = f"{r['tokens_per_second']:.1f} tok/s" if r.get("tokens_per_second") else "-"
        rows.append(
            f"<tr><td>generating under {_e(r['adapters'])}</td><td>{r['prompt_tokens']}</td>"
            f"<td>{r['generated_tokens']} tokens</td><td>{r['seconds']:.1f} s</td><td>{rate}</td></tr>"
        )
    return "".join(rows) or '<tr><td colspan="5">nothing generating</td></tr>'


def _recent_rows(recent: list[dict[str, Any]]) -> str:
    rows = [
        f"<tr><td>{time.strftime('%H:%M:%S', time.localtime(r['at']))}</td><td>{_e(r['method'])} "
        f"{_e(r['path'])}</td><td>{r['status']}</td><td>{_e(r['requested'])}</td><td>{_e(r['ran'])}</td>"
        f"<td>{r['ms']:.0f} ms</td></tr>"
        for r in recent
    ]
    return "".join(rows) or '<tr><td colspan="6">no requests yet</td></tr>'


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{refresh}">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>
<link rel="icon" href="data:,">
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1a202c; }}
h1 {{ font-size: 1.3em; margin: 0 0 .2em; }} h2 {{ font-size: 1.05em; margin: 1.4em 0 .4em; }}
.sub {{ color: #4a5568; }} .bar {{ display: flex; height: 26px; border: 1px solid #cbd5e0; border-radius: 4px;
overflow: hidden; background: #edf2f7; }} .seg {{ height: 100%; }}
.legend span {{ margin-right: 1.2em; white-space: nowrap; }} .legend i {{ display: inline-block; width: 10px;
height: 10px; margin-right: 4px; border-radius: 2px; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ text-align: left; padding: 4px 10px 4px 0;
border-bottom: 1px solid #edf2f7; }} th {{ color: #4a5568; font-weight: 600; }}
.badge {{ color: white; padding: 1px 8px; border-radius: 10px; font-size: .9em; }} .error {{ color: #c53030; }}
</style></head><body>
<h1>edge-rt · {model}</h1>
<div class="sub">profile {profile} · up {uptime} · {queued} queued · {waiting} waiting for downloads · {running}
· RSS {rss} of a {budget} budget</div>
<h2>Compute</h2>{compute}
<h2>Memory budget</h2>
<div class="bar">{segments}</div>
<div class="legend">{legend}<span>free {free}</span></div>
<h2>Adapters</h2>
<table><thead><tr><th>name</th><th>state</th><th>size</th><th>sha256</th><th>users</th><th>last use</th>
<th>about</th></tr></thead>
<tbody>{adapters}</tbody></table>
<h2>Generating now</h2>
<table><thead><tr><th>adapters</th><th>prompt tokens</th><th>generated</th><th>for</th><th>tok/s</th></tr></thead>
<tbody>{running_rows}</tbody></table>
<h2>CDN</h2>{cdn}
<h2>Recent requests</h2>
<table><thead><tr><th>time</th><th>request</th><th>status</th><th>requested</th><th>ran</th><th>took</th></tr>
</thead><tbody>{recent}</tbody></table>
</body></html>
"""
