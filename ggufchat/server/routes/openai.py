"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ggufchat.server import convert
from ggufchat.server.body import documented, parse
from ggufchat.server.generation import Generation
from ggufchat.server.protocol import ChatCompletionRequest, CompletionRequest
from ggufchat.server.routes.streaming import EventStream, collect
from ggufchat.server.state import ServerState, server_state

router = APIRouter(tags=["OpenAI"])


@router.post("/v1/chat/completions", openapi_extra=documented(ChatCompletionRequest))
async def chat_completions(request: Request, srv: ServerState = Depends(server_state)):
    """Chat completion (OpenAI API); `stream: true` for server-sent events."""
    body = await parse(request, ChatCompletionRequest, srv.holder, max_items={"messages": srv.config.max_messages})
    gen = await Generation.open(srv.holder, request, body.n, lambda engine: convert.chat_requests(
        body, engine.chat_tokens(convert.chat_messages(body.messages)), engine.grammar_limits), stream=body.stream)
    rid = convert.new_id("chatcmpl")
    model = srv.config.model_id
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(gen, convert.ChunkWriter(rid, model, chat=True, include_usage=include_usage))
    return JSONResponse(convert.chat_completion(rid, model, await collect(gen)))


@router.post("/v1/completions", openapi_extra=documented(CompletionRequest))
async def completions(request: Request, srv: ServerState = Depends(server_state)):
    """Text completion (OpenAI API): the prompt is continued as is, no chat template."""
    body = await parse(request, CompletionRequest, srv.holder)
    prompt = convert.completion_prompt(body.prompt)
    echo = ""

    def build(engine):
        nonlocal echo
        if isinstance(prompt, str):
            tokens = engine.tokenize(prompt, add_special=True, parse_special=True)
            echo = prompt if body.echo else ""
        else:
            tokens = prompt
            echo = engine.detokenize(prompt, param="prompt") if body.echo else ""
        return convert.completion_requests(body, tokens, engine.grammar_limits)

    gen = await Generation.open(srv.holder, request, body.n, build, stream=body.stream)
    rid = convert.new_id("cmpl")
    model = srv.config.model_id
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(gen, convert.ChunkWriter(rid, model, chat=False, include_usage=include_usage), echo)
    return JSONResponse(convert.text_completion(rid, model, await collect(gen), echo))


@router.get("/v1/models")
async def models(srv: ServerState = Depends(server_state)):
    """The one model this server serves."""
    return {"object": "list", "data": [model_card(srv)]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, srv: ServerState = Depends(server_state)):
    """One model by id (only the served one exists)."""
    if model_id != srv.config.model_id:
        raise HTTPException(404, f"no model {model_id!r}; this server serves {srv.config.model_id!r}")
    return model_card(srv)


def model_card(srv: ServerState) -> dict:
    holder = srv.holder
    card = {"id": srv.config.model_id, "object": "model", "created": holder.created, "owned_by": "ggufchat",
            "status": holder.state, "n_parallel": srv.config.n_parallel}
    if holder.engine is not None:
        card["n_ctx_per_sequence"] = holder.engine.n_ctx_seq
    return card
