"""The status page's rendering of states a running daemon shows only for moments (a download under way)."""

from __future__ import annotations

import re
import time

from edge_runtime.serve.status import render_page

COMPUTE = {"threads": 2, "usable_cores": 2, "cores": "2 (affinity 2 CPUs, cgroup quota none)", "warning": None,
           "decode_tokens_per_second": 41.25, "contention": 0.375, "cpu_seconds": 3.0, "cpu_wait_seconds": 1.8}


def test_a_downloading_adapter_shows_its_progress_and_text_is_escaped() -> None:
    status = {"model": "m", "profile": "p", "uptime_s": 5, "queued": 0, "rss_bytes": 100 << 20,
              "resident_adapter_bytes": 0, "plan": {"budget_bytes": 1 << 30, "process_bytes": 1, "model_bytes": 1,
                                                    "kv_cache_bytes": 1, "compute_bytes": 1},
              "adapters": [{"name": "big", "state": "downloading", "downloaded_bytes": 40, "download_total_bytes": 100,
                            "size_bytes": 100, "sha256": "ab" * 32, "users": 0, "last_used": None}],
              "cdn": {"url": "http://cdn/<x>", "offline": False, "version": 3, "last_refresh": time.time(),
                      "last_error": "refused <b>"},
              "recent": [], "compute": COMPUTE}
    page = render_page(status)
    assert re.search(r'data-adapter="big" data-state="downloading">.*downloading 40%', page)
    assert "manifest version 3" in page and "&lt;b&gt;" in page and "<b>" not in page and "&lt;x&gt;" in page
    assert '<meta http-equiv="refresh" content="2">' in page and "http://cdn/" in page and "src=" not in page


def test_the_page_shows_threads_cores_decode_rate_contention_and_the_thread_warning() -> None:
    status = {"model": "m", "profile": "p", "uptime_s": 5, "queued": 0, "rss_bytes": 1, "resident_adapter_bytes": 0,
              "plan": {"budget_bytes": 1 << 30}, "adapters": [], "cdn": None, "recent": [],
              "compute": {**COMPUTE, "warning": "profile <j> asks for compute.threads = 6"}}
    page = render_page(status)
    compute = re.search(r'<p id="compute">(.*?)</p>', page)
    assert compute is not None
    assert compute.group(1).startswith("2 threads · usable cores 2 (affinity 2 CPUs, cgroup quota none) · decode "
                                       "41.2 tok/s over the last minute · CPU contention 38%")
    assert '<p class="error" id="threads-warning">profile &lt;j&gt; asks for compute.threads = 6</p>' in page
    idle = render_page({**status, "compute": {**COMPUTE, "decode_tokens_per_second": 0.0, "contention": 0.0}})
    assert "decode nothing decoded over the last minute · CPU contention 0%" in idle and "threads-warning" not in idle
    # a busy device is said in words whatever the KV type (an f16 profile cannot shed threads): 38% >= 25%
    assert "id=\"device-busy\">the device is busy: the engine's threads waited for a CPU 38%" in page
    assert "device-busy" not in idle
def test_the_page_shows_what_waits_for_downloads_what_runs_and_each_adapters_update() -> None:
    # Issue 18 item 20: the page said "0 queued" while requests waited for a download, and showed neither the
    # download's rate and ETA, nor the running generation, nor an adapter's description and last update.
    status = {"model": "m", "profile": "p", "uptime_s": 5, "queued": 0, "rss_bytes": 100 << 20,
              "resident_adapter_bytes": 0, "plan": {"budget_bytes": 1 << 30, "process_bytes": 1, "model_bytes": 1,
                                                    "kv_cache_bytes": 1, "compute_bytes": 1},
              "waiting_for_downloads": 2, "adapters_total": 3, "adapter_states": {"downloading": 1, "resident": 1,
                                                                                  "remote": 1},
              "parallel": 2, "last_batch_size": 1,
              "running": [{"adapters": "legal", "prompt_tokens": 30, "generated_tokens": 12, "seconds": 2.0,
                           "tokens_per_second": 6.0}],
              "adapters": [{"name": "big", "state": "downloading", "downloaded_bytes": 40, "download_total_bytes": 100,
                            "size_bytes": 100, "sha256": "ab" * 32, "users": 0, "last_used": None,
                            "download_bytes_per_second": 2_500_000, "download_eta_s": 90, "waiting_requests": 2},
                           {"name": "legal", "state": "resident", "size_bytes": 100, "sha256": "cd" * 32, "users": 1,
                            "last_used": time.time(), "description": "Reviews <contracts>",
                            "updated_at": time.time() - 120, "replaced_sha256": "ef" * 32}],
              "cdn": None, "recent": [], "compute": COMPUTE}
    page = render_page(status)
    assert "2 waiting for downloads" in page and "generating 1 of 2 sequences (last decode step: 1 together)" in page
    assert ("<tr><td>generating under legal</td><td>30</td><td>12 tokens</td><td>2.0 s</td><td>6.0 tok/s</td></tr>"
            in page)
    assert "idle (2 sequences at most)" in render_page({**status, "running": []})
    two = [status["running"][0]] * 2  # a step of two sequences that llama.cpp computed one per llama_decode
    split = render_page({**status, "running": two, "last_batch_size": 2, "last_batch_rows": 1})
    assert "generating 2 of 2 sequences (last decode step: 2 sequences, 1 per llama_decode)" in split
    assert re.search(r"downloading 40% at 2\.50 MB/s, [^<,]+ left, 2 requests waiting", page)
    assert "Reviews &lt;contracts&gt;" in page and "replacing <code>efefefefefef</code>" in page
    assert "2 of 3 adapters shown (1 downloading, 1 resident, 1 remote)" in page
