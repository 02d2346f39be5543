"""Property-based pass over the whole HTTP API: schemathesis generates valid and invalid requests from the
app's own OpenAPI document; no request may get a 5xx, an error body of the wrong shape, or leave the
server slow to answer (issue 14). A fixed seed and a bounded example count keep it repeatable."""

from __future__ import annotations

import time

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from ggufchat.engine import Engine, LoadOptions
from ggufchat.server.app import create_app
from ggufchat.server.lifecycle import ServerConfig
from tests.server.conftest import serve

# The document only: create_app without starting it loads nothing.
schema = schemathesis.openapi.from_dict(create_app(ServerConfig(model_id="m"), factory=lambda: None).openapi())

# Generation lengths are clamped (their validation is tested in test_errors.py): valid requests would
# otherwise keep the model busy for seconds each, over hundreds of generated cases.
_LENGTHS = ("max_tokens", "max_completion_tokens", "max_length")
_N_MAX = 2


def _clamp(body) -> None:
    if not isinstance(body, dict):
        return
    for key in _LENGTHS:
        value = body.get(key)
        if value is None or (type(value) is int and value > 2):
            body[key] = 2
    if type(body.get("n")) is int and body["n"] > _N_MAX:
        body["n"] = _N_MAX


@pytest.fixture(scope="module")
def fuzz_url(model_path):
    # Its own small engine: 48 tokens per sequence bounds what any generated request can cost.
    engine = Engine(LoadOptions(model_path=model_path, n_seq_max=4, n_ctx=4 * 48, seed=0))
    try:
        with serve(engine, max_queue=8) as url:
            yield url
    finally:
        engine.close()


@schema.parametrize()
@settings(max_examples=10, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_request_breaks_the_server(case, fuzz_url):
    _clamp(case.body)
    response = case.call(base_url=fuzz_url, timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    t0 = time.perf_counter()
    assert requests.get(fuzz_url + "/health", timeout=10).status_code == 200
    assert time.perf_counter() - t0 < 1.0
