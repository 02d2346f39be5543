"""Random texts made of markup, JSON and prose fragments: whatever the parser makes of a text, it
must make the same of it however the text is cut into deltas, and never crash."""

from __future__ import annotations

import random

import pytest

from ggufchat.formats import OutputFormat
from tests.formats.samples import PARIS, TOOLS
from tests.formats.test_parser import check_stream, normal, run

FRAGMENTS = [
    "<tool_call>", "</tool_call>", "\n", " ", "  \n", "{", "}", "[", "]", ",", ":", '"', "\\", '"name"',
    '"get_weather"', '"get_time"', '"arguments"', '"parameters"', '{"city": "Paris"}', '"city"', "```", "```json",
    "[TOOL_CALLS]", "<|python_tag|>", "[ARGS]", "[CALL_ID]", "get_weather", "<think>", "</think>", "hello",
    "Sure, ", "<", "</", "<tool", "[TOOL", "é", PARIS, '{"name": "nope"', "`", "\t",
]


@pytest.mark.parametrize("fmt", [
    OutputFormat(tools=TOOLS),
    OutputFormat(tools=TOOLS, reasoning=True),
    OutputFormat(tools=TOOLS, reasoning=True, in_reasoning=True, parallel=False),
    OutputFormat(reasoning=True),
], ids=["tools", "tools+reasoning", "opened+single", "reasoning"])
def test_random_texts_cut_anywhere(fmt):
    rng = random.Random(1234)
    for _ in range(400):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 14)))
        events, parser = run(fmt, [text])
        check_stream(events, parser)
        whole = normal(events)
        cuts = [sorted(rng.sample(range(1, len(text)), min(len(text) - 1, k))) for k in (1, 2, 4)]
        for points in cuts + [list(range(1, len(text)))]:
            pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
            events, parser = run(fmt, pieces)
            check_stream(events, parser)
            assert normal(events) == whole, (text, pieces)
