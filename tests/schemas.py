"""JSON schemas tests share."""

from __future__ import annotations

from typing import Any


def nested_anyof(levels: int) -> dict[str, Any]:
    """The hostile review's schema: level k is anyOf an array of exactly 1 and one of exactly 2 items of level k-1,
    so the grammar's parse states double per level."""
    defs: dict[str, Any] = {"l0": {"type": "integer"}}
    for k in range(1, levels + 1):
        below = {"$ref": f"#/$defs/l{k - 1}"}
        defs[f"l{k}"] = {"anyOf": [{"type": "array", "items": below, "minItems": 1, "maxItems": 1},
                                   {"type": "array", "items": below, "minItems": 2, "maxItems": 2}]}
    return {"$defs": defs, "anyOf": [{"$ref": f"#/$defs/l{levels}"}]}  # (a top-level $ref leaves inner ones unread)
