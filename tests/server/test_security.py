"""API keys, CORS, the default bind address."""

from __future__ import annotations

import requests
from openai import AuthenticationError, OpenAI

from tests.server.conftest import serve


def test_api_key_guards_every_route_but_health(engine):
    with serve(engine, api_keys=["k1", "k2"]) as url:
        assert requests.get(url + "/health", timeout=10).status_code == 200
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/"),
                             ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"),
                             ("POST", "/tokenize")]:
            r = requests.request(method, url + path, json={}, timeout=10)
            assert r.status_code == 401, path
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["WWW-Authenticate"] == "Bearer"
            wrong = requests.request(method, url + path, json={}, headers={"Authorization": "Bearer nope"},
                                     timeout=10)
            assert wrong.status_code == 401
        for key in ("k1", "k2"):
            r = requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
            assert r.status_code == 200
        client = OpenAI(api_key="k2", base_url=url + "/v1", max_retries=0)
        assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3).usage.completion_tokens == 3
        try:
            OpenAI(api_key="bad", base_url=url + "/v1", max_retries=0).models.list()
            raise AssertionError("a wrong key was accepted")
        except AuthenticationError as exc:
            assert exc.status_code == 401


def test_cors_only_for_listed_origins(engine):
    with serve(engine, cors_origins=["http://app.example"], api_keys=["k"]) as url:
        preflight = requests.options(url + "/v1/chat/completions", timeout=10, headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        auth = {"Authorization": "Bearer k"}
        ok = requests.get(url + "/v1/models", headers={"Origin": "http://app.example", **auth}, timeout=10)
        assert ok.headers["access-control-allow-origin"] == "http://app.example"
        other = requests.get(url + "/v1/models", headers={"Origin": "http://evil.example", **auth}, timeout=10)
        assert "access-control-allow-origin" not in other.headers
        bad_preflight = requests.options(url + "/v1/models", timeout=10, headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in bad_preflight.headers


def test_no_cors_by_default(base_url: str):
    r = requests.get(base_url + "/v1/models", headers={"Origin": "http://app.example"}, timeout=10)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
