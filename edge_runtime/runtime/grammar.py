"""Bounds on the JSON schemas and GBNF grammars a request may hand to llama.cpp.

llama-cpp-python turns a JSON schema into GBNF by spelling out every bounded repetition (``maxLength: n`` becomes
n nested optional groups), and llama.cpp parses GBNF recursively: ``maxLength: 100000`` builds 800 kB of text and
then overflows the C stack of the thread that parses it, taking the whole daemon down (measured on 0.3.36), and a
large ``minItems`` builds text in proportion to it. These checks run before either step, on plain data, so such a
schema is a 400 and nothing worse.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
import sys
import threading
from typing import Any

from edge_runtime.errors import GrammarTooComplex, InvalidRequest

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


# -- the work a grammar makes llama.cpp do per token ---------------------------------------------------------------
#
# llama.cpp's grammar sampler keeps one parse stack per way the text so far can continue, and checks every token of
# the vocabulary against every stack on every step (and dedups new stacks by a linear search, so accepting a character
# costs stacks squared). An ambiguous grammar multiplies its stacks: a schema whose level k is `anyOf` two arrays of
# level k-1 doubles them with every `[` (2^22 at 22 levels: hours per token). The measure below parses the GBNF as
# llama.cpp does (groups and repetitions become rules the same way), simulates its stacks character by character, and
# explores the reachable states largest first; the peak number of stacks it meets is what a step can cost. It is plain
# arithmetic on the grammar text, so whether a grammar is accepted never depends on the machine's load.

MAX_STACK_WORK = 1 << 23  # parse stacks × vocabulary size at the worst state found: ~40 ms of sampler work per token
MIN_STACKS = 64  # every vocabulary may keep this many (JSON itself needs ~20)
EXPLORE_STATES = 2000  # parser states the measure visits at most
EXPLORE_WORK = 400_000  # stack steps it takes at most (a second or two of Python)
RULE_STATES = 100  # ... and from each named rule with alternatives: states,
RULE_WORK = 5_000  # stack steps,
TOTAL_WORK = 200_000  # and stack steps over all of those rules
_PARSE_FRAMES = 4 * MAX_NESTING + 1000  # the GBNF parser recurses twice per nested group
_MAX_CHAR = 0x10FFFF
_MAX_GBNF_REPEAT = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD


class _Terminal:
    """One character (or token) position of a rule: a class of code points, or a token id."""

    __slots__ = ("negated", "ranges", "token")

    def __init__(self, ranges: tuple[tuple[int, int], ...], negated: bool, token: int | None = None) -> None:
        self.ranges = ranges
        self.negated = negated
        self.token = token

    def matches(self, symbol: int) -> bool:
        if self.token is not None:  # tokens are the negative symbols -(id + 1)
            return symbol < 0 and (symbol == -(self.token + 1)) != self.negated
        if symbol < 0:
            return False
        return any(lo <= symbol <= hi for lo, hi in self.ranges) != self.negated

    def boundaries(self) -> list[int]:
        if self.token is not None:
            return [-(self.token + 1), -(self.token + 2)]  # the token, and one other
        found = [0x20]  # a printable representative for negated classes and `.`
        for lo, hi in self.ranges:
            found.extend((lo, min(hi + 1, _MAX_CHAR)))
        return found


_Rules = list[list[tuple["_Terminal | int", ...]]]  # rule -> alternatives -> elements (an int refers to a rule)
_Stack = tuple[tuple[int, int, int], ...]  # positions (rule, alternative, element), top last


class _GbnfParser:
    """GBNF text to rules, the way llama.cpp's parser builds them (llama-grammar.cpp, 0.3.36's vendored copy)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.rules: _Rules = []
        self.names: dict[str, int] = {}
        self.defined: set[int] = set()

    def parse(self) -> _Rules:
        self._space(newline_ok=True)
        while self.pos < len(self.text):
            name = self._name()
            rule_id = self._symbol(name)
            self._space(newline_ok=False)
            if not self.text.startswith("::=", self.pos):
                raise ValueError(f"expecting ::= at {self.pos}")
            self.pos += 3
            self._space(newline_ok=True)
            self._alternates(rule_id, nested=False)
            if self.pos < len(self.text) and self.text[self.pos] == "\r":
                self.pos += 1
            if self.pos < len(self.text) and self.text[self.pos] == "\n":
                self.pos += 1
            elif self.pos < len(self.text):
                raise ValueError(f"expecting newline or end at {self.pos}")
            self._space(newline_ok=True)
        missing = [name for name, rule_id in self.names.items() if rule_id not in self.defined]
        if missing:
            raise ValueError(f"undefined rule {missing[0]!r}")
        if "root" not in self.names:
            raise ValueError("no root rule")
        return self.rules

    def _symbol(self, name: str) -> int:
        if name not in self.names:
            self.names[name] = len(self.rules)
            self.rules.append([])
        return self.names[name]

    def _new_rule(self) -> int:
        self.rules.append([])
        self.defined.add(len(self.rules) - 1)
        return len(self.rules) - 1

    def _space(self, *, newline_ok: bool) -> None:
        text = self.text
        while self.pos < len(text) and (text[self.pos] in " \t#" or (newline_ok and text[self.pos] in "\r\n")):
            if text[self.pos] == "#":
                while self.pos < len(text) and text[self.pos] not in "\r\n":
                    self.pos += 1
            else:
                self.pos += 1

    def _name(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and (
            self.text[self.pos].isascii() and (self.text[self.pos].isalnum() or self.text[self.pos] == "-")
        ):
            self.pos += 1
        if self.pos == start:
            raise ValueError(f"expecting a name at {start}")
        return self.text[start : self.pos]

    def _char(self) -> int:
        text = self.text
        if self.pos >= len(text):
            raise ValueError("unexpected end of input")
        if text[self.pos] == "\\":
            kind = text[self.pos + 1 : self.pos + 2]
            widths = {"x": 2, "u": 4, "U": 8}
            if kind in widths:
                digits = text[self.pos + 2 : self.pos + 2 + widths[kind]]
                self.pos += 2 + widths[kind]
                return int(digits, 16)
            self.pos += 2
            escapes = {"t": 9, "r": 13, "n": 10, "\\": 92, '"': 34, "[": 91, "]": 93, "-": 45}
            if kind not in escapes:
                raise ValueError(f"unknown escape at {self.pos - 2}")
            return escapes[kind]
        self.pos += 1
        return ord(text[self.pos - 1])

    def _alternates(self, rule_id: int, *, nested: bool) -> None:
        alternatives = [self._sequence(nested)]
        while self.pos < len(self.text) and self.text[self.pos] == "|":
            self.pos += 1
            self._space(newline_ok=True)
            alternatives.append(self._sequence(nested))
        self.rules[rule_id] = alternatives
        self.defined.add(rule_id)

    def _sequence(self, nested: bool) -> tuple[_Terminal | int, ...]:
        text = self.text
        out: list[_Terminal | int] = []
        last = len(out)  # where the last symbol (what a repetition repeats) starts
        while self.pos < len(text):
            char = text[self.pos]
            if char == '"':
                self.pos += 1
                last = len(out)
                while self.pos < len(text) and text[self.pos] != '"':
                    point = self._char()
                    out.append(_Terminal(((point, point),), False))
                if self.pos >= len(text):
                    raise ValueError("unexpected end of input")
                self.pos += 1
            elif char == "[":
                self.pos += 1
                negated = text.startswith("^", self.pos)
                self.pos += negated
                ranges: list[tuple[int, int]] = []
                while self.pos < len(text) and text[self.pos] != "]":
                    lo = hi = self._char()
                    if text.startswith("-", self.pos) and self.pos + 1 < len(text) and text[self.pos + 1] != "]":
                        self.pos += 1
                        hi = self._char()
                    ranges.append((lo, hi))
                if self.pos >= len(text):
                    raise ValueError("unexpected end of input")
                self.pos += 1
                last = len(out)
                out.append(_Terminal(tuple(ranges), negated))
            elif char in "<!":
                negated = char == "!"
                self.pos += negated
                match = re.compile(r"<\[(\d+)\]>").match(text, self.pos)
                if match is None:  # <token text>: its id needs the vocabulary; any one distinct symbol will do
                    end = text.find(">", self.pos)
                    if end < 0:
                        raise ValueError(f"expecting '>' at {self.pos}")
                    token = 1 << 30 | hash(text[self.pos : end]) & 0xFFFFFF
                    self.pos = end + 1
                else:
                    token = int(match.group(1))
                    self.pos = match.end()
                last = len(out)
                out.append(_Terminal((), negated, token))
            elif char.isascii() and (char.isalnum() or char == "-"):
                last = len(out)
                out.append(self._symbol(self._name()))
            elif char == "(":
                self.pos += 1
                self._space(newline_ok=True)
                sub = self._new_rule()
                self._alternates(sub, nested=True)
                if not text.startswith(")", self.pos):
                    raise ValueError(f"expecting ')' at {self.pos}")
                self.pos += 1
                last = len(out)
                out.append(sub)
            elif char == ".":
                self.pos += 1
                last = len(out)
                out.append(_Terminal(((0, _MAX_CHAR),), False))
            elif char in "*+?{":
                self.pos += 1
                self._space(newline_ok=nested)
                if char == "{":
                    low, high = self._counts(nested)
                else:
                    low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
                out = self._repeat(out, last, low, high)
                continue
            else:
                break
            self._space(newline_ok=nested)
        return tuple(out)

    def _counts(self, nested: bool) -> tuple[int, int | None]:
        match = re.compile(r"(\d+)[ \t]*(?:(,)[ \t]*(\d*)[ \t]*)?}").match(self.text, self.pos)
        if match is None:
            raise ValueError(f"expecting a repetition count at {self.pos}")
        self.pos = match.end()
        self._space(newline_ok=nested)
        low = int(match.group(1))
        if match.group(2) is None:
            return low, low
        return low, int(match.group(3)) if match.group(3) else None

    def _repeat(self, out: list[_Terminal | int], last: int, low: int, high: int | None) -> list[_Terminal | int]:
        # S{m,n} -> S (m times) S'(n-m) with S'(x) ::= S S'(x-1) | ; S{m,} -> S (m times) S' with S' ::= S S' |
        if last == len(out):
            raise ValueError(f"expecting something to repeat before {self.pos}")
        symbol = out[last:]
        if low > _MAX_GBNF_REPEAT or (high is not None and high > _MAX_GBNF_REPEAT):
            raise ValueError(f"a repetition over {_MAX_GBNF_REPEAT} at {self.pos}")
        out = out[:last] + symbol * low
        optional = 1 if high is None else high - low
        previous = -1
        for index in range(optional):
            rule_id = self._new_rule()
            tail: list[_Terminal | int] = [rule_id] if high is None else ([previous] if index > 0 else [])
            self.rules[rule_id] = [tuple(symbol + tail), ()]
            previous = rule_id
        if optional > 0:
            out.append(previous)
        return out


def _advance(rules: _Rules, stack: _Stack, into: set[_Stack], budget: list[int]) -> None:
    """Add to ``into`` the stacks ``stack`` expands to: each with a terminal on top, or empty (the text may end)."""
    todo = [stack]
    seen: set[_Stack] = set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        budget[0] -= 1
        if not current:
            into.add(current)
            continue
        rule_id, alternative, index = current[-1]
        element = rules[rule_id][alternative][index]
        if isinstance(element, _Terminal):
            into.add(current)
            continue
        below = current[:-1]
        if index + 1 < len(rules[rule_id][alternative]):
            below += ((rule_id, alternative, index + 1),)
        for number, sequence in enumerate(rules[element]):
            todo.append(below + ((element, number, 0),) if sequence else below)


def _step(rules: _Rules, stacks: list[_Stack], budget: list[int]) -> frozenset[_Stack]:
    """The stacks after each of ``stacks`` (all with a matching terminal on top) consumed one character."""
    into: set[_Stack] = set()
    for stack in stacks:
        rule_id, alternative, index = stack[-1]
        below = stack[:-1]
        if index + 1 < len(rules[rule_id][alternative]):
            below += ((rule_id, alternative, index + 1),)
        _advance(rules, below, into, budget)
    return frozenset(into)


def parse_stack_peak(
    grammar: str, *, stop_at: int, states: int = EXPLORE_STATES, work: int = EXPLORE_WORK
) -> tuple[int, bool]:
    """The largest number of parse stacks llama.cpp keeps at a state reachable by some text, among the states this
    search visits (largest first), and whether the search from the root saw all reachable states (False: it hit a
    bound, or found ``stop_at`` stacks and stopped). Raises ``ValueError`` for text that is not GBNF.

    A search from the root alone can be kept from the costly part: a long unambiguous prefix (a few enums of long
    strings) uses up its bounds first. So each rule with alternatives is also searched from its own start, with
    bounds of its own (``RULE_STATES``, ``RULE_WORK``; ``TOTAL_WORK`` over all): the stacks a rule keeps from its
    start are a lower bound of what it keeps wherever the grammar reaches it. Only the grammar's named rules are
    searched so (a JSON schema's anyOf, enums and $defs), not the groups the parser makes of repetitions."""
    parser = _GbnfParser(grammar)
    rules = parser.parse()
    peak, complete = _explore(rules, parser.names["root"], stop_at=stop_at, states=states, budget=[work])
    total = [TOTAL_WORK]
    named = set(parser.names.values())  # the schema's own rules (anyOf, enums, $defs), not the parser's groups
    branching = sorted((i for i in named if len(rules[i]) > 1), key=lambda i: -len(rules[i]))
    for rule_id in branching:
        if peak >= stop_at or total[0] <= 0:
            break
        budget = [min(RULE_WORK, total[0])]
        found, _ = _explore(rules, rule_id, stop_at=stop_at, states=RULE_STATES, budget=budget)
        total[0] -= min(RULE_WORK, total[0]) - budget[0]
        peak = max(peak, found)
    return peak, complete and peak < stop_at


def _explore(rules: _Rules, start_rule: int, *, stop_at: int, states: int, budget: list[int]) -> tuple[int, bool]:
    """The search of ``parse_stack_peak`` from ``start_rule``'s start: (peak stacks, whether it saw every state)."""
    start_set: set[_Stack] = set()
    for number, sequence in enumerate(rules[start_rule]):
        _advance(rules, ((start_rule, number, 0),) if sequence else (), start_set, budget)
    start = frozenset(start_set)
    peak = len(start)
    visited = {start}
    frontier: list[tuple[int, int, frozenset[_Stack]]] = [(-len(start), 0, start)]
    serial = 0
    while frontier:
        if peak >= stop_at or len(visited) > states or budget[0] <= 0:
            return peak, False
        _, _, state = heapq.heappop(frontier)
        tops: dict[tuple[int, int, int], list[_Stack]] = {}
        for stack in state:
            if stack:
                tops.setdefault(stack[-1], []).append(stack)
        terminals = [(position, rules[position[0]][position[1]][position[2]]) for position in tops]
        symbols = sorted(
            {point for _, terminal in terminals if isinstance(terminal, _Terminal) for point in terminal.boundaries()}
        )
        done: set[tuple[tuple[int, int, int], ...]] = set()
        for symbol in symbols:
            matching = tuple(
                position
                for position, terminal in terminals
                if isinstance(terminal, _Terminal) and terminal.matches(symbol)
            )
            if not matching or matching in done:
                continue
            done.add(matching)
            following = _step(rules, [stack for position in matching for stack in tops[position]], budget)
            if following not in visited:
                visited.add(following)
                peak = max(peak, len(following))
                serial += 1
                heapq.heappush(frontier, (-len(following), serial, following))
    return peak, True


def stack_limit(n_vocab: int) -> int:
    """How many parse stacks a grammar may reach for a model with ``n_vocab`` tokens."""
    return max(MIN_STACKS, MAX_STACK_WORK // max(1, n_vocab))


_MEASURED: dict[tuple[bytes, int], int] = {}  # (sha256 of a grammar, limit) -> peak: digests, not megabyte texts
_MEASURED_KEEP = 64
_MEASURED_LOCK = threading.Lock()


def _measured(grammar: str, limit: int) -> int:
    key = (hashlib.sha256(grammar.encode()).digest(), limit)
    with _MEASURED_LOCK:
        if key in _MEASURED:
            return _MEASURED[key]
    if sys.getrecursionlimit() < _PARSE_FRAMES:  # Python frames only (3.11 keeps them off the C stack)
        sys.setrecursionlimit(_PARSE_FRAMES)
    peak, _ = parse_stack_peak(grammar, stop_at=limit + 1)
    with _MEASURED_LOCK:
        while len(_MEASURED) >= _MEASURED_KEEP:
            del _MEASURED[next(iter(_MEASURED))]
        _MEASURED[key] = peak
    return peak


def check_bounded(grammar: str, n_vocab: int) -> None:
    """Raise ``GrammarTooComplex`` (400, param ``response_format``) for a grammar whose parse, at some point, keeps more
    stacks than ``stack_limit(n_vocab)``: each one costs a pass over the vocabulary on every token."""
    limit = stack_limit(n_vocab)
    try:
        peak = _measured(grammar, limit)
    except (ValueError, IndexError, RecursionError) as exc:
        raise refused(f"its grammar could not be measured ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if peak > limit:
        raise GrammarTooComplex(stacks=peak, limit=limit)


def converter_problem(exc: Exception) -> str:
    """What llama.cpp's JSON-schema converter failed on, in words a client can act on (it raises bare
    ``KeyError``/``AssertionError`` with its own command-line advice)."""
    text = str(exc.args[0]) if exc.args else ""
    if isinstance(exc, KeyError) and text.startswith("#"):
        return (
            f"its $ref {text!r} could not be resolved by llama.cpp's schema converter (a $ref at the schema's root "
            "to a definition that refers to another is one such case: inline the root definition)"
        )
    if "remote schemas" in text:
        return "a $ref points outside the schema: only local references (#/$defs/..., #/definitions/...) are followed"
    if "Unrecognized schema" in text:
        return 'a part of it is no JSON Schema llama.cpp\'s converter knows (an unknown "type"?)'
    return f"llama.cpp's schema converter failed ({type(exc).__name__}: {text[:200]})"
