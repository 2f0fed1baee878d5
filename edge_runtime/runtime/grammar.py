"""Bounds on the JSON schemas and GBNF grammars a request may hand to llama.cpp.

llama-cpp-python turns a JSON schema into GBNF by spelling out every bounded repetition (``maxLength: n`` becomes
n nested optional groups), and llama.cpp parses GBNF recursively: ``maxLength: 100000`` builds 800 kB of text and
then overflows the C stack of the thread that parses it, taking the whole daemon down (measured on 0.3.36), and a
large ``minItems`` builds text in proportion to it. These checks run before either step, on plain data, so such a
schema is a 400 and nothing worse.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edge_runtime.errors import InvalidRequest

MAX_SCHEMA_BYTES = 64 * 1024  # a schema's JSON text; converting one this size takes at most a few seconds
MAX_REPEAT = 1000  # minLength/maxLength/minItems/maxItems and {n,m} in patterns
MAX_GRAMMAR_BYTES = 1 << 20  # GBNF text handed to llama.cpp
MAX_NESTING = 1024  # parenthesised groups inside each other (llama.cpp recurses once per level)
_REPEAT_KEYS = frozenset({"minLength", "maxLength", "minItems", "maxItems"})
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")
# One character of a JSON string. llama-cpp-python 0.3.36's converter writes `[^"\\]` first, which lets raw
# newlines and other control characters into strings and makes the output invalid JSON (seen on SmolLM2).
JSON_CHAR_RULE = r'char ::= [^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_CHAR_RULE = re.compile(r"^char ::= .*$", re.MULTILINE)  # the converter's own: a property's rule is `char-`
PARAM = "response_format"


def refused(reason: str) -> InvalidRequest:
    """The 400 for a response format that cannot become a grammar."""
    return InvalidRequest(f"response_format cannot become a llama.cpp grammar: {reason}", param=PARAM)


def check_schema(schema: Any) -> None:
    """Raise ``InvalidRequest`` (param ``response_format``) for a schema too large to convert safely."""
    if not isinstance(schema, dict):
        raise refused("json_schema.schema must be a JSON object")
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError, RecursionError) as exc:
        raise refused(f"the schema is not plain JSON of sane depth ({type(exc).__name__})") from exc
    if size > MAX_SCHEMA_BYTES:
        raise refused(f"the schema is over {MAX_SCHEMA_BYTES // 1024} KiB of JSON")
    stack: list[Any] = [schema]
    while stack:  # no recursion: the depth of a schema is the client's choice
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in _REPEAT_KEYS and _is_number(value) and not 0 <= value <= MAX_REPEAT:
                    raise refused(f"{key} {value} is outside 0..{MAX_REPEAT}")
                if key == "pattern" and isinstance(value, str):
                    _check_pattern(value)
                stack.append(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_pattern(pattern: str) -> None:
    for match in _QUANTIFIER.finditer(pattern):
        for digits in match.groups():
            if digits and (len(digits) > 6 or int(digits) > MAX_REPEAT):
                raise refused(f"the pattern repeats something {digits} times (at most {MAX_REPEAT})")


def with_json_strings(grammar: str) -> str:
    """A converted schema's grammar with its string characters limited to what JSON allows unescaped."""
    return _CHAR_RULE.sub(lambda _: JSON_CHAR_RULE, grammar)


def check_grammar(grammar: str) -> None:
    """Raise ``InvalidRequest`` (param ``response_format``) for GBNF text too large or too deep to parse safely."""
    if len(grammar.encode()) > MAX_GRAMMAR_BYTES:
        raise refused(f"its grammar would be over {MAX_GRAMMAR_BYTES >> 20} MiB")
    depth = nesting_depth(grammar)
    if depth > MAX_NESTING:
        raise refused(f"its grammar nests {depth} groups deep (at most {MAX_NESTING})")


def nesting_depth(grammar: str) -> int:
    """How deep parenthesised groups nest in GBNF text (parentheses in literals, classes and comments excluded)."""
    depth = deepest = 0
    closing: str | None = None  # the character that ends the literal or class being read
    escaped = comment = False
    for char in grammar:
        if comment:
            comment = char != "\n"
        elif closing is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == closing:
                closing = None
        elif char in '"[':
            closing = '"' if char == '"' else "]"
        elif char == "#":
            comment = True
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
    return deepest
