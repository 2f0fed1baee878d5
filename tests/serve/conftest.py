"""Fixtures of the in-process daemon tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.profiles import load_profile
from edge_runtime.runtime.budget import RequestLimits
from edge_runtime.runtime.core import Runtime


@pytest.fixture
def in_process_profile(make_profile: Callable[..., Path]) -> Callable[[str], Path]:
    """A profile whose budget holds the whole test process: in process the runtime shares its RSS with pytest (and
    torch, from other tests), and a daemon over its budget sheds completions (``tests/serve/test_intake.py``)."""
    return lambda name: make_profile(name, budget_mb=16384, ram_mb=32768)


@pytest.fixture
def runtime_with(in_process_profile: Callable[[str], Path]) -> Iterator[Callable[..., Runtime]]:
    """Runtimes on an in-process profile (ctx 512) with the daemon's request limits given as ``RequestLimits``
    fields: the daemon reads its body cap and queue bound from the runtime's memory plan."""
    made: list[Runtime] = []

    def make(**limits: Any) -> Runtime:
        made.append(Runtime(load_profile(str(in_process_profile("limits"))), ctx=512,
                            requests=RequestLimits(**limits)))
        return made[-1]

    yield make
    for runtime in made:
        runtime.close()
