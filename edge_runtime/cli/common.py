"""What every ``edge-rt`` command shares: typed errors become one line on stderr and their exit code."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from edge_runtime.errors import EdgeRtError

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["progress_bar", "reports_errors"]


def reports_errors(command: F) -> F:
    """Turn an ``EdgeRtError`` into one clear line on stderr and the error's exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except EdgeRtError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            raise SystemExit(exc.exit_code) from exc

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a bar on stderr from its first call (so nothing claims progress
    for an input refused before the work starts); the bar is closed on exit."""
    bars: list[Any] = []

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(click.progressbar(length=total, label=label, file=sys.stderr))
            bars[0].__enter__()
        bars[0].update(done - bars[0].pos)

    try:
        yield progress
    finally:
        if bars:
            bars[0].__exit__(None, None, None)
