"""Stop strings in streamed text: hold back just enough to never emit the start of a stop string that may still
complete."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopMatcher"]


class StopMatcher:
    """Holds back just enough text to never emit the start of a stop string that may still complete."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add generated text; return (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            emitted, self.pending = self.pending[: min(hits)], ""
            return emitted, True
        hold = max((len(s) - 1 for s in self.stops), default=0)
        keep = next(
            (
                k
                for k in range(min(hold, len(self.pending)), 0, -1)
                if any(s.startswith(self.pending[-k:]) for s in self.stops)
            ),
            0,
        )
        emitted = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return emitted, False

    def flush(self) -> str:
        """Text held back when generation ends without completing a stop string."""
        emitted, self.pending = self.pending, ""
        return emitted
