"""GBNF grammars: the JSON ones the API asks for, and the guard every grammar passes before llama.cpp.

llama.cpp parses a grammar by recursive descent, one C++ stack frame per nested group, and a deep
enough grammar overflows the thread's stack: the whole process dies with SIGSEGV. llama-cpp-python's
JSON-schema converter writes a bounded repetition (`maxLength`, `maxItems`, a pattern's `a{0,n}`) as n
nested optional groups, so one schema field is enough. llama.cpp also refuses repetition counts above
2000 itself, but only after printing the whole grammar to stderr. So every grammar is scanned here
first (its size, its group nesting and its repetition counts) and one over a limit is refused with an
InvalidParameter that names the limit. The scan is linear and never recurses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ggufchat.errors import InvalidParameter, Unsupported

PARAM = "response_format"


@dataclass(frozen=True)
class GrammarLimits:
    """Refuse grammars above these. The defaults sit well below where llama.cpp breaks (see
    docs/security.md for the measurements) and above what real JSON schemas need."""

    max_bytes: int = 128 * 1024  # GBNF text
    max_depth: int = 512  # nested ( ) groups: where llama.cpp fails and crashes is in docs/security.md
    max_repeat: int = 1000  # n in {m,n}; llama.cpp itself refuses > 2000 (and dumps the grammar)
    # Alternatives (`|`): sampling tries every vocabulary token against every live alternative, so an
    # enum of thousands of values makes each decode step take seconds for every sequence on the engine.
    max_alternatives: int = 2048
    max_schema_bytes: int = 64 * 1024  # a JSON schema, serialised


_INT = re.compile(r"\s*(\d+)\s*")


def scan(grammar: str) -> tuple[int, int, int]:
    """(deepest group nesting, largest repetition count, number of alternatives) of a GBNF text,
    skipping literals, character classes and comments. Malformed text is llama.cpp's to refuse; this
    only has to be conservative."""
    depth = deepest = repeat = alternatives = 0
    i, n = 0, len(grammar)
    while i < n:
        c = grammar[i]
        if c == '"' or c == "[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif c == "#":
            i = grammar.find("\n", i)
            if i < 0:
                break
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth = max(0, depth - 1)
        elif c == "|":
            alternatives += 1
        elif c == "{":
            end = grammar.find("}", i)
            if end < 0:
                break
            for part in grammar[i + 1:end].split(","):
                if m := _INT.fullmatch(part):
                    repeat = max(repeat, int(m.group(1)))
            i = end
        i += 1
    return deepest, repeat, alternatives


def check(grammar: str, limits: GrammarLimits) -> None:
    """Raise InvalidParameter when the grammar is over a limit (before llama.cpp parses it)."""
    size = len(grammar.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise InvalidParameter(f"the grammar for this response_format is {size} bytes; this server allows "
                               f"{limits.max_bytes}. Lower maxLength / maxItems, or use fewer enum values or "
                               "properties.", param=PARAM)
    depth, repeat, alternatives = scan(grammar)
    if depth > limits.max_depth:
        raise InvalidParameter(f"the grammar for this response_format nests {depth} levels deep; this server "
                               f"allows {limits.max_depth}. Lower maxLength / maxItems / a pattern's {{m,n}} "
                               "bounds, or nest the schema less.", param=PARAM)
    if repeat > limits.max_repeat:
        raise InvalidParameter(f"the grammar for this response_format repeats an item {repeat} times; this "
                               f"server allows {limits.max_repeat}.", param=PARAM)
    if alternatives > limits.max_alternatives:
        raise InvalidParameter(f"the grammar for this response_format has {alternatives} alternatives (enum "
                               f"values, anyOf branches...); this server allows {limits.max_alternatives}.",
                               param=PARAM)


def json_object() -> str:
    """Any JSON object (response_format json_object)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def from_schema(schema: dict[str, Any] | bool, limits: GrammarLimits) -> str:
    """The grammar of a JSON schema, checked against the limits. Slow for big schemas: not on an
    event loop."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    text = json.dumps(schema)
    if len(text) > limits.max_schema_bytes:
        raise InvalidParameter(f"the JSON schema is {len(text)} bytes; this server allows "
                               f"{limits.max_schema_bytes}", param=PARAM)
    try:
        grammar = json_schema_to_gbnf(text)
    except RecursionError as exc:
        raise InvalidParameter("the JSON schema nests too deeply", param=PARAM) from exc
    except Exception as exc:  # the converter raises plain ValueError/KeyError/... on schemas it cannot do
        raise Unsupported(f"this JSON schema cannot be turned into a grammar: {exc}", param=PARAM) from exc
    check(grammar, limits)
    return grammar
