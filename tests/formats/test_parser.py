"""The output parser on recorded and documented outputs, fed whole, cut in two at every position and
one character at a time: the events must not depend on where the deltas were cut."""

from __future__ import annotations

import json
import time

import pytest

from ggufchat.formats import (
    Content,
    OutputFormat,
    OutputParser,
    Reasoning,
    ToolCallArguments,
    ToolCallStart,
    parse_output,
)
from tests.formats.samples import PARIS, PARIS_ARGS, SAMPLES, TOOLS, WEATHER, Sample

MARKUP = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "[ARGS]", "```json")


def fmt_for(sample: Sample, **changes) -> OutputFormat:
    base = dict(reasoning=sample.reasoning_split, in_reasoning=sample.in_reasoning, tools=TOOLS, family=sample.family)
    return OutputFormat(**{**base, **changes})


def run(fmt: OutputFormat, deltas: list[str]) -> tuple[list, OutputParser]:
    parser = OutputParser(fmt)
    events = []
    for delta in deltas:
        events += parser.push(delta)
    events += parser.finish()
    return events, parser


def normal(events: list) -> list[tuple]:
    """Events with adjacent text of one kind merged and call ids left out (they are random)."""
    out: list[tuple] = []
    for e in events:
        if isinstance(e, (Content, Reasoning)):
            kind = type(e).__name__
            if out and out[-1][0] == kind:
                out[-1] = (kind, out[-1][1] + e.text)
            elif e.text:
                out.append((kind, e.text))
        elif isinstance(e, ToolCallStart):
            out.append(("start", e.index, e.name))
        else:
            assert isinstance(e, ToolCallArguments)
            if out and out[-1][0] == "args" and out[-1][1] == e.index:
                out[-1] = ("args", e.index, out[-1][2] + e.fragment)
            else:
                out.append(("args", e.index, e.fragment))
    return out


def check_stream(events: list, parser: OutputParser) -> None:
    """Each call starts once, gets its arguments after its start, and the calls list agrees."""
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.index for s in starts] == list(range(len(starts)))
    assert len({s.id for s in starts}) == len(starts)
    seen = set()
    for e in events:
        if isinstance(e, ToolCallStart):
            seen.add(e.index)
        elif isinstance(e, ToolCallArguments):
            assert e.index in seen
    assert [(c.id, c.name) for c in parser.calls] == [(s.id, s.name) for s in starts]
    for call in parser.calls:
        assert isinstance(call.arguments_object(), dict)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
def test_whole_output(sample: Sample):
    events, parser = run(fmt_for(sample), [sample.text])
    check_stream(events, parser)
    content = "".join(e.text for e in events if isinstance(e, Content))
    reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
    assert (content, reasoning) == (sample.content, sample.reasoning)
    assert [(c.name, c.arguments) for c in parser.calls] == sample.calls
    if sample.calls:
        assert not any(marker in sample.content for marker in MARKUP) or "nope" in sample.content
    assert parse_output(sample.text, fmt_for(sample))[:2] == (sample.content, sample.reasoning)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
