"""What every ``edge-rt`` command shares: typed errors become one line on stderr and their exit code."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from edge_runtime.errors import EdgeRtError
from edge_runtime.profiles import MAX_PARALLEL
from edge_runtime.runtime.budget import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["progress_bar", "reports_errors", "request_limit_options"]


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


def _sequences(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``--parallel``'s value: a number of sequences from 1 to MAX_PARALLEL (None: the profile's); anything else is
    refused saying what to give instead."""
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a number of sequences: give 1 to {MAX_PARALLEL}, or leave --parallel out to use the "
            "profile's compute.parallel (a profile's \"auto\" picks 4, 2 or 1 from the memory plan)",
            ctx,
            param,
        ) from None
    if not 1 <= number <= MAX_PARALLEL:
        raise click.BadParameter(f"{number} sequences: give 1 to {MAX_PARALLEL}", ctx, param)
    return number


def parallel_option(command: F) -> F:
    """``--parallel N``: sequences decoded together, as ``serve`` runs them and ``plan`` counts their KV."""
    return click.option(
        "--parallel",
        metavar="N",
        default=None,
        callback=_sequences,
        help=f"Sequences decoded together (1-{MAX_PARALLEL}), each with its own ctx of KV cache [default: the "
        "profile's compute.parallel; a profile's \"auto\" picks 4, 2 or 1 from the memory plan].",
    )(command)


def request_limit_options(command: F) -> F:
    """The daemon's limits on requests, as ``serve`` takes them and ``plan`` counts them in the memory plan."""
    options = [
        click.option(
            "--max-queue",
            type=click.IntRange(min=1),
            default=DEFAULT_MAX_QUEUE,
            show_default=True,
            help="Requests that may wait for the engine, and for their body to be read; more get 503.",
        ),
        click.option(
            "--max-body-kb",
            type=click.IntRange(min=1),
            default=DEFAULT_MAX_BODY_BYTES // 1024,
            show_default=True,
            help="Request body cap in KiB.",
        ),
        click.option(
            "--max-connections",
            type=click.IntRange(min=4),
            default=None,
            help="Open connections allowed; past them idle ones are closed, then new ones get 503 "
            "[default: --max-queue + 6].",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command
