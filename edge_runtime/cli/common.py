"""What every ``edge-rt`` command shares: typed errors become one line on stderr and their exit code."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from edge_runtime.errors import EdgeRtError

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["reports_errors"]


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
