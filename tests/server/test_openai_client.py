"""The official `openai` client against the real server: chat, streaming, completions, models."""

from __future__ import annotations

import json

import pytest
from openai import OpenAI


@pytest.fixture
def client(url: str) -> OpenAI:
    return OpenAI(api_key="EMPTY", base_url=url + "/v1", max_retries=0)


def test_seed_chat_snippet(client: OpenAI):
    # The vLLM seed's client code, with only the base URL changed.
    chat_response = client.chat.completions.create(
        model="/mnt/model/Llama-2-70b-hf",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Tell me a joke."},
        ]
    )
    choice = chat_response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert chat_response.usage.completion_tokens > 0
    assert chat_response.usage.total_tokens == chat_response.usage.prompt_tokens + chat_response.usage.completion_tokens


def test_greedy_is_deterministic_and_streaming_matches(client: OpenAI):
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=24)
    again = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=24)
    assert whole.choices[0].message.content == again.choices[0].message.content

    chunks = list(client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really token by token
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_and_stop(client: OpenAI):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Count: 1, 2, 3, 4"}],
                                       temperature=0, max_completion_tokens=5)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    full = client.completions.create(model="m", prompt="1, 2, 3, 4,", temperature=0, max_tokens=12).choices[0].text
    assert " 6" in full  # SmolLM counts on; the stop below must cut there
    cut = client.completions.create(model="m", prompt="1, 2, 3, 4,", temperature=0, max_tokens=12, stop=[" 6"])
    assert cut.choices[0].text == full[: full.index(" 6")]
    assert cut.choices[0].finish_reason == "stop"


def test_seed_completion_snippet(client: OpenAI):
    r = client.completions.create(model="/mnt/model/Llama-2-70b-hf", prompt="San Francisco is a", max_tokens=7,
                                  temperature=0)
    assert r.object == "text_completion"
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    assert r.choices[0].text.strip()
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt="San Francisco is a", max_tokens=7, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_n_choices_and_seed(client: OpenAI):
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Invent a name for a cat."}], max_tokens=16,
                  temperature=1.0, n=3, seed=7)
    r = client.chat.completions.create(**kwargs)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # distinct seeds per choice
    assert texts == [c.message.content for c in client.chat.completions.create(**kwargs).choices]  # reproducible
    # Streamed, the three sequences' chunks interleave; each choice reassembles to the same text.
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    streamed = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)}
    assert [streamed[i] for i in range(3)] == texts
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_json_object_response_format(client: OpenAI):
    prompt = "Give me a JSON object describing a cat with name and age."
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                       temperature=0, max_tokens=400, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"  # the grammar let the model end only once the object closed
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_json_schema_response_format(client: OpenAI):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Give me a person as JSON."}], temperature=0,
        max_tokens=80, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int) and isinstance(value["name"], str)


def test_models(client: OpenAI):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2-test"]
    assert client.models.retrieve("smollm2-test").id == "smollm2-test"
