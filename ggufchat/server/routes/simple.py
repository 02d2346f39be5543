"""The seeds' own APIs: FastAPI-style `POST /` and the EverAI-style `/chat` (text/plain)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse

from ggufchat.engine import Engine
from ggufchat.engine.types import GenerationRequest
from ggufchat.server import convert
from ggufchat.server.body import documented, parse
from ggufchat.server.generation import Generation
from ggufchat.server.protocol import ChatRouteRequest, SimpleRequest
from ggufchat.server.routes.streaming import collect
from ggufchat.server.state import ServerState, server_state

router = APIRouter(tags=["Simple"])


async def _reply(srv: ServerState, request: Request, build: Callable[[Engine], GenerationRequest]) -> str:
    target = await srv.pool.resolve(None)  # the seeds' APIs name no model: the default one
    gen = await Generation.open(target.holder, request, 1, lambda engine: [build(engine)], stream=False)
    return (await collect(gen))[0].content


@router.post("/", openapi_extra=documented(SimpleRequest))
async def simple(request: Request, srv: ServerState = Depends(server_state)):
    """`{"prompt", "history"}` -> `{"response", "status", "time"}`, as the seeds' FastAPI servers answer."""
    # A history item can be a [user, assistant] pair, and the system prompt and the prompt come on top.
    history_items = (srv.config.max_messages - 2) // 2
    body = await parse(request, SimpleRequest, srv.pool, max_items={"history": history_items})
    messages = convert.simple_messages(body)
    text = await _reply(srv, request, lambda engine: convert.simple_request(
        body, engine.chat_tokens(messages), convert.SIMPLE_MAX_TOKENS))
    return convert.simple_response(text)


async def _chat_route(prompt: str, request: Request, srv: ServerState) -> PlainTextResponse:
    messages = [{"role": "user", "content": prompt}]
    text = await _reply(srv, request, lambda engine: GenerationRequest(
        prompt_tokens=engine.chat_tokens(messages), max_tokens=convert.CHAT_ROUTE_MAX_TOKENS))
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:16]
    return PlainTextResponse(text, headers={"x-prompt-hash": digest})


@router.get("/chat", response_class=PlainTextResponse)
async def chat_get(request: Request, prompt: str = Query(min_length=1),
                   srv: ServerState = Depends(server_state)):
    """`GET /chat?prompt=...` -> the reply as text/plain (the EverAI seed's route)."""
    return await _chat_route(prompt, request, srv)


@router.post("/chat", response_class=PlainTextResponse, openapi_extra=documented(ChatRouteRequest))
async def chat_post(request: Request, srv: ServerState = Depends(server_state)):
    """`POST /chat` with `{"prompt": ...}` -> the reply as text/plain."""
    body = await parse(request, ChatRouteRequest, srv.pool)
    return await _chat_route(body.prompt, request, srv)
