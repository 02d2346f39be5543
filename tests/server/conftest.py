"""A real ggufchat server (the FastAPI app under uvicorn, over real HTTP) on the shared engine."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from ggufchat.engine import Engine
from ggufchat.server.app import create_app
from ggufchat.server.connections import HttpLimits, uvicorn_config
from ggufchat.server.lifecycle import ServerConfig
from tests.conftest import wait_for  # noqa: F401 (the server tests import it from here)


@contextmanager
def running(app, limits: HttpLimits | None = None) -> Iterator[str]:
    """Serve `app` on a free port in a background thread, with `ggufchat serve`'s uvicorn settings;
    yields its base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, limits, graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@contextmanager
def serve(engine: Engine | None = None, **config) -> Iterator[str]:
    """A server with its own config over the shared engine (or a factory given as factory=...;
    connection limits as limits=HttpLimits(...))."""
    factory = config.pop("factory", None)
    limits = config.pop("limits", None)
    config.setdefault("model_id", "smollm2-test")
    config.setdefault("n_parallel", engine.n_seq_max if engine is not None else 2)
    app = create_app(ServerConfig(**config), engine=engine, factory=factory)
    with running(app, limits) as url:
        yield url


@pytest.fixture(scope="session")
def base_url(engine: Engine) -> Iterator[str]:
    """The default server: no API key, no CORS, every engine sequence usable."""
    with serve(engine) as url:
        yield url


@pytest.fixture
def url(base_url: str, fresh: Engine) -> str:
    """The default server with the engine's prefix cache emptied."""
    return base_url


def post(url: str, path: str, body=None, **kwargs) -> requests.Response:
    return requests.post(url + path, json=body, timeout=120, **kwargs)


def metric(url: str, name: str, labels: str = "") -> float:
    """The sum of a sample's values over the series whose labels include `labels` (e.g. 'why="timeout"';
    every model's series when no model="..." is given), from /metrics; 0 when absent."""
    text = requests.get(url + "/metrics", timeout=10).text
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and wanted.items() <= sample.labels.items())

