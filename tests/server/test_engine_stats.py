"""/health and the engine gauges of /metrics read the engine's stats at request time."""

from __future__ import annotations

import json
import socket

import requests

from tests.server.conftest import metric, serve, wait_for


def _health(url: str) -> dict:
    return requests.get(url + "/health", timeout=10).json()


def test_health_and_gauges_show_a_request_in_flight(url: str):
    steps_before = metric(url, "ggufchat_engine_steps")
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True,
                       "stream": True}).encode()
    sock = socket.create_connection((host, int(port)))
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert b"200 OK" in sock.recv(4096)
        assert wait_for(lambda: _health(url)["slots_processing"] == 1)
        assert _health(url)["queue_depth"] == 0
        assert metric(url, "ggufchat_active_sequences") == 1
        # Taking a slot comes before the first decode step ends (seconds, on a busy machine).
        assert wait_for(lambda: metric(url, "ggufchat_engine_steps") > steps_before, timeout=60)
        assert metric(url, "ggufchat_engine_decode_seconds") > 0
    finally:
        sock.close()
    assert wait_for(lambda: _health(url)["slots_processing"] == 0 and metric(url, "ggufchat_active_sequences") == 0)


def test_gauges_read_zero_and_no_created_series_without_a_model():
    def never() -> None:
        raise RuntimeError("not loaded in this test")

    with serve(factory=never) as url:
        text = requests.get(url + "/metrics", timeout=10).text
    for name in ("ggufchat_active_sequences", "ggufchat_queue_depth", "ggufchat_engine_steps",
                 "ggufchat_engine_decode_seconds"):
        assert f'\n{name}{{model="smollm2-test"}} 0.0\n' in text
    assert "_created" not in text  # disable_created_metrics() holds for every app
