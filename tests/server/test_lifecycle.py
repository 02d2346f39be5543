"""Loading, idle unload and reload, request timeouts, metrics."""

from __future__ import annotations

import json
import threading
import time

import requests

from ggufchat.engine import Engine, GenerationRequest, LoadOptions, SamplingParams
from ggufchat.errors import EngineStopped
from tests.conftest import wait_for
from tests.server.conftest import metric, post, serve


def _factory(model_path, gate: threading.Event | None = None, loads: list | None = None):
    def load() -> Engine:
        if gate is not None:
            gate.wait(30)
        engine = Engine(LoadOptions(model_path=model_path, n_seq_max=2, n_ctx=2048))
        if loads is not None:
            loads.append(engine)
        return engine
    return load


def _refuses_work(engine: Engine) -> bool:
    """A closed engine turns every submission away with EngineStopped (greedy: nothing touches the
    freed model before the refusal)."""
    try:
        engine.submit(GenerationRequest([1], SamplingParams.greedy(), max_tokens=1)).cancel()
    except EngineStopped:
        return True
    return False


def test_health_is_503_while_loading_and_requests_wait_for_the_model(model_path):
    gate = threading.Event()
    with serve(factory=_factory(model_path, gate)) as url:
        r = requests.get(url + "/health", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert r.json()["error"]["code"] == "model_loading"
        answer = {}
        waiting = threading.Thread(target=lambda: answer.update(
            r=post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 3})))
        waiting.start()
        time.sleep(0.3)
        assert waiting.is_alive()  # held until the model is there, not refused
        gate.set()
        waiting.join(60)
        assert answer["r"].status_code == 200
        assert requests.get(url + "/health", timeout=10).json()["status"] == "ok"


def test_idle_unload_frees_the_model_and_the_next_request_reloads_it(model_path):
    loads: list[Engine] = []
    with serve(factory=_factory(model_path, loads=loads), idle_unload=0.5) as url:
        assert post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 3}).status_code == 200
        deadline = time.monotonic() + 10
        while requests.get(url + "/health", timeout=10).json()["status"] != "idle":
            assert time.monotonic() < deadline, "the model was never unloaded"
            time.sleep(0.1)
        assert wait_for(lambda: _refuses_work(loads[0]))  # the engine really was closed
        assert metric(url, "ggufchat_model_loaded") == 0
        assert post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 3}).status_code == 200
        assert len(loads) == 2 and metric(url, "ggufchat_model_loads_total") == 2


def test_a_streaming_request_is_never_unloaded_under_its_feet(model_path):
    with serve(factory=_factory(model_path), idle_unload=0.2) as url:
        body = {"prompt": "Once upon a time", "max_tokens": 150, "ignore_eos": True, "stream": True}
        with requests.post(url + "/v1/completions", json=body, stream=True, timeout=60) as r:
            lines = [line for line in r.iter_lines(decode_unicode=True) if line]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


def test_timeout(engine):
    with serve(engine, timeout=0.5) as url:
        body = {"prompt": "Once upon a time", "max_tokens": 1900, "ignore_eos": True}
        r = post(url, "/v1/completions", body)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
        with requests.post(url + "/v1/completions", json={**body, "stream": True}, stream=True, timeout=60) as s:
            lines = [line for line in s.iter_lines(decode_unicode=True) if line]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "timeout"
        assert metric(url, "ggufchat_sequences_cancelled_total", 'why="timeout"') == 2
        assert engine.scheduler.active_count == 0


def test_metrics(url: str):
    post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    post(url, "/v1/chat/completions", {"messages": "bad"})
    text = requests.get(url + "/metrics", timeout=10).text
    assert 'ggufchat_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'ggufchat_requests_total{route="/v1/chat/completions",status="400"}' in text
    for name in ("ggufchat_queue_depth", "ggufchat_active_sequences", "ggufchat_prompt_tokens_total",
                 "ggufchat_generated_tokens_total", "ggufchat_time_to_first_token_seconds_bucket",
                 "ggufchat_inter_token_latency_seconds_bucket"):
        assert name in text
    assert metric(url, "ggufchat_generated_tokens_total") >= 5
    assert metric(url, "ggufchat_inter_token_latency_seconds_count") >= 4
