"""Tool calling through the official openai client, on a real tool-capable model (Qwen2.5-Coder-0.5B,
whose template has a tools branch and which, left alone, answers with a bare JSON object)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from ggufchat.engine import Engine, LoadOptions
from tests.server.conftest import post, serve

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                       "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a timezone.",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
MARKUP = ("<tool_call>", "</tool_call>", "```", '"name"')


@pytest.fixture(scope="module")
def qwen_url(qwen_engine) -> Iterator[str]:
    with serve(qwen_engine, model_id="qwen") as url:
        yield url


@pytest.fixture
def client(qwen_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=qwen_url + "/v1", api_key="none", max_retries=0)


def _schema(tool: dict) -> dict:
    return tool["function"]["parameters"]


def _check_call(call, tool: dict) -> dict:
    assert call.type == "function"
    assert call.id.startswith("call_") and len(call.id) > 5
    assert call.function.name == tool["function"]["name"]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, _schema(tool))
    return args


def test_auto_tool_call(client):
    reply = client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER], temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert _check_call(call, WEATHER)["city"].lower() == "paris"
    assert not any(m in (choice.message.content or "") for m in MARKUP)


def test_streamed_tool_call(client):
    stream = client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER], temperature=0, stream=True)
    calls: dict[int, dict] = {}
    content, finish = [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        for tc in delta.tool_calls or []:
            if tc.index not in calls:
                # The first delta of a call carries everything but the arguments.
                assert tc.id and tc.id.startswith("call_") and tc.type == "function"
                assert tc.function.name == "get_weather" and tc.function.arguments == ""
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:
                assert tc.id is None and tc.function.name is None  # the name is never repeated
                calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls) == [0]
    args = json.loads(calls[0]["arguments"])
    jsonschema.validate(args, _schema(WEATHER))
    assert not any(m in "".join(content) for m in MARKUP)


def test_tool_result_answer(client):
    """The call and its result in the history reach the model, which answers from the result. With the
    tools still offered, this 0.5B model calls the tool again instead (its own template, greedy; so does
    it under llama-server), so the last turn is asked with tool_choice "none", as agents do for a final
    answer."""
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature_c": 18, "sky": "sunny"})},
    ]
    reply = client.chat.completions.create(model="qwen", messages=history, tools=[WEATHER], tool_choice="none",
                                           temperature=0, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert not choice.message.tool_calls
    assert "18" in choice.message.content


def test_tool_choice_none(client):
    reply = client.chat.completions.create(model="qwen", messages=ASK, tools=[WEATHER], tool_choice="none",
                                           temperature=0, max_tokens=40)
    choice = reply.choices[0]
    assert not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.content


def test_tool_choice_required_forces_a_valid_call(client):
    # Nothing in this question calls for a tool; "required" makes one anyway, valid for its schema.
    messages = [{"role": "user", "content": "Say hello to me in French."}]
    reply = client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=120)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _check_call(call, WEATHER)


def test_named_tool_choice(client):
    reply = client.chat.completions.create(
        model="qwen", messages=ASK, tools=[WEATHER, TIME], temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = reply.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_time" for c in calls)
    for call in calls:
        _check_call(call, TIME)


def test_parallel_tool_calls(client):
    messages = [{"role": "user", "content": "What is the weather in Paris and in London? Call the tool for each."}]
    one = client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER], tool_choice="required",
                                         parallel_tool_calls=False, temperature=0, max_tokens=120)
    assert len(one.choices[0].message.tool_calls) == 1
    many = client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER], tool_choice="required",
                                          temperature=0, max_tokens=120)
    calls = many.choices[0].message.tool_calls
    assert len(calls) >= 1
    assert len({c.id for c in calls}) == len(calls)  # ids are unique
    for call in calls:
        _check_call(call, WEATHER)


def test_unknown_tool_choice_and_bad_tools_are_400(qwen_url):
    bad = [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, None),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format"),
        ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]}]},
         None),
    ]
    for extra, param in bad:
        r = post(qwen_url, "/v1/chat/completions", {"model": "qwen", "messages": ASK, **extra})
        assert r.status_code == 400, (extra, r.text)
        error = r.json()["error"]
        assert error["message"]
        if param:
            assert error["param"] == param, (extra, error)


def test_tools_on_a_template_without_tools(base_url):
    """SmolLM2's template knows no tools: the generic fallback describes them in the system message, and
    a forced call still comes back as a valid call."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    for call in choice.message.tool_calls:
        _check_call(call, WEATHER)


def test_tools_on_gemma_through_the_generic_fallback(gemma_path):
    """A second template family: Gemma's turns (no system role, strictly alternating user/model) with
    the generic tool prompt folded into the first user turn, and a tool result in the history."""
    engine = Engine(LoadOptions(model_path=gemma_path, n_seq_max=1, n_ctx=4096, seed=0), chat_template="gemma")
    try:
        with serve(engine, model_id="gemma") as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            reply = client.chat.completions.create(model="gemma", messages=ASK, tools=[WEATHER], temperature=0,
                                                   tool_choice="required", parallel_tool_calls=False, max_tokens=80)
            choice = reply.choices[0]
            assert choice.finish_reason == "tool_calls"
            (call,) = choice.message.tool_calls
            _check_call(call, WEATHER)
            history = ASK + [
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
                {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"},
                {"role": "user", "content": "So, should I take an umbrella?"},
            ]
            answer = client.chat.completions.create(model="gemma", messages=history, tools=[WEATHER],
                                                    tool_choice="none", temperature=0, max_tokens=30)
            assert answer.choices[0].message.content
            assert not answer.choices[0].message.tool_calls
    finally:
        engine.close()
