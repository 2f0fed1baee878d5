"""Adapter names and content digests: the one check every name passes before it becomes a key, a header value or
part of a path."""

from __future__ import annotations

import re

from edge_runtime.errors import InvalidName

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)
SHA256_HEX = "[0-9a-f]{64}"  # a content digest as blobs, refs and manifests spell it (lower-case hex)
SHA256_NAME = re.compile(f"^{SHA256_HEX}$")


def validate_name(name: str) -> str:
    """Return ``name`` unchanged when it is a safe adapter name, else raise ``InvalidName``."""
    # fullmatch, not match: `$` would accept a trailing newline.
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or name in {".", ".."} or ".." in name:
        raise InvalidName(repr(name) if not isinstance(name, str) else name, NAME_PATTERN)
    return name


# C0 and C1 controls and DEL: what a terminal or a log reader would act on (newlines forge log lines, ESC sequences
# rewrite the operator's screen).
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    """``text`` with control characters written as ``\\xNN``, for log lines and terminal output of untrusted text."""
    return text.translate(_CONTROLS)
