"""`edge-rt status` in the terminal: the running generations line, for this daemon's report and an older one's."""

from __future__ import annotations

from edge_runtime.cli.status import _generating


def test_every_running_generation_is_listed_and_an_older_daemons_single_one_still_reads() -> None:
    # Issue 19: /v1/status reports the generations running together as a list (it was one object or null).
    running = [{"adapters": "legal", "generated_tokens": 12, "tokens_per_second": 6.0},
               {"adapters": "base", "generated_tokens": 3, "tokens_per_second": None}]
    assert _generating(running) == "generating under legal: 12 tokens, 6.0 tok/s; generating under base: 3 tokens"
    assert _generating([]) == _generating(None) == "idle"
    assert _generating(running[0]) == "generating under legal: 12 tokens, 6.0 tok/s"
    # Beside this daemon's parallel and last batch size it says them as the status page does.
    assert _generating(running, 4, 2) == ("generating 2 of 4 sequences (last decode step: 2 together): under legal: "
                                          "12 tokens, 6.0 tok/s; under base: 3 tokens")
    assert _generating([], 4, 0) == "idle (4 sequences at most)"
    assert _generating([], 1, 0) == "idle (1 sequence at most)"
    # A step whose sequences llama.cpp computed one per llama_decode (float adapter weights on a LLAMAFILE build).
    assert _generating(running, 4, 2, 1).startswith("generating 2 of 4 sequences (last decode step: 2 sequences, 1 per "
                                                    "llama_decode): under legal")
    assert _generating(running, 4, 2, 2).startswith("generating 2 of 4 sequences (last decode step: 2 together): ")
