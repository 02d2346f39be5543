"""Bad input gets an OpenAI-style error body with the right status, and the server keeps serving."""

from __future__ import annotations

import pytest
import requests

from tests.server.conftest import post

CHAT = "/v1/chat/completions"


def _error(r: requests.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_malformed_json(url: str):
    r = requests.post(url + CHAT, data=b'{"messages": [', headers={"Content-Type": "application/json"}, timeout=30)
    assert _error(r, 400)["code"] == "invalid_json"


@pytest.mark.parametrize("body, param", [
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
])
def test_wrong_types_name_the_field(url: str, body: dict, param: str):
    error = _error(post(url, CHAT, body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


@pytest.mark.parametrize("field, value", [
    ("temperature", -1), ("temperature", 3), ("top_p", 1.5), ("max_tokens", 0), ("n", 0), ("n", 100),
    ("presence_penalty", 5), ("frequency_penalty", -3), ("seed", -2),
])
def test_out_of_range_parameters(url: str, field: str, value):
    body = {"messages": [{"role": "user", "content": "hi"}], field: value}
    assert _error(post(url, CHAT, body), 400)["param"] == field


def test_prompt_longer_than_the_context(url: str, engine):
    long_text = "word " * (engine.n_ctx_seq + 100)
    error = _error(post(url, CHAT, {"messages": [{"role": "user", "content": long_text}]}), 400)
    assert error["code"] == "context_length_exceeded"
    error = _error(post(url, "/v1/completions", {"prompt": long_text}), 400)
    assert error["code"] == "context_length_exceeded"
    # ... and the server is fine afterwards.
    assert post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 3}).status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
])
def test_unsupported_or_invalid_options_are_refused_not_ignored(url: str, body: dict, param: str):
    full = {"messages": [{"role": "user", "content": "hi"}], **body}
    assert _error(post(url, CHAT, full), 400)["param"] == param


def test_unknown_route_and_wrong_method(url: str):
    assert _error(requests.get(url + "/v1/nothing", timeout=10), 404)["type"] == "not_found_error"
    assert _error(requests.get(url + CHAT, timeout=10), 405)["code"] == "method_not_allowed"


def test_body_size_limit(url: str):
    huge = {"messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    assert _error(post(url, CHAT, huge), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit still holds
        for _ in range(6):
            yield b"x" * (1 << 20)

    r = requests.post(url + CHAT, data=chunks(), headers={"Content-Type": "application/json"}, timeout=30)
    assert _error(r, 413)["code"] == "request_too_large"


def test_tokenize_detokenize(url: str):
    tokens = post(url, "/tokenize", {"content": "Hello world"}).json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert post(url, "/detokenize", {"tokens": tokens}).json()["content"] == "Hello world"
    pieces = post(url, "/tokenize", {"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hello world"
    special = post(url, "/tokenize", {"content": "<|im_start|>"}).json()["tokens"]
    assert len(special) == 1  # parsed as the special token, as llama-server does by default
    assert _error(post(url, "/detokenize", {"tokens": [10**9]}), 400)["param"] == "tokens"


def test_simple_api_errors(url: str):
    assert _error(post(url, "/", {"history": []}), 400)["param"] == "prompt"
    assert _error(post(url, "/", {"prompt": "hi", "history": [["only one"]]}), 400)["param"] == "history"
    assert _error(requests.get(url + "/chat", timeout=10), 400)["param"] == "prompt"
