"""The web chat page: `GET /` (and `/ui`) and its static files, shipped in ggufchat/server/web/.

The page holds no secret, so it loads without the API key (app.py exempts PUBLIC_GET); it asks the
user for the key and sends it with its own API calls. GET / gets the page, browser or curl, unless the
client accepts neither HTML nor */* (an Ollama client: it gets "Ollama is running"); HEAD / answers 200.
The seeds' JSON API is `POST /`, which is untouched. The files are read from the package once, as they
are: no build step, nothing from a CDN, and a Content-Security-Policy that allows only this origin.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

router = APIRouter(tags=["Web"], include_in_schema=False)

STATIC_PREFIX = "/ui/static/"
PAGES = ("/", "/ui")
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
# Reachable by GET without the API key (POST / is the seeds' API and still needs it).
PUBLIC_GET = frozenset({*PAGES, *(STATIC_PREFIX + name for name in ASSETS)})

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_COMMON = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}


@cache
def _asset(name: str) -> tuple[bytes, str]:
    data = (resources.files("ggufchat.server") / "web" / name).read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:20] + '"'


def _send(request: Request, name: str, media_type: str, headers: dict[str, str]) -> Response:
    data, etag = _asset(name)
    headers = {**_COMMON, **headers, "ETag": etag}
    # no-cache + ETag: the browser revalidates every time and gets 304 until ggufchat is upgraded.
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)


def page(request: Request) -> Response:
    """The chat page."""
    return _send(request, "index.html", "text/html; charset=utf-8",
                 {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY"})


# Ollama's answer to `GET /`: what its clients probe for. Browsers ask for text/html and get the page;
# curl and scripts send */* (or no Accept) and get the page too, as before. Only a client that names
# other types and not HTML (an Ollama client asking for application/json or text/plain) gets this line.
OLLAMA_RUNNING = "Ollama is running"


def _wants_page(accept: str) -> bool:
    accept = accept.lower()
    return not accept.strip() or "text/html" in accept or "*/*" in accept


def root(request: Request) -> Response:
    """The chat page, or Ollama's "Ollama is running" for a client that does not take HTML."""
    if _wants_page(request.headers.get("accept", "")):
        return page(request)
    return Response(OLLAMA_RUNNING, media_type="text/plain; charset=utf-8", headers=_COMMON)


def root_head(request: Request) -> Response:
    """`HEAD /`: 200 while the server runs (the Ollama CLI's heartbeat)."""
    return Response(status_code=200, headers={**_COMMON, "Content-Type": "text/plain; charset=utf-8"})


router.add_api_route("/", root, methods=["GET"])
router.add_api_route("/", root_head, methods=["HEAD"])
router.add_api_route("/ui", page, methods=["GET"])


def _asset_route(name: str, media_type: str):
    def asset(request: Request) -> Response:
        return _send(request, name, media_type, {})

    return asset


# One route per file (not a path parameter): nothing else under /ui/static/ can be asked for, and
# /metrics counts each file under its own route.
for _name, _type in ASSETS.items():
    router.add_api_route(STATIC_PREFIX + _name, _asset_route(_name, _type), methods=["GET"])
