"""Continuous batching seen from HTTP: concurrent streams, disconnects, the bounded queue."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.server.conftest import metric, post, serve, wait_for

PROMPTS = ["Tell me about the sea.", "What is a prime number?", "Write a haiku about snow.", "Why is the sky blue?",
           "Name a famous painter.", "How do birds fly?", "What is bread made of?", "Describe a forest at night."]


def _stream(url: str, prompt: str, max_tokens: int = 40) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens,
            "stream": True}
    text = []
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines(decode_unicode=True):
            if not line:
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            text.append(chunk["choices"][0]["delta"].get("content") or "")
    return "".join(text)


def test_eight_concurrent_streams_equal_sequential(url: str, engine):
    sequential = [_stream(url, p) for p in PROMPTS]
    engine.clear_cache()  # no prefix reuse: the concurrent run prefills together
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        concurrent = list(pool.map(lambda p: _stream(url, p), PROMPTS))
    assert all(concurrent)
    assert concurrent == sequential


def _open_stream(url: str, max_tokens: int) -> socket.socket:
    """A raw streaming request whose connection the test can drop."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": True}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert b"200 OK" in sock.recv(4096)
    return sock


def test_disconnect_cancels_the_sequence(url: str, engine):
    before = metric(url, "ggufchat_sequences_cancelled_total", 'why="disconnect"')
    sock = _open_stream(url, max_tokens=1500)
    assert wait_for(lambda: engine.scheduler.active_count == 1)
    sock.close()
    # Freed at the next step, long before its 1500 tokens were done.
    assert wait_for(lambda: engine.scheduler.active_count == 0, timeout=5)
    assert metric(url, "ggufchat_sequences_cancelled_total", 'why="disconnect"') == before + 1


def test_disconnect_of_a_non_streaming_request(url: str, engine):
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert wait_for(lambda: engine.scheduler.active_count == 1)
    sock.close()
    assert wait_for(lambda: engine.scheduler.active_count == 0, timeout=5)


def test_full_queue_answers_429_with_retry_after(engine):
    with serve(engine, n_parallel=1, max_queue=1) as url:
        busy = [_open_stream(url, max_tokens=1500) for _ in range(2)]  # one running, one queued
        try:
            r = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 4})
            assert r.status_code == 429
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert metric(url, "ggufchat_requests_rejected_total") == 1
        finally:
            for sock in busy:
                sock.close()
        assert wait_for(lambda: engine.scheduler.active_count == 0 and engine.scheduler.queue_depth == 0)
        assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 4}).status_code == 200
