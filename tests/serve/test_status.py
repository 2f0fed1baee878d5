"""The status page's rendering of states a running daemon shows only for moments (a download under way)."""

from __future__ import annotations

import re
import time

from edge_runtime.serve.status import render_page


def test_a_downloading_adapter_shows_its_progress_and_text_is_escaped() -> None:
    status = {"model": "m", "profile": "p", "uptime_s": 5, "queued": 0, "rss_bytes": 100 << 20,
              "resident_adapter_bytes": 0, "plan": {"budget_bytes": 1 << 30, "process_bytes": 1, "model_bytes": 1,
                                                    "kv_cache_bytes": 1, "compute_bytes": 1},
              "adapters": [{"name": "big", "state": "downloading", "downloaded_bytes": 40, "download_total_bytes": 100,
                            "size_bytes": 100, "sha256": "ab" * 32, "users": 0, "last_used": None}],
              "cdn": {"url": "http://cdn/<x>", "offline": False, "version": 3, "last_refresh": time.time(),
                      "last_error": "refused <b>"},
              "recent": []}
    page = render_page(status)
    assert re.search(r'data-adapter="big" data-state="downloading">.*downloading 40%', page)
    assert "manifest version 3" in page and "&lt;b&gt;" in page and "<b>" not in page and "&lt;x&gt;" in page
    assert '<meta http-equiv="refresh" content="2">' in page and "http://cdn/" in page and "src=" not in page
