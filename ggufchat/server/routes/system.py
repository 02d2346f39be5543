"""The server's own endpoints: health, Prometheus metrics, tokenize / detokenize (llama-server's shapes)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ggufchat.errors import InvalidParameter
from ggufchat.server.errors import error_body
from ggufchat.server.protocol import DetokenizeRequest, TokenizeRequest
from ggufchat.server.state import ServerState, server_state

router = APIRouter(tags=["Server"])


@router.get("/health")
async def health(srv: ServerState = Depends(server_state)):
    """200 when requests can be served (also when the model is unloaded for idleness: the next request
    reloads it); 503 while the model loads or after it failed to load."""
    holder = srv.holder
    if holder.state == "ready":
        engine = holder.engine
        return {"status": "ok", "model": srv.config.model_id, "slots_processing": engine.scheduler.active_count,
                "queue_depth": engine.scheduler.queue_depth}
    if holder.state == "unloaded":
        return {"status": "idle", "model": srv.config.model_id}
    message = "the model is loading" if holder.state == "loading" else f"the model failed to load: {holder.error}"
    body = error_body(message, "server_error", code="model_" + holder.state)
    return JSONResponse({**body, "status": holder.state}, status_code=503, headers={"Retry-After": "1"})


@router.get("/metrics")
async def metrics(srv: ServerState = Depends(server_state)):
    """Prometheus text format."""
    return Response(srv.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, srv: ServerState = Depends(server_state)):
    """Text -> token ids (with `with_pieces`, each id with its text)."""
    lease = await srv.holder.lease(0)
    try:
        engine = lease.engine
        tokens = engine.tokenize(body.content, add_special=body.add_special, parse_special=body.parse_special)
        if body.with_pieces:
            return {"tokens": [{"id": t, "piece": engine.detokenize([t])} for t in tokens]}
        return {"tokens": tokens}
    finally:
        lease.release()


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, srv: ServerState = Depends(server_state)):
    """Token ids -> text."""
    lease = await srv.holder.lease(0)
    try:
        engine = lease.engine
        bad = [t for t in body.tokens if not 0 <= t < engine.tokenizer.n_vocab]
        if bad:
            raise InvalidParameter(f"token id {bad[0]} is outside the vocabulary (0..{engine.tokenizer.n_vocab - 1})",
                                   param="tokens")
        return {"content": engine.detokenize(body.tokens)}
    finally:
        lease.release()
