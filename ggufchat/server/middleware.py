"""Plain ASGI middleware (no per-request task or body copy that BaseHTTPMiddleware would add):
request counting, the body size limit and API-key auth."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ggufchat.server.errors import error_body
from ggufchat.server.metrics import Metrics


async def send_error(send: Send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


class RequestMetrics:
    """Counts every HTTP request by route and status, including those refused by the layers below."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.routes else "other"
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, whether or not they declare their length."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await self._too_large(send)
            return await self.app(scope, receive, send)
        if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
            return await self.app(scope, receive, send)
        # Chunked upload: read it here, up to the limit, then replay it to the app.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._too_large(send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await send_error(send, 413, error_body(f"the request body is larger than {self.limit} bytes",
                                               "invalid_request_error", code="request_too_large"))


class ApiKeyAuth:
    """With API keys set, every route except the exempt ones needs `Authorization: Bearer KEY`.
    `exempt_get`: paths public for GET and HEAD only (the web page at `/`, whose POST is an API)."""

    def __init__(self, app: ASGIApp, keys: list[str], exempt: set[str],
                 exempt_get: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.exempt = exempt
        self.exempt_get = exempt_get

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt or scope["method"] == "OPTIONS" or (
                scope["method"] in ("GET", "HEAD") and scope["path"] in self.exempt_get):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest against every key, without stopping early: no timing hint about which matched.
        ok = scheme.lower() == b"bearer" and sum(hmac.compare_digest(token.strip(), k) for k in self.keys) > 0
        if not ok:
            message = ("invalid API key" if header else
                       "this server needs an API key: send `Authorization: Bearer KEY`")
            return await send_error(send, 401, error_body(message, "authentication_error",
                                                          code="invalid_api_key"),
                                    {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)
