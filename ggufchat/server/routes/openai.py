"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ggufchat import formats
from ggufchat.engine.engine import Engine
from ggufchat.server import convert
from ggufchat.server.body import documented, parse
from ggufchat.server.generation import Generation
from ggufchat.server.lifecycle import ModelHolder
from ggufchat.server.output import ChatOutput, CompletionLogprobs
from ggufchat.server.protocol import ChatCompletionRequest, CompletionRequest
from ggufchat.server.routes.streaming import ChatChunks, CompletionChunks, EventStream, collect, load_header
from ggufchat.server.state import ServerState, server_state

router = APIRouter(tags=["OpenAI"])


@router.post("/v1/chat/completions", openapi_extra=documented(ChatCompletionRequest))
async def chat_completions(request: Request, srv: ServerState = Depends(server_state)):
    """Chat completion (OpenAI API), with tools, reasoning and logprobs; `stream: true` for server-sent
    events."""
    body = await parse(request, ChatCompletionRequest, srv.pool, max_items={"messages": srv.config.max_messages})
    target = await srv.pool.resolve(body.model)
    setup: dict = {}

    def build(engine: Engine):
        limits = engine.grammar_limits
        plan = convert.tool_plan(body, engine.template.source, limits)
        messages = convert.chat_messages(body.messages)
        kwargs = body.chat_template_kwargs or {}
        tokens = engine.chat_tokens(messages, tools=plan.template_tools, template_kwargs=kwargs)
        setup["fmt"] = output_format(srv, engine, plan, body.parallel_tool_calls,
                                     lambda: engine.render_chat(messages, tools=plan.template_tools,
                                                                template_kwargs=kwargs))
        setup["pieces"] = engine.token_pieces if body.logprobs else None
        return convert.chat_requests(body, tokens, limits, plan)

    gen = await Generation.open(target.holder, request, body.n, build, stream=body.stream)
    rid = convert.new_id("chatcmpl")
    model = target.name
    fmt, pieces = setup["fmt"], setup["pieces"]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writer = convert.ChunkWriter(rid, model, chat=True, include_usage=include_usage)
        chunks = None
        if fmt is not None or pieces is not None:
            chunks = ChatChunks(writer, [ChatOutput(fmt, pieces) for _ in range(body.n)])
        return EventStream(gen, writer, chunks=chunks)
    choices = await collect(gen)
    if pieces is not None:  # token texts for every logprob: more than a few ms for long replies
        return JSONResponse(await srv.pool.off_loop(lambda: convert.chat_completion(rid, model, choices, fmt, pieces)),
                            headers=load_header(gen))
    return JSONResponse(convert.chat_completion(rid, model, choices, fmt), headers=load_header(gen))


def output_format(srv: ServerState, engine: Engine, plan: convert.ToolPlan, parallel: bool,
                  render: Callable[[], str]) -> formats.OutputFormat | None:
    """How to read the model's reply: tool calls when tools are offered, <think> reasoning when the
    template knows it (reasoning models' templates all mention <think>) and --reasoning-format is
    deepseek. None: plain text, the streaming fast path."""
    source = engine.template.source or ""
    reasoning = srv.config.reasoning_format == "deepseek" and "<think>" in source
    if not reasoning and not plan.tools:
        return None
    return formats.OutputFormat(reasoning=reasoning, in_reasoning=reasoning and formats.opens_reasoning(render()),
                                tools=plan.tools, family=plan.family, parallel=parallel)


@router.post("/v1/completions", openapi_extra=documented(CompletionRequest))
async def completions(request: Request, srv: ServerState = Depends(server_state)):
    """Text completion (OpenAI API): the prompt is continued as is, no chat template. `logprobs` with
    `echo` scores the prompt too (`max_tokens: 0` scores only the prompt)."""
    body = await parse(request, CompletionRequest, srv.pool)
    target = await srv.pool.resolve(body.model)
    prompt = convert.completion_prompt(body.prompt)
    setup: dict = {"echo": "", "pieces": None}

    def build(engine: Engine):
        if isinstance(prompt, str):
            tokens = engine.tokenize(prompt, add_special=True, parse_special=True)
            setup["echo"] = prompt if body.echo else ""
        else:
            tokens = prompt
            setup["echo"] = engine.detokenize(prompt, param="prompt") if body.echo else ""
        setup["tokens"] = tokens
        setup["pieces"] = engine.token_pieces if body.logprobs is not None else None
        return convert.completion_requests(body, tokens, engine.grammar_limits)

    gen = await Generation.open(target.holder, request, body.n, build, stream=body.stream)
    rid = convert.new_id("cmpl")
    model = target.name
    echo, pieces = setup["echo"], setup["pieces"]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writer = convert.ChunkWriter(rid, model, chat=False, include_usage=include_usage)
        chunks = None
        if pieces is not None:
            chunks = CompletionChunks(writer, [CompletionLogprobs(pieces) for _ in range(body.n)], setup["tokens"])
        return EventStream(gen, writer, echo, chunks=chunks)
    choices = await collect(gen)
    if pieces is not None:
        return JSONResponse(await srv.pool.off_loop(lambda: convert.text_completion(
            rid, model, choices, echo, pieces=pieces, prompt_tokens=setup["tokens"])), headers=load_header(gen))
    return JSONResponse(convert.text_completion(rid, model, choices, echo), headers=load_header(gen))


@router.get("/v1/models")
async def models(srv: ServerState = Depends(server_state)):
    """The models this server serves: the one it was started with, or (several models) every model it
    can load, loaded or not (`status`)."""
    return {"object": "list", "data": [model_card(srv, holder) for holder in await srv.pool.models()]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, srv: ServerState = Depends(server_state)):
    """One model by id or alias."""
    if not srv.pool.several:
        if model_id != srv.config.model_id:
            raise HTTPException(404, f"no model {model_id!r}; this server serves {srv.config.model_id!r}")
        return model_card(srv, srv.pool.default)
    return model_card(srv, (await srv.pool.resolve(model_id)).holder)


def model_card(srv: ServerState, holder: ModelHolder) -> dict:
    card = {"id": holder.name, "object": "model", "created": holder.created, "owned_by": "ggufchat",
            "status": holder.state, "n_parallel": holder.n_parallel}
    entry = srv.pool.entries.get(holder.name)
    if entry is not None and entry.aliases:
        card["aliases"] = list(entry.aliases)
    engine = holder.engine
    if engine is not None:
        card["n_ctx_per_sequence"] = engine.n_ctx_seq
    return card
