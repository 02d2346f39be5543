"""Lazy grammars (SamplingParams.grammar_triggers): free text until a trigger string is generated, the
grammar from the trigger on, as tool calls need (`<tool_call>` then JSON).

The triggers are chosen from the model's own unconstrained greedy output, so the model really writes
them; the grammar then demonstrably takes over at that point, and not before."""

from __future__ import annotations

import json
import re

import llama_cpp
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
    lazy, _, reason = greedy_run(fresh, prompt, grammar=tool_grammar(trigger), grammar_triggers=[trigger])
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
    lazy, _, _ = greedy_run(fresh, prompt, grammar=tool_grammar(trigger), grammar_triggers=[trigger])
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
    text, _, _ = greedy_run(fresh, prompt, grammar=grammar, grammar_triggers=["<tool_call>", trigger])
    end = start + len(trigger)
    assert text[:end] == free[:end] and re.fullmatch(TAIL, text[end:])
    for seed in range(3):
        text = fresh.submit(GenerationRequest(prompt, SamplingParams(temperature=1.0, seed=seed, grammar=grammar,
                                                                     grammar_triggers=[trigger, "<tool_call>"]),
                                              max_tokens=60)).text()
        hits = [i for i in (text.find(trigger), text.find("<tool_call>")) if i >= 0]
        if hits:
            at = min(hits)
            assert re.fullmatch(f"({re.escape(trigger)}|<tool_call>){TAIL}", text[at:]), text


@pytest.mark.parametrize("sampling, words", [
    (dict(grammar='root ::= "x', grammar_triggers=["x"]), "could not be parsed"),
    (dict(grammar='root ::= "<tool_call>" [a-z]+', grammar_triggers=["<call>"]), "must match from its trigger"),
    (dict(grammar=None, grammar_triggers=["<tool_call>"]), "need a grammar"),
    (dict(grammar='root ::= "a"', grammar_triggers=[""]), "non-empty"),
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


def test_trigger_patterns_are_literal(engine: Engine):
    """Regex metacharacters in a trigger match themselves (llama.cpp compiles triggers as std::regex)."""
    trigger = "[TOOL_CALLS](.*)"
    params = SamplingParams(temperature=0, grammar=f"root ::= {gbnf_literal(trigger)} [a-z]+",
                            grammar_triggers=[trigger])
    sampler = engine.prepare(GenerationRequest(chat(engine, "hi"), params)).take_sampler()
    try:
        assert sampler.accepts(trigger.encode()) and sampler.accepts(b"[TOOL_CALLS](.*)abc")
        assert not sampler.accepts(b"[TOOL_CALLS](.*)1")
        ids = engine.tokenize(trigger, add_special=False)
        assert sampler._trigger_text(ids[-1]) is None  # one token of it is not the whole trigger
        # llama.cpp's own lazy grammar: waiting, it allows anything; the whole literal trigger (and not
        # "[" alone, which the unescaped pattern would match) switches it on.
        digit = engine.tokenize("1", add_special=False)[0]
        for tok in ids:
            assert sampler._allowed(digit)
            llama_cpp.llama_sampler_accept(sampler.grammar, tok)
        assert not sampler._allowed(digit)
        assert sampler._allowed(engine.tokenize("abc", add_special=False)[0])
    finally:
        sampler.free()
