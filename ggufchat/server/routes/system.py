"""The server's own endpoints: health, Prometheus metrics, tokenize / detokenize (llama-server's shapes)."""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ggufchat.engine import Engine
from ggufchat.server.body import documented, parse
from ggufchat.server.errors import error_body
from ggufchat.server.ollama_models import expires_at
from ggufchat.server.protocol import DetokenizeRequest, TokenizeRequest
from ggufchat.server.state import ServerState, server_state

router = APIRouter(tags=["Server"])
# Probes a balancer or Kubernetes calls without an API key (app.py makes them public).
PROBE_PATHS = frozenset({"/health", "/health/ready", "/health/live"})


@router.get("/health")
async def health(srv: ServerState = Depends(server_state)):
    """200 when requests can be served (also when the model is unloaded for idleness: the next request
    reloads it); 503 while the model loads, after it failed to load, after the engine stopped, or while
    the server drains after SIGTERM. With several models, the default model decides, and `models`
    lists the loaded ones."""
    pool = srv.pool
    holder = pool.default
    holder.check_engine()
    if pool.draining_since is not None and holder.state != "failed":
        return _unavailable("the server is shutting down", "draining")
    name = holder.name
    loaded = {"models": [_loaded(h) for h in pool.loaded()]} if pool.several else {}
    if holder.state == "ready":
        stats = [h.stats() for h in pool.loaded()]
        return {"status": "ok", "model": name, "slots_processing": sum(s.active_sequences for s in stats),
                "queue_depth": sum(s.queue_depth for s in stats), **loaded}
    if holder.state == "unloaded":
        return {"status": "idle", "model": name, **loaded}
    if holder.state == "loading":
        message = "the model is loading"
    elif holder.engine is not None:
        message = f"{holder.error}; restart the server"
    else:
        message = f"the model failed to load: {holder.error}"
    body = error_body(message, "server_error", code="model_" + holder.state)
    return JSONResponse({**body, "status": holder.state}, status_code=503, headers={"Retry-After": "1"})


def _loaded(holder) -> dict:
    stats = holder.stats()
    return {"name": holder.name, "state": holder.state, "memory_bytes": holder.memory,
            "slots_processing": stats.active_sequences, "queue_depth": stats.queue_depth,
            "expires_at": expires_at(holder)}


@router.get("/health/ready")
async def ready(srv: ServerState = Depends(server_state)):
    """Readiness: 200 when this replica should get new requests; 503 (with Retry-After) while the
    (default) model loads, after it failed, or while draining after SIGTERM."""
    why = srv.pool.not_ready()
    if why is None:
        return {"status": "ready", "model": srv.pool.default.name}
    messages = {"draining": "the server is shutting down", "loading": "the model is loading"}
    return _unavailable(messages.get(why, f"{srv.pool.default.error}; restart the server"), why)


@router.get("/health/live")
async def live(srv: ServerState = Depends(server_state)):
    """Liveness: 503 only when restarting the process is the cure (an engine thread died, or one holds
    work and has not decoded a step for --wedge-timeout seconds); 200 while loading and draining."""
    why = srv.pool.not_live()
    if why is None:
        return {"status": "live"}
    failed = any(h.state == "failed" for h in srv.pool.holders.values())
    status = "failed" if failed else "wedged"
    return JSONResponse({**error_body(why, "server_error", code="engine_" + status), "status": status},
                        status_code=503)


def _unavailable(message: str, status: str) -> JSONResponse:
    body = error_body(message, "server_error", code=status if status == "draining" else "model_" + status)
    return JSONResponse({**body, "status": status}, status_code=503, headers={"Retry-After": "1"})


@router.get("/metrics")
async def metrics(srv: ServerState = Depends(server_state)):
    """Prometheus text format."""
    return Response(srv.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize", openapi_extra=documented(TokenizeRequest))
async def tokenize(request: Request, srv: ServerState = Depends(server_state)):
    """Text -> token ids (with `with_pieces`, each id with its text)."""
    body = await parse(request, TokenizeRequest, srv.pool)

    def work(engine: Engine) -> Response:
        tokens = engine.tokenize(body.content, add_special=body.add_special, parse_special=body.parse_special)
        if body.with_pieces:
            return _json_tokens([{"id": t, "piece": engine.detokenize([t])} for t in tokens])
        return _json_tokens(tokens)

    return await _off_loop(srv, body.model, work)


@router.post("/detokenize", openapi_extra=documented(DetokenizeRequest))
async def detokenize(request: Request, srv: ServerState = Depends(server_state)):
    """Token ids -> text."""
    body = await parse(request, DetokenizeRequest, srv.pool)
    return await _off_loop(srv, body.model, lambda engine: _json({"content": engine.detokenize(body.tokens)}))


async def _off_loop(srv: ServerState, model: str | None, work: Callable[[Engine], Response]) -> Response:
    # A megabyte of text is a second of tokenizing and its JSON as long again: not on the event loop.
    lease = await (await srv.pool.resolve(model)).holder.lease(0)
    try:
        return await srv.pool.off_loop(lambda: work(lease.engine))
    finally:
        lease.release()


def _json(content) -> Response:
    return Response(json.dumps(content, ensure_ascii=False).encode(), media_type="application/json")


def _json_tokens(items: list) -> Response:
    """{"tokens": items}, encoded and sent in slices as it is written: one json.dumps, join or encode of
    a million items holds the GIL long enough to stall the event loop (another thread; numbers in
    docs/benchmarks.md, costs behind design choices). Starlette pulls each slice on a worker thread."""
    if len(items) <= _SLICE:
        return _json({"tokens": items})

    def chunks():
        yield b'{"tokens": ['
        for i in range(0, len(items), _SLICE):
            yield ((", " if i else "") + json.dumps(items[i:i + _SLICE], ensure_ascii=False)[1:-1]).encode()
        yield b"]}"

    return StreamingResponse(chunks(), media_type="application/json")


_SLICE = 4096
