"""Deciding whether a JSON object a model wrote is a call of one of the offered tools.

Models write calls in more shapes than their templates teach ("arguments" or "parameters", the
arguments as an object or as a JSON string holding one), so every shape is accepted here; but a
call must name an offered tool and its arguments must satisfy that tool's schema, otherwise it is
not a call at all and the parser shows the model's text as content. A tool schema that is itself
broken constrains nothing rather than failing the request: the grammar builder is where a bad
schema is refused (InvalidParameter), the parser only has to never crash."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import Any

from ggufchat.formats.events import ToolSpec

# Keys that may open a call object; any other first key means the object is an answer, not a call.
CALL_KEYS = frozenset({"name", "arguments", "parameters", "function"})


class _AnyArguments:
    def is_valid(self, _instance: Any) -> bool:
        return True


class Toolbox:
    """The tools of one request, with a validator per tool (built once, used for every call)."""

    def __init__(self, tools: Sequence[ToolSpec]) -> None:
        self.tools = {tool.name: tool for tool in tools}
        self._validators: dict[str, Any] = {}

    def __bool__(self) -> bool:
        return bool(self.tools)

    def _validator(self, name: str):
        validator = self._validators.get(name)
        if validator is None:
            schema = self.tools[name].parameters
            try:
                key = json.dumps(schema, sort_keys=True)
            except (TypeError, ValueError):
                validator = _AnyArguments()
            else:
                validator = _cached_validator(key)
            self._validators[name] = validator
        return validator

    def call(self, obj: Any) -> tuple[str, str] | None:
        """(name, JSON text of the arguments) when obj is a valid call of one of the tools, else None."""
        if not isinstance(obj, dict):
            return None
        if "name" not in obj and isinstance(obj.get("function"), dict):
            obj = obj["function"]  # the OpenAI wire shape {"type": "function", "function": {...}}
        name = obj.get("name", obj.get("function"))
        if not isinstance(name, str) or name not in self.tools:
            return None
        arguments = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        try:
            valid = self._validator(name).is_valid(arguments)
        except Exception:  # a schema the validator cannot use (an unresolvable $ref, ...) constrains nothing
            valid = True
        if not valid:
            return None
        return name, json.dumps(arguments, ensure_ascii=False)

    def call_text(self, text: str) -> tuple[str, str] | None:
        try:
            return self.call(json.loads(text))
        except (ValueError, RecursionError):
            return None

    def known(self, name: str) -> bool:
        return name in self.tools


@functools.lru_cache(maxsize=256)
def _cached_validator(schema_json: str):
    """Checking a schema costs ~0.7 ms and requests repeat their tools: built once per schema text."""
    return _build_validator(json.loads(schema_json))


def _build_validator(schema: Any):
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, (dict, bool)):
        return _AnyArguments()
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError:
        return _AnyArguments()
    return Draft202012Validator(schema)


_FIRST_KEY = re.compile(r'\{\s*(?:"((?:[^"\\]|\\.)*)("?)|([^\s"]))', re.S)
_NAME_VALUE = re.compile(r'\s*:\s*(?:"((?:[^"\\]|\\.)*)("?)|([^\s"]))', re.S)
DECIDE_WITHIN = 256  # characters of an object's start looked at to tell an answer from a call early


def plausible_start(toolbox: Toolbox, text: str) -> tuple[bool | None, int]:
    """Looking at the start of a JSON object (text starts with "{"): (False, n) when it cannot be a
    call, decided by its first n characters; (None, 0) while undecided; (True, 0) when it may be a
    call, so it has to be read to its end. Lets an answer that happens to be JSON stream as content
    without waiting for the object to close. Only the first DECIDE_WITHIN characters are looked at,
    so the answer depends on the text alone, never on where the deltas were cut."""
    verdict = _verdict(toolbox, text[:DECIDE_WITHIN])
    if verdict[0] is None and len(text) >= DECIDE_WITHIN:
        return True, 0
    return verdict


def _verdict(toolbox: Toolbox, text: str) -> tuple[bool | None, int]:
    m = _FIRST_KEY.match(text)
    if m is None:
        return None, 0
    if m.group(3) is not None:  # the object does not open with a key: {} or not JSON
        return False, m.end()
    if not m.group(2):
        return None, 0
    key = _unescape(m.group(1))
    if key not in CALL_KEYS:
        return False, m.end()
    if key != "name":
        return True, 0
    v = _NAME_VALUE.match(text, m.end())
    if v is None:
        rest = text[m.end():].lstrip()
        if rest and rest[0] != ":":  # {"name", ...: not JSON
            return False, len(text) - len(rest) + 1
        return None, 0
    if v.group(3) is not None:
        return True, 0  # a name that is not a string: Toolbox.call refuses it at the end
    if not v.group(2):
        return None, 0
    if toolbox.known(_unescape(v.group(1))):
        return True, 0
    return False, v.end()


def _unescape(body: str) -> str:
    try:
        return json.loads(f'"{body}"')
    except ValueError:
        return body
