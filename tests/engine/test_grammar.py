"""Grammars: the guard in front of llama.cpp's parser, and sampling under a grammar."""

from __future__ import annotations

import json

import pytest

from ggufchat.engine import Engine, GenerationRequest, SamplingParams
from ggufchat.engine import grammar as gbnf
from ggufchat.engine.sampling import ChainSampler, build_chain
from ggufchat.errors import InvalidParameter
from tests.conftest import chat


def test_scan_skips_literals_classes_and_comments():
    text = 'root ::= ("a" ("b" [(){}|]{2,5})?)? | "{9999}" # ((( | {7000}\nx ::= "\\"(|" y{0,30}\n'
    depth, repeat, alternatives = gbnf.scan(text)
    assert (depth, repeat, alternatives) == (2, 30, 1)


@pytest.mark.parametrize("schema, word", [
    ({"type": "string", "maxLength": 2000}, "nests"),
    ({"type": "string", "maxLength": 30000}, "bytes"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 100000}, "bytes"),
    ({"enum": [f"v{i}" for i in range(3000)]}, "alternatives"),
    ({"enum": [f"value-{i}" for i in range(20000)]}, "JSON schema is"),
])
def test_schemas_over_a_limit_are_refused_naming_it(schema, word):
    with pytest.raises(InvalidParameter, match=word) as info:
        gbnf.from_schema(schema, gbnf.GrammarLimits())
    assert "this server allows" in str(info.value) and info.value.param == "response_format"


def test_limits_are_configurable():
    schema = {"enum": [f"v{i}" for i in range(300)]}
    gbnf.from_schema(schema, gbnf.GrammarLimits())
    with pytest.raises(InvalidParameter, match="allows 100"):
        gbnf.from_schema(schema, gbnf.GrammarLimits(max_alternatives=100))


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"enum": ["red", "green", "blue", "a colour nobody has named"]},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 5},
]
PROMPTS = ["Describe a cat as JSON.", "Pick a colour.", "List some numbers."]


def _run(engine: Engine, prompt: str, grammar: str, *, in_chain: bool) -> str:
    params = SamplingParams(temperature=0, grammar=grammar)
    prepared = engine.prepare(GenerationRequest(chat(engine, prompt), params, max_tokens=40))
    if in_chain:  # the grammar applied to the whole vocabulary at every step, as before
        prepared.discard()
        prepared.sampler = ChainSampler(build_chain(params, n_vocab=engine.tokenizer.n_vocab,
                                                    n_ctx_seq=engine.n_ctx_seq, default_seed=0,
                                                    vocab=engine.model.vocab,
                                                    history=prepared.request.prompt_tokens))
    return engine.submit(prepared).text()


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "enum", "array"])
def test_checking_the_grammar_after_sampling_gives_the_same_greedy_output(fresh: Engine, schema):
    grammar = gbnf.from_schema(schema, gbnf.GrammarLimits())
    for prompt in PROMPTS:
        lazy = _run(fresh, prompt, grammar, in_chain=False)
        assert lazy == _run(fresh, prompt, grammar, in_chain=True)
        if schema.get("enum"):
            assert json.loads(lazy) in schema["enum"]


def test_sampled_output_under_a_grammar_stays_valid(fresh: Engine):
    grammar = gbnf.from_schema(SCHEMAS[0], gbnf.GrammarLimits())
    for seed in range(4):
        params = SamplingParams(temperature=1.0, grammar=grammar, seed=seed)
        stream = fresh.submit(GenerationRequest(chat(fresh, PROMPTS[0]), params, max_tokens=60))
        text = stream.text()
        if stream.finish.reason == "stop":
            value = json.loads(text)
            assert isinstance(value["name"], str) and isinstance(value["age"], int)


def test_a_repetition_over_the_limit_is_refused():
    gbnf.check('root ::= "a"{0,1000}', gbnf.GrammarLimits())
    with pytest.raises(InvalidParameter, match="repeats an item 1500 times"):
        gbnf.check('root ::= "a"{0,1500}', gbnf.GrammarLimits())