def test_cut_anywhere(sample: Sample):
    fmt = fmt_for(sample)
    whole = normal(run(fmt, [sample.text])[0])
    text = sample.text
    for cut in range(1, len(text)):
        events, parser = run(fmt, [text[:cut], text[cut:]])
        check_stream(events, parser)
        assert normal(events) == whole, f"cut at {cut}: {text[:cut]!r} | {text[cut:]!r}"
    events, parser = run(fmt, list(text))
    check_stream(events, parser)
    assert normal(events) == whole


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
def test_cut_in_three_anywhere(sample: Sample):
    fmt = fmt_for(sample)
    whole = normal(run(fmt, [sample.text])[0])
    text = sample.text
    step = max(1, len(text) // 40)  # every pair of cut points would be slow on the long samples
    for a in range(1, len(text), step):
        for b in range(a + 1, len(text), 3):
            assert normal(run(fmt, [text[:a], text[a:b], text[b:]])[0]) == whole, (a, b)


def test_content_before_a_call_streams_at_once():
    parser = OutputParser(OutputFormat(tools=TOOLS))
    assert parser.push("Let me check") == [Content("Let me check")]
    assert parser.push(" the weather <") == [Content(" the weather ")]  # "<" may open a call
    assert parser.push("tool_call>\n{") == []
    assert parser.push(PARIS[1:] + "\n</tool_call>") == [
        ToolCallStart(0, parser.calls[0].id, "get_weather"), ToolCallArguments(0, PARIS_ARGS)]
    assert parser.finish() == []


def test_json_answer_streams_once_its_first_key_shows_it_is_no_call():
    parser = OutputParser(OutputFormat(tools=TOOLS))
    assert parser.push("{") == []
    assert parser.push('"cit') == []
    assert parser.push('y": "Paris", ') == [Content('{"city": "Paris", ')]
    assert parser.push('"x": 1}') == [Content('"x": 1}')]


def test_json_answer_is_released_at_the_first_key():
    parser = OutputParser(OutputFormat(tools=TOOLS))
    events = parser.push('{"cit') + parser.push('y": "Pa')
    assert normal(events) == [("Content", '{"city": "Pa')]


def test_unknown_tool_is_released_at_its_name():
    parser = OutputParser(OutputFormat(tools=TOOLS))
    events = parser.push('{"name": "get_stock", "argu')
    assert normal(events) == [("Content", '{"name": "get_stock", "argu')]


def test_no_tools_means_no_hold_back():
    parser = OutputParser(OutputFormat())
    for delta in ["<", "tool_call", ">", "{", "<think>", " ```"]:
        assert parser.push(delta) == [Content(delta)]
    assert parser.finish() == []


def test_reasoning_without_tools_holds_only_the_opening_tag():
    parser = OutputParser(OutputFormat(reasoning=True))
    assert parser.push("<thi") == []
    assert parser.push("nk>\nfoo") == [Reasoning("foo")]
    assert parser.push("</think>\n\nbar <tool_call>") == [Content("bar <tool_call>")]
    assert parser.push("{") == [Content("{")]


def test_not_parallel_drops_a_second_call():
    text = (f"<tool_call>\n{PARIS}\n</tool_call>\n<tool_call>\n"
            '{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>\nDone.')
    content, reasoning, calls = parse_output(text, OutputFormat(tools=TOOLS, parallel=False))
    assert [c.name for c in calls] == ["get_weather"]
    assert content == "\nDone." and reasoning == ""


def test_calls_after_the_first_at_the_start_too():
    text = f'{PARIS}\n{{"name": "get_time", "arguments": {{"timezone": "UTC"}}}}'
    content, _, calls = parse_output(text, OutputFormat(tools=TOOLS))
    assert [c.name for c in calls] == ["get_weather", "get_time"] and content == ""


def test_bare_json_later_in_a_reply_is_content():
    text = f"Here is the call: {PARIS}"
    assert parse_output(text, OutputFormat(tools=TOOLS)) == (text, "", [])


def test_a_bad_schema_constrains_nothing():
    broken = WEATHER.__class__("get_weather", "", {"type": "no-such-type", "properties": 5})
    content, _, calls = parse_output(PARIS, OutputFormat(tools=(broken,)))
    assert content == "" and [c.arguments for c in calls] == [PARIS_ARGS]
    unresolvable = WEATHER.__class__("get_weather", "", {"$ref": "#/$defs/missing"})
    assert len(parse_output(PARIS, OutputFormat(tools=(unresolvable,)))[2]) == 1


def test_schema_is_draft_2020_12():
    tool = WEATHER.__class__("pick", "", {"type": "object", "properties": {
        "xs": {"type": "array", "prefixItems": [{"type": "integer"}], "items": False}}})
    ok = '{"name": "pick", "arguments": {"xs": [1]}}'
    too_many = '{"name": "pick", "arguments": {"xs": [1, 2]}}'  # items: false after prefixItems (2020-12 only)
    assert len(parse_output(ok, OutputFormat(tools=(tool,)))[2]) == 1
    assert parse_output(too_many, OutputFormat(tools=(tool,)))[2] == []


def test_openai_function_shape_and_missing_arguments():
    ping = WEATHER.__class__("ping")
    text = '{"type": "function", "function": {"name": "ping", "arguments": {}}}'
    assert [c.name for c in parse_output(text, OutputFormat(tools=(ping,)))[2]] == []  # first key "type": an answer
    assert [c.arguments for c in parse_output('{"name": "ping"}', OutputFormat(tools=(ping,)))[2]] == ["{}"]
    wrapped = '<tool_call>{"function": {"name": "ping", "arguments": {}}}</tool_call>'
    assert [c.name for c in parse_output(wrapped, OutputFormat(tools=(ping,)))[2]] == ["ping"]


def test_arguments_keep_non_ascii_text():
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call>'
    (call,) = parse_output(text, OutputFormat(tools=TOOLS))[2]
    assert call.arguments == json.dumps({"city": "Zürich"}, ensure_ascii=False)


def test_finish_twice_and_empty_pushes():
    parser = OutputParser(OutputFormat(tools=TOOLS))
    assert parser.push("") == []
    assert normal(parser.push("Hi") + parser.finish()) == [("Content", "Hi")]
    assert parser.finish() == []


def test_truncated_closer_after_a_valid_call():
    content, _, calls = parse_output(f"<tool_call>\n{PARIS}\n</tool_", OutputFormat(tools=TOOLS))
    assert content == "" and len(calls) == 1


@pytest.mark.parametrize("prefix", ["", "<think>\n"])
def test_push_is_linear_in_the_text(prefix):
    """A long answer, a long call and long reasoning, pushed four characters at a time."""
    words = "lorem ipsum <b>dolor</b> [sit] amet, {consectetur} ``` " * 4000  # ~220 KB
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "' + "x" * 200_000 + '"}}</tool_call>'
    text = prefix + (words + "</think>" if prefix else "") + words + call
    fmt = OutputFormat(reasoning=True, tools=TOOLS)
    start = time.perf_counter()
    events, parser = run(fmt, [text[i:i + 4] for i in range(0, len(text), 4)])
    elapsed = time.perf_counter() - start
    assert len(parser.calls) == 1
    assert elapsed < 3, elapsed  # ~0.5 s here; quadratic work would take minutes
