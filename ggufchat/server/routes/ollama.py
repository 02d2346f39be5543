"""The Ollama API on the same port (/api/*): chat, generate, models, pull, delete, version.

A sibling of the OpenAI routes: its own wire types (ollama_protocol.py) and converters
(ollama_convert.py), the same Generation (leases, timeout, cancel on disconnect), the same formats
parser for reasoning and tool calls, and the same grammars for `format`. Which model a request reaches
and the lists /api/tags and /api/ps report are ollama_models.py's (one function each). Errors are
Ollama's shape, {"error": "..."}, with the status of the server's one error table. Docs: docs/ollama.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.types import Receive, Scope, Send

from ggufchat import __version__, formats
from ggufchat.engine.engine import Engine
from ggufchat.engine.types import Delta
from ggufchat.errors import EngineStopped, GgufchatError, InvalidParameter, ModelNotFound, Unsupported
from ggufchat.server import convert, ollama_models, ollama_pull
from ggufchat.server import ollama_convert as oc
from ggufchat.server.body import parse
from ggufchat.server.errors import describe, validation_body
from ggufchat.server.generation import Generation
from ggufchat.server.ollama_models import OllamaState
from ggufchat.server.ollama_protocol import (
    OllamaChatRequest,
    OllamaDeleteRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    OllamaPullRequest,
    OllamaShowRequest,
)
from ggufchat.server.pool import Target
from ggufchat.server.routes.streaming import collect
from ggufchat.server.state import ServerState, server_state

# What /api/version reports: the Ollama API level these routes follow (clients compare it), with
# ggufchat's own version beside it.
OLLAMA_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"


def error_response(exc: BaseException) -> JSONResponse:
    """Ollama's error shape, {"error": "..."}, with the status the server's error table gives."""
    if isinstance(exc, RequestValidationError):
        return JSONResponse({"error": validation_body(exc)["error"]["message"]}, status_code=400)
    if isinstance(exc, ModelNotFound):
        return JSONResponse({"error": str(exc)}, status_code=404)
    status, body, headers = describe(exc)
    return JSONResponse({"error": body["error"]["message"]}, status_code=status, headers=headers)


def error_message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, GgufchatError) else describe(exc)[1]["error"]["message"]


class OllamaRoute(APIRoute):
    """Every /api/* route answers its errors in Ollama's shape (the app's handlers use OpenAI's)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - every error becomes Ollama's shape
                return error_response(exc)

        return route


# Not in the OpenAPI document (/docs): Ollama's own API reference describes these routes, and the
# property-based test of the document (tests/server/test_fuzz.py) must not pull from real hubs or delete
# from a real model cache, nor expect OpenAI's error shape here.
router = APIRouter(tags=["Ollama"], route_class=OllamaRoute, include_in_schema=False)


def _state(request: Request) -> OllamaState:
    return request.app.state.ollama


def _name(body) -> str:
    name = body.model or body.name
    if not name:
        raise InvalidParameter("model is required", param="model")
    return name


# ------------------------------------------------------------------ models
@router.get("/api/version")
async def version():
    """The Ollama API version these routes follow, and ggufchat's."""
    return {"version": OLLAMA_VERSION, "ggufchat": __version__}


@router.get("/api/tags")
async def tags(request: Request, srv: ServerState = Depends(server_state)):
    """Local models: the served one, the model cache (`ggufchat list`) and the embedded model (several
    models: every model the server can load)."""
    state = _state(request)
    holders = await srv.pool.models()
    return {"models": await srv.pool.off_loop(lambda: ollama_models.model_list(srv, state, running=False,
                                                                               holders=holders))}


@router.get("/api/ps")
async def ps(request: Request, srv: ServerState = Depends(server_state)):
    """Models loaded now."""
    state = _state(request)
    return {"models": await srv.pool.off_loop(lambda: ollama_models.model_list(srv, state, running=True))}


@router.post("/api/show")
async def show(request: Request, srv: ServerState = Depends(server_state)):
    """A model's details, GGUF metadata (model_info), parameters, chat template and capabilities."""
    body = await parse(request, OllamaShowRequest, srv.pool)
    target = await srv.pool.resolve(_name(body))
    state = _state(request)
    entry = srv.pool.entries.get(target.holder.name)
    if target.holder.engine is None and entry is not None and entry.describe is not None:
        # Not loaded: read from the header and vocabulary, rather than loading (and maybe evicting) models
        # to describe one (clients such as Continue show every model they list).
        facts = await srv.pool.off_loop(lambda: entry.describe(oc.fim_tokens))
        return await srv.pool.off_loop(lambda: ollama_models.show(srv, state, target, facts))
    lease = await target.holder.lease(0)
    try:
        return await srv.pool.off_loop(lambda: ollama_models.show(
            srv, state, target, ollama_models.engine_facts(state, lease.engine)))
    finally:
        lease.release()


@router.delete("/api/delete")
async def delete(request: Request, srv: ServerState = Depends(server_state)):
    """Remove a model from the cache (404 when it is not there)."""
    body = await parse(request, OllamaDeleteRequest, srv.pool)
    name = _name(body)
    state = _state(request)
    await asyncio.to_thread(ollama_models.delete, srv, state, name)
    srv.pool.invalidate()
    return Response(status_code=200)


@router.post("/api/pull")
async def pull(request: Request, srv: ServerState = Depends(server_state)):
    """Download a model into the cache (`ggufchat download`), streaming its progress."""
    body = await parse(request, OllamaPullRequest, srv.pool)
    spec = ollama_pull.spec_of(_name(body))
    events = ollama_pull.pull(spec, _state(request).settings)
    if not body.stream:
        try:
            async for _ in events:
                pass
        finally:
            srv.pool.invalidate()  # the next request for the new model finds it at once
        return {"status": "success"}

    async def lines() -> AsyncIterator[str]:
        try:
            async for obj in events:
                yield oc.Lines.line_of(obj)
        except Exception as exc:  # noqa: BLE001 - the status line is sent: the error goes in the stream
            yield oc.Lines.error(error_message(exc))
        finally:
            srv.pool.invalidate()

    return StreamingResponse(lines(), media_type=NDJSON)


# ------------------------------------------------------------------ embeddings
@router.post("/api/embed")
async def embed(request: Request, srv: ServerState = Depends(server_state)):
    """Embeddings for a string or an array of strings: L2-normalised, texts too long cut unless truncate
    is false (then a 400)."""
    t_arrival = time.perf_counter()
    body = await parse(request, OllamaEmbedRequest, srv.pool)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if any(texts) and not all(texts):
        raise InvalidParameter("input has an empty string", param="input")
    target = await srv.pool.resolve(body.model)
    load_seconds = await _loaded(target, None if any(texts) else body.keep_alive)
    vectors, count = (await _embed(target, texts, body.dimensions, body.truncate, body.keep_alive) if any(texts)
                      else ([], 0))
    return {"model": body.model, "embeddings": vectors, "total_duration": oc.ns(time.perf_counter() - t_arrival),
            "load_duration": oc.ns(load_seconds), "prompt_eval_count": count}


@router.post("/api/embeddings")
async def embeddings(request: Request, srv: ServerState = Depends(server_state)):
    """The older form: one `prompt`, one `embedding` (Ollama cuts a long prompt here too)."""
    body = await parse(request, OllamaEmbeddingsRequest, srv.pool)
    target = await srv.pool.resolve(body.model)
    await _loaded(target, None if body.prompt else body.keep_alive)
    if not body.prompt:
        return {"embedding": []}
    vectors, _ = await _embed(target, [body.prompt], None, True, body.keep_alive)
    return {"embedding": vectors[0]}


async def _embed(target: Target, texts: list[str], dimensions: int | None, truncate: bool,
                 keep_alive: float | None) -> tuple[list[list[float]], int]:
    # One place in the admission count, as /v1/embeddings takes.
    lease = await target.holder.lease(1, keep_alive=keep_alive)
    try:
        def work() -> tuple[list[list[float]], int]:
            result = lease.engine.embed(texts, dimensions=dimensions, truncate=truncate)
            return result.vectors.tolist(), result.prompt_tokens

        return await target.holder.off_loop(work)
    finally:
        lease.release()


# ------------------------------------------------------------------ generation
async def _loaded(target: Target, keep_alive: float | None = None) -> float:
    """Wait for the model (loading it if it is not loaded); the seconds that took: `load_duration`.
    keep_alive: for a request that only loads (or, with 0, unloads) the model."""
    t0 = time.perf_counter()
    lease = await target.holder.lease(0, keep_alive=keep_alive)
    lease.release()
    return time.perf_counter() - t0


async def _load_reply(target: Target, lines: oc.Lines, keep_alive: float | None) -> JSONResponse:
    """An empty request only loads the model, as in Ollama; with keep_alive 0 it unloads it (what
    `ollama stop` sends): done_reason "unload"."""
    load_seconds = await _loaded(target, keep_alive)
    reason = "unload" if keep_alive == 0 and target.holder.unloadable else "load"
    return JSONResponse(lines.final({"done_reason": reason, "load_duration": oc.ns(load_seconds)}))


def _refuse(body) -> None:
    if body.logprobs or body.top_logprobs:
        raise Unsupported("logprobs are not supported on the Ollama API; the OpenAI API (/v1) has them",
                          param="logprobs")


def _template_kwargs(think) -> dict[str, Any]:
    # think false: templates that can switch reasoning off (Qwen3's enable_thinking) do.
    return {"enable_thinking": False} if think is False else {}


def output_format(srv: ServerState, engine: Engine, plan: convert.ToolPlan, think,
                  render: Callable[[], str]) -> formats.OutputFormat | None:
    """How to read the reply: tool calls when tools are offered; reasoning into `thinking` when the
    template knows <think> and `think` asks for it (absent: the server's --reasoning-format decides)."""
    source = engine.template.source or ""
    wants = think is True or isinstance(think, str) or (think is None and srv.config.reasoning_format == "deepseek")
    reasoning = wants and "<think>" in source
    if not reasoning and not plan.tools:
        return None
    return formats.OutputFormat(reasoning=reasoning, in_reasoning=reasoning and formats.opens_reasoning(render()),
                                tools=plan.tools, family=plan.family, parallel=True)


async def _respond(request: Request, target: Target, body, build: Callable[[Engine], list], setup: dict,
                   lines: oc.Lines, t_arrival: float, load_seconds: float) -> Response:
    gen = await Generation.open(target.holder, request, 1, build, stream=body.stream, keep_alive=body.keep_alive)
    reader = oc.ReplyReader(setup.get("fmt"))
    if body.stream:
        return NdjsonStream(gen, lines, reader, t_arrival, load_seconds)
    choice = (await collect(gen))[0]
    reader.push(choice.content)
    reader.end()
    fields = oc.done_fields(choice.finish, t_arrival, load_seconds)
    reply = reader.reply
    if lines.chat:
        return JSONResponse(lines.final(fields, message=reply.message()))
    extra = {"thinking": reply.thinking} if reply.thinking else {}
    return JSONResponse(lines.final(fields, response=reply.content, **extra))


@router.post("/api/chat")
async def chat(request: Request, srv: ServerState = Depends(server_state)):
    """The next message of a chat; NDJSON lines unless `stream` is false. Tools, `format`, `think`."""
    t_arrival = time.perf_counter()
    body = await parse(request, OllamaChatRequest, srv.pool, max_items={"messages": srv.config.max_messages})
    _refuse(body)
    target = await srv.pool.resolve(body.model)
    lines = oc.Lines(target.name, chat=True)
    if not body.messages:
        return await _load_reply(target, lines, body.keep_alive)
    load_seconds = await _loaded(target)
    setup: dict = {}

    def build(engine: Engine):
        limits = engine.grammar_limits
        messages = oc.chat_messages(body.messages)
        plan = convert.plan_tools(body.tools, None, engine.template.source, limits, shaped=bool(body.format),
                                  parallel=True)
        kwargs = _template_kwargs(body.think)
        tokens = engine.chat_tokens(messages, tools=plan.template_tools, template_kwargs=kwargs)
        setup["fmt"] = output_format(srv, engine, plan, body.think, lambda: engine.render_chat(
            messages, tools=plan.template_tools, template_kwargs=kwargs))
        if plan.grammar is not None:
            sampling = oc.sampling_params(body.options, plan.grammar, triggers=plan.triggers, grammar_param="tools")
        else:
            sampling = oc.sampling_params(body.options, oc.format_grammar(body.format, limits))
        return [oc.generation_request(body.options, tokens, engine.n_ctx_seq, sampling)]

    return await _respond(request, target, body, build, setup, lines, t_arrival, load_seconds)


@router.post("/api/generate")
async def generate(request: Request, srv: ServerState = Depends(server_state)):
    """A completion of `prompt`: through the chat template with `system`, as is with `raw`, or filling
    in the middle before `suffix`; NDJSON lines unless `stream` is false."""
    t_arrival = time.perf_counter()
    body = await parse(request, OllamaGenerateRequest, srv.pool)
    _refuse(body)
    oc.refuse_images(body.images, "images")
    if body.template:
        raise Unsupported("template is not supported: ggufchat renders the model's own chat template "
                          "(or use raw: true with a prompt you formatted)", param="template")
    if body.context:
        raise Unsupported("context (deprecated in Ollama) is not supported; send the conversation to /api/chat",
                          param="context")
    target = await srv.pool.resolve(body.model)
    lines = oc.Lines(target.name, chat=False)
    if not body.prompt and not body.suffix:
        return await _load_reply(target, lines, body.keep_alive)
    load_seconds = await _loaded(target)
    state = _state(request)
    setup: dict = {}

    def build(engine: Engine):
        grammar = oc.format_grammar(body.format, engine.grammar_limits)
        if body.suffix:
            metadata = state.header(engine.model_path)[0].metadata
            fim = oc.fim_tokens(engine.tokenize, metadata, engine.n_vocab)
            if fim is None:
                raise Unsupported(f"{target.name} does not support insert: the model has no fill-in-the-middle "
                                  "tokens, so `suffix` cannot be used with it", param="suffix")

            def content(text: str) -> list[int]:
                return engine.tokenize(text, add_special=False, parse_special=False)

            tokens = oc.fim_prompt(fim, engine.vocabulary.prompt_start, content(body.prompt), content(body.suffix))
        elif body.raw:
            # The client owns the whole prompt text, special tokens included (as /v1/completions).
            tokens = engine.tokenize(body.prompt, add_special=True, parse_special=True)
        else:
            messages = [{"role": "system", "content": body.system}] if body.system else []
            messages.append({"role": "user", "content": body.prompt})
            kwargs = _template_kwargs(body.think)
            tokens = engine.chat_tokens(messages, template_kwargs=kwargs)
            setup["fmt"] = output_format(srv, engine, convert.ToolPlan(), body.think,
                                         lambda: engine.render_chat(messages, template_kwargs=kwargs))
        sampling = oc.sampling_params(body.options, grammar)
        return [oc.generation_request(body.options, tokens, engine.n_ctx_seq, sampling)]

    return await _respond(request, target, body, build, setup, lines, t_arrival, load_seconds)


class NdjsonStream(Response):
    """A Generation as Ollama's JSON lines: one per piece of text (or thinking, or a whole tool call),
    then the final object with `done: true` and the statistics. A failure midway becomes an
    {"error": ...} line, which ends the stream (Ollama's clients raise it). A client that goes away
    cancels the sequence. As EventStream: each token is one await and one send, no generator layers."""

    media_type = NDJSON

    def __init__(self, gen: Generation, lines: oc.Lines, reader: oc.ReplyReader, t_arrival: float,
                 load_seconds: float) -> None:
        self.gen = gen
        self.lines = lines
        self.reader = reader
        self.t_arrival = t_arrival
        self.load_seconds = load_seconds
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _pieces(self, pieces: list[oc.Piece]) -> str:
        lines, out = self.lines, []
        for kind, value in pieces:
            out.append(lines.text(value) if kind == "text" else lines.thinking(value) if kind == "thinking"
                       else lines.calls(value))
        return "".join(out)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gen, lines, reader = self.gen, self.lines, self.reader
        gen.watch_disconnect(receive)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            tail = ""
            try:
                while (item := await gen.next()) is not None:
                    _, event = item
                    if isinstance(event, Delta):
                        if not event.text:
                            continue
                        chunk = self._pieces(reader.push(event.text)) if reader.parser else lines.text(event.text)
                        if chunk:
                            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
                    elif event.reason == "error":
                        tail = lines.error(error_message(event.error or EngineStopped("the sequence failed")))
                    else:
                        fields = oc.done_fields(event, self.t_arrival, self.load_seconds)
                        tail = self._pieces(reader.end()) + lines.line_of(lines.final(fields))
            except GgufchatError as exc:  # the timeout, above all
                tail = lines.error(error_message(exc))
            await send({"type": "http.response.body", "body": tail.encode(), "more_body": False})
        except (asyncio.CancelledError, OSError):
            gen.close("disconnect")
            raise
        finally:
            gen.close()
