"""``edge-rt cache ls|rm|gc``: the operator's view of the device's adapter cache."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edge_runtime.cli.common import reports_errors
from edge_runtime.gguf.info import read_info

__all__ = ["cache_group"]


_CACHE_DIR = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Adapter cache [default: $EDGE_RT_HOME/adapters].",
)


@click.group("cache")
@_CACHE_DIR
@click.pass_context
def cache_group(ctx: click.Context, cache_dir: Path | None) -> None:
    """Look into and tidy the device's adapter cache (safe beside running daemons: what they serve is kept)."""
    ctx.obj = cache_dir


def _with_store(command: Callable[..., None]) -> Callable[..., None]:
    """``--cache-dir`` after the subcommand too (``cache ls --cache-dir X``); the store is the first argument."""

    def run(group_dir: Path | None, /, *args: Any, cache_dir: Path | None, **kwargs: Any) -> None:
        from edge_runtime import settings
        from edge_runtime.distribution.store import AdapterStore

        if cache_dir and group_dir and cache_dir.resolve() != group_dir.resolve():
            raise click.UsageError(f"--cache-dir was given twice, as {group_dir} and as {cache_dir}: give one")
        chosen = cache_dir or group_dir
        if chosen is not None and not chosen.is_dir():  # a typo must not become a new, empty cache
            raise click.UsageError(f"--cache-dir {chosen} does not exist: no adapter cache there (a typo?)")
        command(AdapterStore(chosen or settings.adapter_cache_dir()), *args, **kwargs)

    run.__name__, run.__doc__ = command.__name__, command.__doc__  # click names the command and its help from these
    return _CACHE_DIR(click.pass_obj(run))


@cache_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_with_store
@reports_errors
def cache_ls(store: Any, as_json: bool) -> None:
    """What is cached: name, size, sha256, the base it was converted for, last use, and whether a daemon uses it."""
    import time

    rows = []
    for cached in store.adapters():
        info = read_info(cached.path)
        rows.append(
            {
                "name": cached.name,
                "size_bytes": cached.size,
                "sha256": cached.sha256,
                "base_fingerprint": info.base_fingerprint,
                "last_used": cached.last_used,
                "in_use": store.in_use(cached.sha256),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        age = time.time() - row["last_used"]
        click.echo(
            f"{row['name']}  {row['size_bytes'] / 1e6:.2f} MB  sha256 {row['sha256'][:16]}  "
            f"base {(row['base_fingerprint'] or '?')[:12]}  used {age / 3600:.1f} h ago"
            + ("  in use by a daemon" if row["in_use"] else "")
        )
    click.echo(f"{len(rows)} adapters, {store.usage_bytes() / 1e6:.2f} MB in {store.root}", err=True)


@cache_group.command("rm")
@click.argument("names", nargs=-1, required=True)
@_with_store
@reports_errors
def cache_rm(store: Any, names: tuple[str, ...]) -> None:
    """Remove adapters from the cache (refused for one a running daemon serves)."""
    from edge_runtime.errors import AdapterNotFound, InvalidTransition

    for name in names:
        cached = store.lookup(name)
        if cached is None:
            raise AdapterNotFound(name, store.names())
        if store.in_use(cached.sha256):
            raise InvalidTransition(
                name,
                "in use by a running daemon",
                "removed",
                fix="A running daemon serves it (its lease ends with it): stop that daemon first",
            )
        store.evict(name)
        click.echo(f"removed {name} ({cached.size / 1e6:.2f} MB)")


@cache_group.command("gc")
@_with_store
@reports_errors
def cache_gc(store: Any) -> None:
    """Verify every blob, finish or drop interrupted downloads, and delete blobs no name uses."""
    from edge_runtime.distribution.recovery import recover

    report = recover(store)
    dropped = store.collect_garbage()
    click.echo(
        f"verified {len(report.verified)} blobs, removed {len(report.removed_corrupt)} corrupt, "
        f"{len(dropped)} unused and {len(report.removed_files)} stray files; "
        f"{len(report.resumable)} downloads kept for resuming"
    )
