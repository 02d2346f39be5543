"""Logprobs over HTTP: chat (`logprobs`, `top_logprobs`), completions (`logprobs` N, `echo`, and
`max_tokens: 0`, what lm-evaluation-harness's loglikelihood requests send), streamed and not."""

from __future__ import annotations

import json
import math

import openai
import pytest
import requests

from tests.server.conftest import post

PROMPT = "The capital of France is"


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_chat_logprobs_greedy_token_is_the_top_one(url):
    reply = _client(url).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Name three colours."}], temperature=0, max_tokens=12,
        logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    for e in entries:
        assert e.logprob <= 0
        assert bytes(e.bytes).decode("utf-8", errors="replace") == e.token
        assert len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)


def test_chat_logprobs_streamed_equal_the_whole_reply(url):
    body = {"model": "m", "messages": [{"role": "user", "content": "Count to five."}], "temperature": 0,
            "max_tokens": 10, "logprobs": True, "top_logprobs": 2}
    whole = post(url, "/v1/chat/completions", body).json()["choices"][0]["logprobs"]["content"]
    streamed = []
    with requests.post(url + "/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    if choice.get("logprobs"):
                        streamed += choice["logprobs"]["content"]
    assert [e["token"] for e in streamed] == [e["token"] for e in whole]
    for a, b in zip(streamed, whole, strict=True):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)


def test_no_logprobs_unless_asked(url):
    reply = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert reply.json()["choices"][0]["logprobs"] is None
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True,
                                           "top_logprobs": 21})
    assert r.status_code == 400


def test_echo_scores_the_prompt_with_max_tokens_zero(url):
    reply = _client(url).completions.create(model="m", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    assert choice.text == PROMPT
    lp = choice.logprobs
    n = reply.usage.prompt_tokens
    assert reply.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing comes before the first
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == PROMPT
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])


def test_echo_logprobs_equal_generation_logprobs(url):
    """What lm-evaluation-harness relies on: scoring a text as a prompt gives the logprobs the model
    reported when it generated that text."""
    gen = post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 1}).json()
    generated = gen["choices"][0]
    echo = post(url, "/v1/completions", {"prompt": PROMPT + generated["text"], "max_tokens": 0, "echo": True,
                                         "logprobs": 1}).json()["choices"][0]["logprobs"]
    k = len(generated["logprobs"]["tokens"])
    assert echo["tokens"][-k:] == generated["logprobs"]["tokens"]
    for a, b in zip(echo["token_logprobs"][-k:], generated["logprobs"]["token_logprobs"], strict=True):
        assert math.isclose(a, b, abs_tol=2e-3), (a, b)


def test_completion_logprobs_streamed(url):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 1, "echo": True, "stream": True}
    tokens, logprobs, text = [], [], []
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["text"])
                if choice["logprobs"]:
                    tokens += choice["logprobs"]["tokens"]
                    logprobs += choice["logprobs"]["token_logprobs"]
    whole = post(url, "/v1/completions", {**body, "stream": False}).json()["choices"][0]
    assert "".join(text) == whole["text"]
    assert tokens == whole["logprobs"]["tokens"]
    assert logprobs[0] is None
    for a, b in zip(logprobs[1:], whole["logprobs"]["token_logprobs"][1:], strict=True):
        assert math.isclose(a, b, abs_tol=2e-3)


def test_max_tokens_zero_needs_echo_and_logprobs(url):
    r = post(url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
