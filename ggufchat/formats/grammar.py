"""GBNF grammars that make a model write a tool call, for llama.cpp's grammar samplers.

tool_grammar forces a call from the first token (tool_choice "required" or a named function);
lazy_tool_grammar (tool_choice "auto") returns the same kind of grammar plus the trigger patterns of
llama.cpp's lazy grammar, which leaves the model free until a pattern matches what it has written.

The arguments come from the tools' JSON schemas through engine.grammar.from_schema (llama-cpp-python's
converter, checked against the grammar limits) in one combined schema, {"oneOf": [{"name": const,
"arguments": …}, …]}, whose rules are then renamed (prefix "j-") so they cannot collide with the
rules written here. Each tool's parameters move under "$defs" of the combined schema, with their
"$ref"s rewritten to match, so schemas that use $defs (pydantic's) keep working.

Trigger semantics, from llama.cpp's src/llama-grammar.cpp (llama_grammar_accept_impl): the generated
text accumulates in a buffer (the prompt is not in it); after each token every pattern is searched
in the whole buffer with std::regex (ECMAScript; a pattern written ^…$ is tried as a whole-buffer
match first, then searched anyway). On a match the grammar starts at the first non-empty capture
group and is fed the buffer from there TO THE END, including the rest of the token that completed
the match. If the grammar refuses that text, llama.cpp throws from llama_sampler_accept, which
through ctypes aborts the process. So every pattern here ends in `$` and its group is a prefix the
grammar accepts: a token that runs past the trigger simply does not fire it (the call then goes
unconstrained and the parser still checks it) instead of killing the server."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ggufchat.errors import InvalidParameter
from ggufchat.formats.events import ToolSpec
from ggufchat.formats.families import (
    GENERIC,
    HERMES,
    LLAMA3,
    MISTRAL,
    MISTRAL_CALLS,
    PYTHON_TAG,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
)

if TYPE_CHECKING:
    from ggufchat.engine.grammar import GrammarLimits

PARAM = "tools"
MAX_PARALLEL_CALLS = 8  # calls one constrained reply may hold (parallel_tool_calls)
PREFIX = "j-"  # the converter's rules, renamed
ARGS_DEF = "ggufchat-args-"  # $defs/ggufchat-args-N: tool N's parameters

WS = "[ \\t\\n]{0,8}"  # between markup and calls; bounded so a forced grammar cannot run away in blanks
# The converter's `space` (one optional blank) widened to llama.cpp's own: models pretty-print calls
# (Qwen2.5-Coder writes its fenced calls over several lines), and a grammar that forbids that pulls
# them off their own distribution. Still bounded, so it cannot run away in whitespace.
SPACE = '| " " | "\\n"{1,2} [ \\t]{0,20}'
_SPACE_RE = r"(?: |\n{1,2}[ \t]{0,20})?"  # the same, as a regex
_WS_RE = r"[ \t\n]{0,8}"  # WS as a regex
# A call object as the grammar starts it, up to the opening quote of the name: each item one regex.
_CALL_ATOMS = [r"\{", _SPACE_RE, '"', "n", "a", "m", "e", '"', _SPACE_RE, ":", _SPACE_RE, '"']
_REPLY_START = r"(?:^|</think>)[ \t\n]*"


def _prefix_re(atoms: list[str]) -> str:
    """A regex for any prefix of the sequence (the empty one too): what a trigger's token may carry
    past the trigger, all of it text the grammar accepts."""
    return f"(?:{atoms[0]}{_prefix_re(atoms[1:])})?" if atoms else ""


def tool_grammar(tools: Sequence[ToolSpec], family: str, *, name: str | None = None, parallel: bool = True,
                 limits: GrammarLimits) -> str:
    """A grammar (root rule "root") that forces one call, or one or more when parallel, in the family's
    syntax, of one of the tools (only `name` when given), with arguments valid for its schema."""
    if name is not None:
        tools = [tool for tool in tools if tool.name == name]
        if not tools:
            raise InvalidParameter(f"tool_choice names the function {name!r}, which is not among the tools",
                                   param="tool_choice")
    rules = _Rules(tools, family, parallel=parallel, limits=limits)
    root = {LLAMA3: "python-calls | bare-calls", MISTRAL: "mistral-calls"}.get(rules.family, "tagged-calls")
    return rules.grammar(root)


def lazy_tool_grammar(tools: Sequence[ToolSpec], family: str, *, parallel: bool = True,
                      limits: GrammarLimits) -> tuple[str, list[str]]:
    """(grammar, trigger patterns) for llama.cpp's lazy grammar (llama_sampler_init_grammar_lazy_patterns).

    Triggers: the family's opener anywhere (<tool_call>, <|python_tag|>, [TOOL_CALLS]); and a reply that
    starts (after whitespace, or after </think>) with {"name": "<one of the tools>", bare or in a
    ``` / ```json fence. The bare form waits for a tool's name because a JSON answer that merely has a
    "name" key must stay free (Qwen2.5-Coder asked for a JSON cat writes {"name": "cat", ...}); what
    the grammar then constrains is the arguments, the part small models get wrong. The grammar's root
    accepts the text from each pattern's capture group on."""
    rules = _Rules(tools, family, parallel=parallel, limits=limits)
    opener = {LLAMA3: PYTHON_TAG, MISTRAL: MISTRAL_CALLS}.get(rules.family, TOOL_CALL_OPEN)
    first = {LLAMA3: "python-calls", MISTRAL: "mistral-calls"}.get(rules.family, "tagged-calls")
    after = [_WS_RE, r"\[", _WS_RE] if rules.family == MISTRAL else [_WS_RE]
    # The name as the grammar writes it: the converter's const literal is json.dumps (ASCII escapes).
    names = "|".join(_regex_escape(json.dumps(tool.name)[1:-1]) for tool in rules.tools)
    named = (rf'\{{{_SPACE_RE}"name"{_SPACE_RE}:{_SPACE_RE}"(?:{names})"'
             + _prefix_re([",", _SPACE_RE, '"', *rules.key, '"', _SPACE_RE, ":", _SPACE_RE]))
    patterns = [
        f"({_regex_escape(opener)}){_prefix_re(after + _CALL_ATOMS)}$",
        # One pattern for a bare and a fenced call: llama.cpp searches every pattern through the whole
        # output after every token, so each pattern costs time in proportion to the output so far.
        f"{_REPLY_START}((?:```(?:json)?{_WS_RE})?{named})$",
    ]
    return rules.grammar(f"{first} | bare-calls | fenced-calls"), patterns


def trigger_start(patterns: Sequence[str], text: str) -> int | None:
    """Where llama.cpp's lazy grammar would start on `text` (the output so far), or None while it waits:
    its semantics (first pattern that matches; the grammar starts at the first non-empty capture group,
    else at the match) with Python's re, whose syntax agrees with ECMAScript on the patterns written
    here except `$`, which in Python also matches before a final newline, so it becomes \\Z. For a
    Python-side mirror of the trigger (to check the text a trigger would feed before accepting a token)."""
    for pattern in patterns:
        m = re.search(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern, text)
        if m:
            groups = [i for i in range(1, (m.lastindex or 0) + 1) if m.group(i)]
            return m.start(groups[0]) if groups else m.start()
    return None


class _Rules:
    def __init__(self, tools: Sequence[ToolSpec], family: str, *, parallel: bool, limits: GrammarLimits) -> None:
        if not tools:
            raise InvalidParameter("a tool call was asked for but no tools were given", param=PARAM)
        self.tools = list(tools)
        self.family = family if family in (HERMES, LLAMA3, MISTRAL) else GENERIC
        self.parallel = parallel
        self.limits = limits
        self.key = "parameters" if self.family == LLAMA3 else "arguments"
        self.json = _schema_grammar(self.tools, self.key, limits)

    def _many(self, item: str, sep: str = "ws") -> str:
        # Bounded: small models under a forced grammar repeat the same call until max_tokens.
        return f"{item} ({sep} {item}){{0,{MAX_PARALLEL_CALLS - 1}}}" if self.parallel else item

    def grammar(self, root: str) -> str:
        from ggufchat.engine import grammar as gbnf

        named = " | ".join(f"{_literal(tool.name)} (\"[CALL_ID]\" [a-zA-Z0-9]{{9}})? \"[ARGS]\" {PREFIX}{ARGS_DEF}{i}"
                           for i, tool in enumerate(self.tools))
        calls = self._many("call")
        array = self._many("call", 'ws "," ws')
        named_calls = self._many("named", "ws " + _literal(MISTRAL_CALLS))
        forms = {
            "tagged-calls": self._many("tagged"),
            "bare-calls": calls,
            "fenced-calls": f'"```" "json"? ws {calls} ws "```"',
            "python-calls": f"{_literal(PYTHON_TAG)} ws {calls}",
            "mistral-calls": f"{_literal(MISTRAL_CALLS)} ws (\"[\" ws {array} ws \"]\" | {named_calls})",
        }
        used = [form for form in forms if form in root.split()]
        lines = [f"root ::= {root}", *(f"{form} ::= {forms[form]}" for form in used)]
        if "tagged-calls" in used:
            lines.append(f"tagged ::= {_literal(TOOL_CALL_OPEN)} ws call ws {_literal(TOOL_CALL_CLOSE)}")
        if "mistral-calls" in used:
            lines.append(f"named ::= {named}")
        lines += [f"call ::= {PREFIX}root", f"ws ::= {WS}", self.json]
        text = "\n".join(lines).rstrip("\n") + "\n"
        try:
            gbnf.check(text, self.limits)
        except InvalidParameter as exc:
            raise _for_tools(exc) from exc
        return text


def _schema_grammar(tools: list[ToolSpec], key: str, limits: GrammarLimits) -> str:
    """The converter's grammar for any one call object of the tools, its rules prefixed."""
    from ggufchat.engine import grammar as gbnf

    defs: dict[str, Any] = {}
    alternatives = []
    for i, tool in enumerate(tools):
        if not isinstance(tool.name, str) or not tool.name:
            raise InvalidParameter("every tool needs a name", param=PARAM)
        defs.update(_relocate(tool, i))
        alternatives.append({"type": "object",
                             "properties": {"name": {"const": tool.name}, key: {"$ref": f"#/$defs/{ARGS_DEF}{i}"}},
                             "required": ["name", key]})
    schema = {"$defs": defs, "oneOf": alternatives}
    try:
        grammar = gbnf.from_schema(schema, limits)
    except InvalidParameter as exc:
        raise _for_tools(exc) from exc
    grammar = prefix_rules(grammar, PREFIX)
    grammar, widened = re.subn(rf"^{PREFIX}space ::= .*$", lambda _: f"{PREFIX}space ::= {SPACE}", grammar,
                                flags=re.M)
    if widened != 1:
        raise RuntimeError("the JSON-schema converter no longer writes a `space` rule")
    missing = [i for i in range(len(tools)) if f"\n{PREFIX}{ARGS_DEF}{i} ::=" not in "\n" + grammar]
    if missing:  # the converter names a $ref's rule after the ref's last part; this relies on that
        raise InvalidParameter(f"the parameters of tool {tools[missing[0]].name!r} cannot be turned into a grammar",
                               param=PARAM)
    return grammar


def _relocate(tool: ToolSpec, i: int) -> dict[str, Any]:
    """Tool i's parameters as $defs entries of the combined schema: the parameters themselves under
    ggufchat-args-i and every local "$ref" target under a name of its own, the refs rewritten to
    point there (the converter resolves refs from the root, and names each rule after the last part
    of its ref only, so two tools' "#/$defs/Item" must not meet)."""
    params = tool.parameters
    if params is True or params == {}:
        params = {"type": "object"}
    if not isinstance(params, dict):
        raise InvalidParameter(f"the parameters of tool {tool.name!r} are not a JSON schema object", param=PARAM)
    params = copy.deepcopy(params)
    if "type" not in params and not {"$ref", "oneOf", "anyOf", "allOf", "enum", "const"} & params.keys():
        params["type"] = "object"  # arguments are always an object
    base = f"{ARGS_DEF}{i}"
    defs: dict[str, Any] = {base: params}
    names = {"": base}

    def target(pointer: str) -> str:
        path = pointer[1:]
        if path not in names:
            node: Any = params
            try:
                for part in path.split("/")[1:]:
                    part = part.replace("~1", "/").replace("~0", "~")
                    node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError, TypeError):
                raise InvalidParameter(f"tool {tool.name!r}: cannot resolve $ref {pointer!r}", param=PARAM) from None
            names[path] = f"{base}-ref-{len(names)}"
            defs[names[path]] = node
        return names[path]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                node["$ref"] = f"#/$defs/{target(ref)}"
            for value in list(node.values()):
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    try:
        walk(params)
    except RecursionError:
        raise InvalidParameter(f"the parameters of tool {tool.name!r} nest too deeply", param=PARAM) from None
    return defs


