"""Readiness, liveness and draining as a balancer or Kubernetes sees them: /health/ready, /health/live,
503 + Retry-After while draining, and the autoscaling gauges."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import requests

from ggufchat.engine import Engine, EngineStats, LoadOptions
from ggufchat.server.app import create_app
from ggufchat.server.lifecycle import ServerConfig
from tests.conftest import wait_for
from tests.server.conftest import metric, running

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _factory(model_path, gate: threading.Event):
    """Loads the model once the gate opens: the server is 'loading' until then."""
    def load() -> Engine:
        gate.wait(30)
        return Engine(LoadOptions(model_path=model_path, n_seq_max=2, n_ctx=2048))
    return load


def test_loading_is_not_ready_but_live_then_both(model_path):
    gate = threading.Event()
    app = create_app(ServerConfig(model_id="m", n_parallel=2), factory=_factory(model_path, gate))
    with running(app) as url:
        r = requests.get(url + "/health/ready", timeout=5)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and r.json()["status"] == "loading"
        assert requests.get(url + "/health/live", timeout=5).status_code == 200
        gate.set()
        assert wait_for(lambda: requests.get(url + "/health/ready", timeout=5).status_code == 200, 30)
        assert requests.get(url + "/health/live", timeout=5).json() == {"status": "live"}
        assert metric(url, "ggufchat_slots") == 2


def test_draining_is_not_ready_and_new_requests_get_503_with_retry_after(engine):
    app = create_app(ServerConfig(model_id="m", n_parallel=2, api_keys=["key"]), engine=engine)
    auth = {"Authorization": "Bearer key"}
    with running(app) as url:
        # The probes need no key (a kubelet has none); everything else still does.
        assert requests.get(url + "/health/ready", timeout=5).status_code == 200
        assert requests.get(url + "/health/live", timeout=5).status_code == 200
        assert requests.get(url + "/metrics", timeout=5).status_code == 401
        assert requests.post(url + "/v1/chat/completions", json=CHAT, headers=auth, timeout=60).status_code == 200
        app.state.server.pool.begin_drain()
        for path in ("/health/ready", "/health"):
            r = requests.get(url + path, timeout=5)
            assert r.status_code == 503 and r.headers["Retry-After"] == "1", path
            assert r.json()["status"] == "draining" and r.json()["error"]["code"] == "draining"
        assert requests.get(url + "/health/live", timeout=5).status_code == 200  # do not kill it meanwhile
        r = requests.post(url + "/v1/chat/completions", json=CHAT, headers=auth, timeout=10)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "shutting down" in r.json()["error"]["message"]
        text = requests.get(url + "/metrics", headers=auth, timeout=5).text
        assert "ggufchat_draining 1.0" in text


@dataclass
class _StuckEngine:
    """Stands in for an engine whose decode loop is wedged (a hung llama_decode, a deadlock): it holds
    work and its step counter never moves. A real wedge cannot be caused on purpose from outside."""

    stats_now: EngineStats
    failure: BaseException | None = None

    def stats(self) -> EngineStats:
        return self.stats_now


def test_a_wedged_engine_is_not_live_and_one_making_progress_is():
    stuck = _StuckEngine(EngineStats(active_sequences=2, queue_depth=1, steps=50))
    app = create_app(ServerConfig(model_id="m", wedge_timeout=0.5), engine=stuck)  # type: ignore[arg-type]
    with running(app) as url:
        assert requests.get(url + "/health/live", timeout=5).status_code == 200  # first look
        time.sleep(0.7)
        r = requests.get(url + "/health/live", timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_wedged"
        assert "has not decoded a step" in r.json()["error"]["message"]
        stuck.stats_now = EngineStats(active_sequences=2, queue_depth=1, steps=51)  # it moved again
        assert requests.get(url + "/health/live", timeout=5).status_code == 200
        stuck.stats_now = EngineStats(steps=51)  # idle: no work, no steps, nothing wrong
        time.sleep(0.7)
        assert requests.get(url + "/health/live", timeout=5).status_code == 200


def test_an_engine_whose_thread_died_is_neither_live_nor_ready():
    dead = _StuckEngine(EngineStats(steps=7), failure=RuntimeError("llama_decode returned -3"))
    app = create_app(ServerConfig(model_id="m"), engine=dead)  # type: ignore[arg-type]
    with running(app) as url:
        r = requests.get(url + "/health/live", timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"
        assert "llama_decode returned -3" in r.json()["error"]["message"]
        r = requests.get(url + "/health/ready", timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "failed"
