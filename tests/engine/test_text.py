"""Text coming out of the engine: stop strings and multi-token characters."""

from __future__ import annotations

from ggufchat.engine import Delta, Engine, GenerationRequest, SamplingParams
from ggufchat.engine.stops import StopMatcher
from ggufchat.engine.tokens import Detokenizer
from tests.conftest import chat


def test_stop_matcher_holds_back_partial_stop_text():
    m = StopMatcher(["</end>"])
    assert m.push("Hello </") == ("Hello ", False)
    assert m.push("en") == ("", False)
    assert m.push("d> tail") == ("", True)
    m = StopMatcher(["</end>"])
    assert m.push("a </e") == ("a ", False)
    assert m.push("x") == ("</ex", False)
    assert m.flush() == ""
    m = StopMatcher(["STOP"])
    assert m.push("ST") == ("", False)
    assert m.flush() == "ST"


def test_stop_string_across_token_boundaries(engine: Engine):
    prompt = chat(engine, "Write two sentences about the moon.")
    full = engine.submit(GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=60))
    deltas = [e for e in full if isinstance(e, Delta)]
    text = "".join(d.text for d in deltas)
    # A stop string made of the end of one token and the start of the next one.
    boundary = len(deltas[0].text) + len(deltas[1].text) + len(deltas[2].text)
    stop = text[boundary - 2: boundary + 3]
    assert len(stop) == 5
    cut = text.find(stop)  # usually boundary - 2; earlier if the same text occurs before
    stream = engine.submit(GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=60, stop=[stop]))
    pieces = [e.text for e in stream if isinstance(e, Delta)]
    assert stream.finish.reason == "stop"
    # Everything before the stop string, and not one character of it.
    assert "".join(pieces) == text[:cut]


def test_chinese_characters_spanning_tokens_come_out_whole(engine: Engine):
    text = "你好，世界！我喜欢学习人工智能。"
    tokens = engine.tokenize(text, add_special=False)
    assert len(tokens) > len(text)  # several characters take more than one token
    detok = Detokenizer(engine.tokenizer)
    pieces = [detok.push(t) for t in tokens] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # Tokens that end inside a character emit nothing until the character is complete.
    assert pieces.count("") > 0


def test_a_sequence_cut_inside_a_character_drops_the_partial_bytes(engine: Engine):
    tokens = engine.tokenize("你好", add_special=False)
    detok = Detokenizer(engine.tokenizer)
    first = [detok.push(t) for t in tokens]
    assert "".join(first) == "你好"
    cut_at = next(i for i, p in enumerate(first) if p == "")  # a token that ends inside a character
    detok = Detokenizer(engine.tokenizer)
    pieces = [detok.push(t) for t in tokens[: cut_at + 1]] + [detok.flush()]
    assert "".join(pieces) == "你好"[: len("".join(pieces))]  # whole characters only, no U+FFFD
    assert "\ufffd" not in "".join(pieces)


def test_chinese_through_the_engine(engine: Engine):
    # Make the model echo Chinese text: a raw completion prompt whose continuation is that text.
    text = "你好，世界！"
    prompt = engine.tokenize("Repeat exactly: " + text + "\n" + text + "\n" + text + "\n", add_special=False)
    stream = engine.submit(GenerationRequest(prompt, SamplingParams.greedy(), max_tokens=12, stop=["\n"]))
    pieces = [e.text for e in stream if isinstance(e, Delta)]
    out = "".join(pieces)
    assert "\ufffd" not in out
    assert out == text
    assert stream.finish.usage.completion_tokens > len([p for p in pieces if p])
