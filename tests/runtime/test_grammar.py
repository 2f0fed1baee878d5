"""Bounds on what a request's JSON schema may hand llama.cpp: plain data, no model needed."""

from __future__ import annotations

from typing import Any

import pytest

from edge_runtime.errors import InvalidRequest
from edge_runtime.runtime.grammar import (
    JSON_CHAR_RULE,
    MAX_NESTING,
    check_grammar,
    check_schema,
    nesting_depth,
    with_json_strings,
)


def test_nesting_depth_counts_groups_not_parentheses_in_literals_classes_or_comments() -> None:
    grammar = 'root ::= ("(" (a | "\\")")?)* [()] # ((((\nb ::= ("x")'
    assert nesting_depth(grammar) == 2


@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "maxLength": 100_000}, "maxLength 100000 is outside 0..1000"),  # segfaulted llama.cpp
    ({"type": "array", "items": {"type": "integer"}, "minItems": 10**12}, "minItems"),
    ({"type": "string", "maxLength": -1}, "maxLength -1"),
    ({"type": "object", "properties": {"p": {"type": "string", "pattern": "^a{2,1000000}$"}}}, "1000000 times"),
    ({"enum": ["x" * 70_000]}, "over 64 KiB"),
    (["not", "an", "object"], "must be a JSON object"),
])
def test_schemas_that_would_exhaust_the_converter_or_the_parser_are_refused(schema: Any, words: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_schema(schema)
    assert words in str(refused.value) and refused.value.param == "response_format"


def test_ordinary_schemas_pass_even_with_properties_named_like_keywords() -> None:
    check_schema({"type": "object", "required": ["maxLength"], "properties": {
        "maxLength": {"type": "integer"}, "tags": {"type": "array", "maxItems": 1000, "items": {"type": "string"}},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"}}})


def test_a_grammar_nested_deeper_than_llama_cpp_can_recurse_is_refused() -> None:
    check_grammar("root ::= " + "(" * MAX_NESTING + '"a"' + ")" * MAX_NESTING)
    with pytest.raises(InvalidRequest, match="nests 1025 groups"):
        check_grammar("root ::= " + "(" * (MAX_NESTING + 1) + '"a"' + ")" * (MAX_NESTING + 1))


def test_only_the_converters_char_rule_is_replaced() -> None:
    grammar = 'char ::= [^"\\\\] | "\\\\" ["nt]\nchar-kv ::= "\\"char\\"" space\nroot ::= char-kv'
    lines = with_json_strings(grammar).splitlines()
    assert lines == [JSON_CHAR_RULE, 'char-kv ::= "\\"char\\"" space', "root ::= char-kv"]
