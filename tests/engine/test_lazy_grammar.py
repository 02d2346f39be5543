"""Lazy grammars (SamplingParams.grammar_triggers): free text until a trigger string is generated, the
grammar from the trigger on, as tool calls need (`<tool_call>` then JSON).

The triggers are chosen from the model's own unconstrained greedy output, so the model really writes
them; the grammar then demonstrably takes over at that point, and not before."""

from __future__ import annotations

import json
import re

import pytest

from ggufchat.engine import Engine, GenerationRequest, SamplingParams
from ggufchat.errors import InvalidParameter
from tests.conftest import chat

PROMPT = "Tell me a story about a dragon."
TAIL = r" NUMBER [0-9]{3}"  # what the grammar allows after the trigger (and then only the end)


def greedy_run(engine: Engine, prompt: list[int], **sampling) -> tuple[str, list[int], str]:
    stream = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0, **sampling), max_tokens=40))
    tokens = stream.tokens()
    return engine.detokenize(tokens), tokens, stream.finish.reason


def gbnf_literal(text: str) -> str:
    return json.dumps(text)  # ASCII text: JSON's string escapes are GBNF's


def tool_grammar(trigger: str) -> str:
    return f'root ::= {gbnf_literal(trigger)} " NUMBER " [0-9] [0-9] [0-9]'


def pick_trigger(engine: Engine, tokens: list[int], *, cut: int) -> tuple[str, int]:
    """A trigger the greedy output reaches first at token k (k >= 5): the text of tokens k-1..k without
    the last `cut` characters. Returns (trigger, where it starts in the text)."""
    text = engine.detokenize(tokens)
    for k in range(5, len(tokens) - 5):
        start = len(engine.detokenize(tokens[:k - 1]))
        piece = engine.detokenize(tokens[k - 1:k + 1])
        trigger = piece[:len(piece) - cut]
        if trigger.isascii() and len(trigger.strip()) >= 4 and text.find(trigger) == start \
                and (cut == 0 or len(engine.detokenize(tokens[k:k + 1])) > cut + 1):
            return trigger, start
    raise AssertionError(f"no usable trigger in {text!r}")


def test_the_grammar_applies_from_the_trigger_on(fresh: Engine):
    prompt = chat(fresh, PROMPT)
    free, tokens, _ = greedy_run(fresh, prompt)
    trigger, start = pick_trigger(fresh, tokens, cut=0)
    lazy, _, reason = greedy_run(fresh, prompt, grammar=tool_grammar(trigger), grammar_triggers=[re.escape(trigger)])
    end = start + len(trigger)
    assert lazy[:end] == free[:end]  # free until the trigger: the unconstrained output
    assert re.fullmatch(TAIL, lazy[end:]), lazy  # then the grammar, to its end
    assert reason == "stop"
    eager, _, _ = greedy_run(fresh, prompt, grammar=tool_grammar(trigger))
    assert re.fullmatch(re.escape(trigger) + TAIL, eager)  # without triggers: the grammar from the start


def test_a_token_that_runs_past_the_trigger_into_text_the_grammar_refuses(fresh: Engine):
    """The token that completes the trigger carries more text, which the grammar refuses. llama.cpp
    would throw on accepting it (aborting the process); the sampler picks another token instead."""
    prompt = chat(fresh, PROMPT)
    free, tokens, _ = greedy_run(fresh, prompt)
    trigger, start = pick_trigger(fresh, tokens, cut=2)
    lazy, _, _ = greedy_run(fresh, prompt, grammar=tool_grammar(trigger), grammar_triggers=[re.escape(trigger)])
    assert lazy[:start] == free[:start]
    assert lazy != free
    at = lazy.find(trigger)
    if at >= 0:
        assert re.fullmatch(TAIL, lazy[at + len(trigger):]), lazy
    # The engine is still there, and the next request is unaffected.
    assert greedy_run(fresh, prompt)[0] == free


