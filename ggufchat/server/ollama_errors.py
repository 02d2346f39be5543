"""Ollama's error shape, {"error": "..."}, for every /api/* answer, also the ones the layers in front of the
routes give (401 without the API key, 413 for a body too large, 404 for an unknown path), which use the
server's OpenAI shape {"error": {"message": ...}}. Ollama's clients read `error` as a string: given the
object, they show its repr. Plain ASGI, as server/middleware.py: only error responses are held back."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "/api/"


def reshape(body: bytes) -> bytes | None:
    """The Ollama form of an OpenAI-shaped error body, or None when it is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    return json.dumps({"error": error["message"]}).encode()


class OllamaErrorShape:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            return await self.app(scope, receive, send)
        held: Message | None = None
        chunks: list[bytes] = []

        async def sending(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            new = reshape(body)
            headers = held["headers"]
            if new is not None:
                body = new
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, sending)
