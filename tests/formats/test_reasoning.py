"""Reasoning apart from the answer: <think>…</think> cut at every position, the prompt-opened mode,
the whitespace around the tags, and the verbatim mode (--reasoning-format none)."""

from __future__ import annotations

import pytest

from ggufchat.formats import Content, OutputFormat, OutputParser, Reasoning, opens_reasoning, parse_output

R1 = "<think>\nOkay, the user says hi.\n\nI should greet them.\n</think>\n\nHello! How can I help?"
CASES = [
    # (text, in_reasoning, reasoning, content)
    (R1, False, "Okay, the user says hi.\n\nI should greet them.", "Hello! How can I help?"),
    ("  <think>a</think>b", False, "a", "b"),
    ("<think></think>answer", False, "", "answer"),
    ("<think>\n\n</think>\n\nanswer", False, "", "answer"),  # Qwen3 with thinking off
    ("no tags at all", False, "", "no tags at all"),
    ("  leading blanks stay", False, "", "  leading blanks stay"),
    ("<thinking>is not the tag", False, "", "<thinking>is not the tag"),
    ("answer <think>later</think> is text", False, "", "answer <think>later</think> is text"),
    ("\nstill thinking</think>\n\nanswer", True, "still thinking", "answer"),
    ("thinking with </thin in it</think>done", True, "thinking with </thin in it", "done"),
    ("never closed \n", True, "never closed", ""),
    ("<think>never closed", False, "never closed", ""),
    ("a\n \n</think>", True, "a", ""),
    ("x</think>   ", True, "x", ""),
]


def events_for(text: str, deltas: list[str], **fmt) -> tuple[str, str]:
    parser = OutputParser(OutputFormat(**fmt))
    events = [e for d in deltas for e in parser.push(d)] + parser.finish()
    reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
    content = "".join(e.text for e in events if isinstance(e, Content))
    return reasoning, content


@pytest.mark.parametrize("text, in_reasoning, reasoning, content", CASES)
def test_split_at_every_position(text, in_reasoning, reasoning, content):
    expected = (reasoning, content)
    assert events_for(text, [text], reasoning=True, in_reasoning=in_reasoning) == expected
    for cut in range(1, len(text)):
        assert events_for(text, [text[:cut], text[cut:]], reasoning=True, in_reasoning=in_reasoning) == expected, cut
    assert events_for(text, list(text), reasoning=True, in_reasoning=in_reasoning) == expected


def test_reasoning_streams_as_it_comes():
    parser = OutputParser(OutputFormat(reasoning=True))
    assert parser.push("<think>\n") == []
    assert parser.push("Let me") == [Reasoning("Let me")]
    assert parser.push(" think.\n") == [Reasoning(" think.")]  # the newline waits: it may end the reasoning
    assert parser.push("More") == [Reasoning("\nMore")]
    assert parser.push("</th") == []
    assert parser.push("ink>\n\nDone") == [Content("Done")]


def test_in_reasoning_starts_as_reasoning_without_a_tag():
    parser = OutputParser(OutputFormat(reasoning=True, in_reasoning=True))
    assert parser.push("Hmm") == [Reasoning("Hmm")]


def test_unsplit_keeps_everything_verbatim():
    text = R1
    assert parse_output(text, OutputFormat()) == (text, "", [])
    assert parse_output(text, OutputFormat(in_reasoning=True)) == (text, "", [])


def test_opens_reasoning():
    assert opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert opens_reasoning("<｜Assistant｜><think>\n")
    assert opens_reasoning("...<think>")
    assert not opens_reasoning("<|im_start|>assistant\n")
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, thinking off
    assert not opens_reasoning("<|im_start|>user\nWhat does <think> do?<|im_end|>\n<|im_start|>assistant\n")
    assert not opens_reasoning("")