def test_several_triggers_and_sampling(fresh: Engine):
    prompt = chat(fresh, PROMPT)
    free, tokens, _ = greedy_run(fresh, prompt)
    trigger, start = pick_trigger(fresh, tokens, cut=0)
    grammar = f'root ::= ({gbnf_literal(trigger)} | "<tool_call>") " NUMBER " [0-9] [0-9] [0-9]'
    text, _, _ = greedy_run(fresh, prompt, grammar=grammar, grammar_triggers=["<tool_call>", re.escape(trigger)])
    end = start + len(trigger)
    assert text[:end] == free[:end] and re.fullmatch(TAIL, text[end:])
    for seed in range(3):
        params = SamplingParams(temperature=1.0, seed=seed, grammar=grammar,
                                grammar_triggers=[re.escape(trigger), "<tool_call>"])
        text = fresh.submit(GenerationRequest(prompt, params, max_tokens=60)).text()
        hits = [i for i in (text.find(trigger), text.find("<tool_call>")) if i >= 0]
        if hits:
            at = min(hits)
            assert re.fullmatch(f"({re.escape(trigger)}|<tool_call>){TAIL}", text[at:]), text


@pytest.mark.parametrize("sampling, words", [
    (dict(grammar='root ::= "x', grammar_triggers=["x"]), "could not be parsed"),
    (dict(grammar=None, grammar_triggers=["<tool_call>"]), "need a grammar"),
    (dict(grammar='root ::= "a"', grammar_triggers=[""]), "regular expression of 1 to"),
    (dict(grammar='root ::= "a"', grammar_triggers=["(unclosed"]), "not a regular expression"),
    (dict(grammar='root ::= "a"', grammar_triggers=[]), "1 to"),
    (dict(grammar='root ::= "' + "a" * 140_000 + '"', grammar_triggers=["a"]), "this request's tools"),
])
def test_bad_lazy_grammars_are_refused_naming_the_tools(engine: Engine, sampling: dict, words: str):
    params = SamplingParams(temperature=0, grammar_param="tools", **sampling)
    with pytest.raises(InvalidParameter, match=words) as info:
        engine.prepare(GenerationRequest(chat(engine, "hi"), params))
    assert info.value.param == "tools"


def test_grammar_errors_still_name_response_format_by_default(engine: Engine):
    with pytest.raises(InvalidParameter) as info:
        engine.prepare(GenerationRequest(chat(engine, "hi"), SamplingParams(temperature=0, grammar='root ::= "x')))
    assert info.value.param == "response_format"


def test_trigger_patterns_are_regular_expressions(engine: Engine):
    """A trigger is a regex searched in the output; the grammar starts at its first non-empty group, and
    `^` is the start of the output, `$` its end (llama.cpp's lazy-grammar semantics)."""
    params = SamplingParams(temperature=0, grammar='root ::= "{" [a-z]+ "}"',
                            grammar_triggers=[r"^\s*(\{)$", r"CALL:(\{)$"])
    sampler = engine.prepare(GenerationRequest(chat(engine, "hi"), params)).take_sampler()
    try:
        def fed(text: str) -> bytes | None:
            ids = engine.tokenize(text, add_special=False)
            sampler.out = bytearray(b"".join(sampler.pieces[t] for t in ids[:-1]))
            return sampler._fed_text(ids[-1])

        assert fed("  {") == b"{"  # at the start of the output, after blanks
        assert fed("Sure: {") is None  # `^`: only at the start
        assert fed("I will CALL:{") == b"{"  # the group, not the whole match
        assert fed("{ab") is None  # `$`: the match must end at the newest token
        sampler.out = bytearray(b"x" * (3 * sampler.WINDOW))
        assert sampler._fed_text(engine.tokenize("{", add_special=False)[0]) is None  # `^` is not a window's start
        assert sampler.started(b"{abc") is not None and sampler.started(b"{1") is None
    finally:
        sampler.free()
