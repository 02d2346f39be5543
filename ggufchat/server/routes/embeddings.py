"""The OpenAI embeddings API: POST /v1/embeddings."""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ggufchat.engine import Embeddings, Engine
from ggufchat.engine.embeddings import EmbeddingCancelled
from ggufchat.errors import RequestTimeout
from ggufchat.server.body import documented, parse
from ggufchat.server.protocol import EmbeddingRequest
from ggufchat.server.state import ServerState, server_state

router = APIRouter(tags=["OpenAI"])


@router.post("/v1/embeddings", openapi_extra=documented(EmbeddingRequest))
async def embeddings(request: Request, srv: ServerState = Depends(server_state)):
    """Embeddings (OpenAI API): one L2-normalised vector per input, as floats or base64 float32."""
    # No max_items for `input`: one token array is a list too, and its length is checked against the model.
    # The engine refuses more than 2048 inputs; the body limit bounds what validation costs.
    body = await parse(request, EmbeddingRequest, srv.pool)
    target = await srv.pool.resolve(body.model)
    model = target.name
    stop = threading.Event()  # set on --timeout or a disconnect: no further batch starts
    why: list[str] = []

    def cancel(reason: str) -> None:
        if not stop.is_set():
            why.append(reason)
            stop.set()
            target.holder.metrics.cancelled.labels(reason).inc()

    def work(engine: Engine) -> JSONResponse:
        # Tokenizing, the wait for the engine thread and the JSON of many vectors: all off the event loop.
        result = engine.embed(_inputs(body.input), dimensions=body.dimensions, stop=stop)
        return JSONResponse(embedding_response(result, model, body.encoding_format))

    async def watch() -> None:
        # The body has been read: the next ASGI message is http.disconnect, once the client has left.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancel("disconnect")

    # A request holds one place in the admission count (429 when the server is full), like one sequence.
    lease = await target.holder.lease(1)
    watcher = asyncio.create_task(watch())
    timeout = srv.config.timeout
    timer = asyncio.get_running_loop().call_later(timeout, cancel, "timeout") if timeout else None
    try:
        return await srv.pool.off_loop(lambda: work(lease.engine))
    except EmbeddingCancelled:
        if why and why[0] == "timeout":
            raise RequestTimeout(f"the request took longer than the server's --timeout of {timeout:g} s") from None
        return Response(status_code=499)  # the client has gone: nobody reads this
    finally:
        watcher.cancel()
        if timer is not None:
            timer.cancel()
        lease.release()


def _inputs(value: str | list) -> list:
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [value]  # one token array
    return value


def embedding_response(result: Embeddings, model: str, encoding_format: str = "float") -> dict[str, Any]:
    data = []
    for i, row in enumerate(result.vectors):
        if encoding_format == "base64":
            vector: Any = base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
        else:
            vector = row.tolist()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}