def prefix_rules(grammar: str, prefix: str) -> str:
    """Every rule name in a GBNF text, prefixed; literals, character classes, repetition counts and
    comments are left alone."""
    out: list[str] = []
    i, n = 0, len(grammar)
    while i < n:
        c = grammar[i]
        if c == '"' or c == "[":
            close = '"' if c == '"' else "]"
            j = i + 1
            while j < n and grammar[j] != close:
                j += 2 if grammar[j] == "\\" else 1
            out.append(grammar[i:j + 1])
            i = j + 1
        elif c == "#" or c == "{":
            j = grammar.find("\n" if c == "#" else "}", i)
            j = n if j < 0 else j
            out.append(grammar[i:j])
            i = j
        elif c.isascii() and (c.isalnum() or c == "-"):
            j = i
            while j < n and grammar[j].isascii() and (grammar[j].isalnum() or grammar[j] == "-"):
                j += 1
            out.append(prefix + grammar[i:j])
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _literal(text: str) -> str:
    """A GBNF string literal."""
    body = json.dumps(text, ensure_ascii=False)[1:-1]
    return f'"{body}"'


def _regex_escape(text: str) -> str:
    """Escape for an ECMAScript regex (Python's re.escape also escapes characters ECMAScript rejects)."""
    return "".join("\\" + c if c in "\\^$.|?*+()[]{}" else c for c in text)


def _for_tools(exc: InvalidParameter) -> InvalidParameter:
    message = str(exc).replace("for this response_format", "for these tools").replace("JSON schema", "tools' schema")
    return InvalidParameter(message, param=PARAM, hint=exc.hint)
