"""Fixtures of the in-process daemon tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def in_process_profile(make_profile: Callable[..., Path]) -> Callable[[str], Path]:
    """A profile whose budget holds the whole test process: in process the runtime shares its RSS with pytest (and
    torch, from other tests), and a daemon over its budget sheds completions (``tests/serve/test_intake.py``)."""
    return lambda name: make_profile(name, budget_mb=16384, ram_mb=32768)
