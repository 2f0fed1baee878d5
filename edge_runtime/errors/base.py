"""The base of every error edge-rt raises on purpose."""

from __future__ import annotations

from typing import ClassVar

__all__ = ["EdgeRtError"]


class EdgeRtError(Exception):
    """Base of every error edge-rt raises on purpose; ``fix`` tells the user what to do next."""

    http_status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1
    error_type: ClassVar[str] = "edge_rt_error"

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}. {fix}")
