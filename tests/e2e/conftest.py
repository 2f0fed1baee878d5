"""Fixtures: the adapters and profile a daemon serves, and one shared daemon."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemons import Daemon, run_daemon


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory: pytest.TempPathFactory, adapter_files: list[Path]) -> Path:
    """Three adapters named a, b and c, as `--adapters-dir` expects them."""
    folder = tmp_path_factory.mktemp("served-adapters")
    for name, source in zip("abc", adapter_files):
        shutil.copy(source, folder / f"{name}.gguf")
    return folder


@pytest.fixture(scope="session")
def serve_profile(make_profile: Callable[..., Path]) -> Path:
    return make_profile("serve-e2e", budget_mb=1024, ctx=1024)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, adapters_dir: Path, serve_profile: Path) -> Iterator[Daemon]:
    """The shared daemon most tests talk to."""
    log = tmp_path_factory.mktemp("daemon") / "serve.log"
    with run_daemon("--profile", str(serve_profile), "--adapters-dir", str(adapters_dir), "--max-body-kb", "64",
                    log=log) as running:
        yield running
