"""The Ollama API on a model with a tools template and fill-in-the-middle tokens (Qwen2.5-Coder-0.5B),
through the official `ollama` client: tool calls with their arguments as objects, streamed and not, a
tool result answered, and `suffix` (insert)."""

from __future__ import annotations

from collections.abc import Iterator

import jsonschema
import ollama
import pytest

from tests.server.conftest import serve

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                       "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
GREEDY = {"temperature": 0, "num_predict": 48}


@pytest.fixture(scope="module")
def client(qwen_engine) -> Iterator[ollama.Client]:
    with serve(qwen_engine, model_id="qwen") as url:
        yield ollama.Client(host=url, timeout=300)


def _check(call) -> dict:
    assert call.function.name == "get_weather"
    args = call.function.arguments
    assert isinstance(args, dict)  # an object, as Ollama sends it, not a JSON string
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert "paris" in args["city"].lower()
    return args


def test_capabilities(client: ollama.Client):
    show = client.show("qwen")
    assert show.capabilities == ["completion", "tools", "insert"]
    assert show.details.family == "qwen2" and show.details.quantization_level == "Q4_K_M"


def test_tool_call_not_streamed(client: ollama.Client):
    r = client.chat(model="qwen", messages=ASK, tools=[WEATHER], options=GREEDY, stream=False)
    assert r.done_reason == "stop"
    assert len(r.message.tool_calls) == 1
    _check(r.message.tool_calls[0])
    for markup in ("<tool_call>", '"name"', "```"):
        assert markup not in (r.message.content or "")


def test_tool_call_streamed(client: ollama.Client):
    parts = list(client.chat(model="qwen", messages=ASK, tools=[WEATHER], options=GREEDY, stream=True))
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert len(calls) == 1 and parts[-1].done and parts[-1].done_reason == "stop"
    _check(calls[0])
    assert parts[-1].eval_count > 5 and parts[-1].eval_duration > 0


def test_tool_result_is_answered(client: ollama.Client):
    history = [*ASK,
               {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": '{"temperature_c": 18, "sky": "sunny"}', "tool_name": "get_weather"}]
    # Without tools offered this time: this small model calls the tool again when it may (with tools and
    # tool_choice auto, as Ollama has no tool_choice; the OpenAI test uses tool_choice none).
    r = client.chat(model="qwen", messages=history, options=GREEDY, stream=False)
    assert not r.message.tool_calls
    assert "18" in r.message.content


def test_suffix_fills_in_the_middle(client: ollama.Client):
    prompt = "def add(a, b):\n    "
    suffix = "\n\nprint(add(2, 3))\n"
    r = client.generate(model="qwen", prompt=prompt, suffix=suffix, options={"temperature": 0, "num_predict": 12})
    assert "return" in r.response and "a + b" in r.response
    # Prefix, suffix and three FIM tokens: no chat template (Qwen's adds a system prompt of ~20 tokens).
    assert r.prompt_eval_count < 25
