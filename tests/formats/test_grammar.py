"""Tool-call grammars checked by llama.cpp itself: it parses them, the lazy patterns compile, sample
calls are accepted token by token, wrong calls are refused, and the lazy grammar triggers where a
call starts (and only there), replaying text the grammar accepts."""

from __future__ import annotations

import pytest

from ggufchat.engine.grammar import GrammarLimits
from ggufchat.errors import InvalidParameter
from ggufchat.formats import ToolSpec, lazy_tool_grammar, tool_grammar
from ggufchat.formats.grammar import prefix_rules
from tests.formats.gbnf import lazy_run
from tests.formats.samples import PARIS, TOOLS

LIMITS = GrammarLimits()
FAMILIES = ["hermes", "llama3", "mistral", "generic"]
TIME = '{"name": "get_time", "arguments": {"timezone": "UTC"}}'
PRETTY = '{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}'

# Calls in each family's own syntax: (text, needs parallel).
FORCED = {
    "hermes": [(f"<tool_call>\n{PARIS}\n</tool_call>", False), (f"<tool_call>{PRETTY}</tool_call>", False),
               (f"<tool_call>\n{PARIS}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>", True)],
    "llama3": [('{"name": "get_weather", "parameters": {"city": "Paris"}}', False),
               ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', False)],
    "mistral": [(f"[TOOL_CALLS][{PARIS}]", False), (f"[TOOL_CALLS][{PARIS}, {TIME}]", True),
                ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', False),
                ('[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}', False),
                ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"timezone": "UTC"}', True)],
}
FORCED["generic"] = FORCED["hermes"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("parallel", [True, False])
def test_llama_cpp_parses_every_grammar(vocab, family, parallel):
    import llama_cpp

    for grammar in (tool_grammar(TOOLS, family, parallel=parallel, limits=LIMITS),
                    tool_grammar(TOOLS, family, name="get_time", parallel=parallel, limits=LIMITS)):
        smpl = vocab.grammar(grammar)
        assert smpl
        llama_cpp.llama_sampler_free(smpl)
    grammar, patterns = lazy_tool_grammar(TOOLS, family, parallel=parallel, limits=LIMITS)
    smpl = vocab.lazy_grammar(grammar, patterns)
    assert smpl
    llama_cpp.llama_sampler_free(smpl)


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_grammar_accepts_the_family_syntax(vocab, family):
    single = tool_grammar(TOOLS, family, parallel=False, limits=LIMITS)
    many = tool_grammar(TOOLS, family, parallel=True, limits=LIMITS)
    for text, parallel in FORCED[family]:
        assert vocab.accepts(many, text), text
        assert vocab.accepts(single, text) is not parallel, text


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_grammar_refuses_what_is_not_a_valid_call(vocab, family):
    grammar = tool_grammar(TOOLS, family, limits=LIMITS)
    key = "parameters" if family == "llama3" else "arguments"
    call = f'{{"name": "get_weather", "{key}": {{"city": "Paris"}}}}'
    wrap = {"hermes": "<tool_call>{}</tool_call>", "generic": "<tool_call>{}</tool_call>", "llama3": "{}",
            "mistral": "[TOOL_CALLS][{}]"}[family]
    assert vocab.accepts(grammar, wrap.format(call))
    assert not vocab.accepts(grammar, wrap.format(call.replace("get_weather", "get_stock")))  # unknown tool
    assert not vocab.accepts(grammar, wrap.format(call.replace('"Paris"', "75")))  # schema says string
    assert not vocab.accepts(grammar, wrap.format(call.replace('"city"', '"town"')))  # required city missing
    assert not vocab.accepts(grammar, "Sure! " + wrap.format(call))  # forced: no text first
    assert not vocab.accepts(grammar, wrap.format(call)[:-1])  # incomplete: may not end there


def test_named_function_only(vocab):
    grammar = tool_grammar(TOOLS, "hermes", name="get_time", limits=LIMITS)
    assert vocab.accepts(grammar, f"<tool_call>{TIME}</tool_call>")
    assert not vocab.accepts(grammar, f"<tool_call>{PARIS}</tool_call>")
    with pytest.raises(InvalidParameter) as info:
        tool_grammar(TOOLS, "hermes", name="get_stock", limits=LIMITS)
    assert info.value.param == "tool_choice"


# Lazy grammar: (text, what the call starts with, or None for no call).
LAZY = [
    (PARIS, "{"),  # the real Qwen2.5-Coder-0.5B outputs, bare, fenced, tagged
    (f"```json\n{PARIS}\n```", "```"),
    (f"```json\n{PRETTY}\n```", "```"),
    (f"<tool_call>\n{PARIS}\n</tool_call>", "<tool_call>"),
    (f"\n\n  {PARIS}", "{"),
    (f"Let me look that up.\n<tool_call>\n{PARIS}\n</tool_call>", "<tool_call>"),
    (f"<think>\nI should call it.\n</think>\n\n{PARIS}", "{"),
    (f"Thinking, the prompt opened the tag.</think>{PARIS}", "{"),
    (f"<tool_call>\n{PARIS}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>", "<tool_call>"),
    ("Sea whispers,\nWhispers of the sea,\nWhispers of the sea.", None),
    ('{"city": "Paris", "population": 2102650}', None),  # JSON, but no call
    ('```json\n{\n  "name": "cat",\n  "arguments": {\n    "age": 3\n  }\n}\n```', None),  # real Qwen: a JSON cat
    ('{"name": "get_weather_report"}', None),  # a tool's name, but only the start of this one
    (f"Here is a call: {PARIS}", None),  # a bare object only counts at the start
    ('```python\nprint({"name": 1})\n```', None),
]


@pytest.mark.parametrize("text, opening", LAZY)
def test_lazy_grammar_triggers_where_a_call_starts(vocab, text, opening):
    grammar, patterns = lazy_tool_grammar(TOOLS, "hermes", limits=LIMITS)
    run = lazy_run(vocab, grammar, patterns, text)
    if opening is None:
        assert run.triggered_at is None and run.free_after and run.may_end
        return
    assert run.triggered_at is not None, "no trigger"
    assert text[text.index(opening):].startswith(run.replay)  # constrained from the call's first character
    assert run.followed and run.may_end and not run.free_after


@pytest.mark.parametrize("family, text", [
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    ("mistral", f"[TOOL_CALLS][{PARIS}]"),
    ("mistral", 'Checking. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'),
    ("mistral", PARIS),
    ("generic", f"<tool_call>{PARIS}</tool_call>"),
])
def test_lazy_grammar_of_other_families(vocab, family, text):
    grammar, patterns = lazy_tool_grammar(TOOLS, family, limits=LIMITS)
    run = lazy_run(vocab, grammar, patterns, text)
    assert run.triggered_at is not None and run.followed and run.may_end and not run.free_after


def test_qwen_special_tokens(qwen_vocab):
    """In Qwen's vocabulary <tool_call> and </tool_call> are single special tokens: the grammar's
    literals must match them, and the lazy trigger must fire on the token itself."""
    assert len(qwen_vocab.tokenize("<tool_call>", special=True)) == 1
    text = f"<tool_call>\n{PARIS}\n</tool_call>"
    assert qwen_vocab.accepts(tool_grammar(TOOLS, "hermes", limits=LIMITS), text, special=True)
    grammar, patterns = lazy_tool_grammar(TOOLS, "hermes", limits=LIMITS)
    for sample in (text, f"```json\n{PRETTY}\n```", PARIS):
        run = lazy_run(qwen_vocab, grammar, patterns, sample, special=True)
        assert run.triggered_at is not None and run.followed and run.may_end, sample


def test_defs_of_different_tools_do_not_meet(vocab):
    a = ToolSpec("a", "", {"type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
                           "$defs": {"Item": {"type": "object", "properties": {"n": {"type": "integer"}},
                                              "required": ["n"]}}})
    b = ToolSpec("b", "", {"type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
                           "$defs": {"Item": {"type": "object", "properties": {"s": {"type": "string"}},
                                              "required": ["s"]}}})
    tree = ToolSpec("tree", "", {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}})
    grammar = tool_grammar([a, b, tree], "hermes", limits=LIMITS)
    assert vocab.accepts(grammar, '<tool_call>{"name": "a", "arguments": {"item": {"n": 1}}}</tool_call>')
    assert vocab.accepts(grammar, '<tool_call>{"name": "b", "arguments": {"item": {"s": "x"}}}</tool_call>')
    assert not vocab.accepts(grammar, '<tool_call>{"name": "a", "arguments": {"item": {"s": "x"}}}</tool_call>')
    assert not vocab.accepts(grammar, '<tool_call>{"name": "b", "arguments": {"item": {"n": 1}}}</tool_call>')
    assert vocab.accepts(grammar, '<tool_call>{"name": "tree", "arguments": {"kids": [{"kids": []}]}}</tool_call>')


def test_parameters_left_out_or_empty_mean_an_object(vocab):
    grammar = tool_grammar([ToolSpec("ping", "", {}), ToolSpec("pong", "", True)], "hermes", limits=LIMITS)
    assert vocab.accepts(grammar, '<tool_call>{"name": "ping", "arguments": {}}</tool_call>')
    assert vocab.accepts(grammar, '<tool_call>{"name": "pong", "arguments": {"any": [1]}}</tool_call>')
    assert not vocab.accepts(grammar, '<tool_call>{"name": "ping", "arguments": "x"}</tool_call>')


@pytest.mark.parametrize("tools, word", [
    ([], "no tools"),
    ([ToolSpec("x", "", {"type": "object", "properties": {"y": {"$ref": "https://example.com/s.json"}}})], "grammar"),
    ([ToolSpec("x", "", {"type": "object", "properties": {"y": {"$ref": "#/$defs/missing"}}})], "missing"),
    ([ToolSpec("x", "", "not a schema")], "not a JSON schema"),
    ([ToolSpec("x", "", {"type": "object", "properties": {"y": {"type": "string", "maxLength": 30000}}})],
     "these tools"),
])
def test_bad_tools_are_refused_as_tools(tools, word):
    with pytest.raises(InvalidParameter, match=word) as info:
        tool_grammar(tools, "hermes", limits=LIMITS)
    assert info.value.param == "tools"
    with pytest.raises(InvalidParameter):
        lazy_tool_grammar(tools, "hermes", limits=LIMITS)


def test_prefix_rules_leaves_literals_classes_counts_and_comments_alone():
    text = 'root ::= "root" [a-z-] x-1{2,3} # root comment\nx-1 ::= "\\"root" | root\n'
    expected = 'j-root ::= "root" [a-z-] j-x-1{2,3} # root comment\nj-x-1 ::= "\\"root" | j-root\n'
    assert prefix_rules(text, "j-") == expected
