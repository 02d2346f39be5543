"""The page and its files over plain HTTP: what is served, with which headers, to whom."""

from __future__ import annotations

import requests

from ggufchat.server.routes.web import ASSETS, STATIC_PREFIX
from tests.server.conftest import post, serve


def test_get_root_and_ui_serve_the_page_with_a_strict_csp(web_url: str):
    for path in ("/", "/ui"):
        # No Accept header (curl, scripts) gets the page as well as a browser does.
        for headers in ({}, {"Accept": "text/html,application/xhtml+xml"}):
            r = requests.get(web_url + path, headers=headers, timeout=10)
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/html; charset=utf-8"
            assert "<title>ggufchat</title>" in r.text
            csp = r.headers["content-security-policy"]
            assert csp.startswith("default-src 'self'") and "'unsafe-inline'" not in csp
            assert "frame-ancestors 'none'" in csp
            assert r.headers["x-content-type-options"] == "nosniff"
    # Nothing in the page is fetched from elsewhere.
    page = requests.get(web_url + "/", timeout=10).text
    assert "http://" not in page and "https://" not in page and "<script>" not in page


def test_static_files_and_revalidation(web_url: str):
    for name, media_type in ASSETS.items():
        r = requests.get(web_url + STATIC_PREFIX + name, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"] == media_type and r.content
        etag = r.headers["etag"]
        again = requests.get(web_url + STATIC_PREFIX + name, headers={"If-None-Match": etag}, timeout=10)
        assert again.status_code == 304 and not again.content
    assert requests.get(web_url + STATIC_PREFIX + "../app.py", timeout=10).status_code == 404
    assert requests.get(web_url + STATIC_PREFIX + "nope.js", timeout=10).status_code == 404


def test_post_root_is_still_the_seed_api(url: str):
    r = post(url, "/", {"prompt": "Hello", "max_tokens": 4})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["status"] == 200


def test_page_loads_without_the_key_and_the_api_still_needs_it(engine):
    with serve(engine, api_keys=["webkey"]) as url:
        for path in ("/", "/ui", *(STATIC_PREFIX + name for name in ASSETS)):
            assert requests.get(url + path, timeout=10).status_code == 200, path
        # Only GET is public: the seeds' POST / and everything else still need the key.
        assert post(url, "/", {"prompt": "Hello"}).status_code == 401
        assert requests.put(url + "/", timeout=10).status_code == 401
        assert requests.get(url + "/v1/models", timeout=10).status_code == 401
        r = post(url, "/", {"prompt": "Hello", "max_tokens": 4}, headers={"Authorization": "Bearer webkey"})
        assert r.status_code == 200
