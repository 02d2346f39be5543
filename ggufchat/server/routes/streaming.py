"""Running a Generation to a response: one JSON body, or a stream of server-sent events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from ggufchat.engine.types import Delta
from ggufchat.errors import EngineStopped, GgufchatError
from ggufchat.server.convert import Choice, ChunkWriter
from ggufchat.server.errors import describe
from ggufchat.server.generation import Generation

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def collect(gen: Generation) -> list[Choice]:
    try:
        return await gen.collect()
    finally:
        gen.close()


def sse_response(gen: Generation, writer: ChunkWriter, echo: str = "") -> StreamingResponse:
    return StreamingResponse(sse_events(gen, writer, echo), media_type="text/event-stream", headers=SSE_HEADERS)


async def sse_events(gen: Generation, writer: ChunkWriter, echo: str = "") -> AsyncIterator[str]:
    """Chunks as the sequences produce them. A failure midway becomes an error event; the stream still
    ends with [DONE]. A client that goes away cancels its sequences (starlette cancels this generator)."""
    try:
        for index in range(len(gen.streams)):
            if writer.chat:
                yield writer.role(index)
            elif echo:
                yield writer.text(index, echo)
        async for index, event in gen.events():
            if isinstance(event, Delta):
                if event.text:
                    yield writer.text(index, event.text)
            elif event.reason == "error":
                yield writer.error(describe(event.error or EngineStopped("the sequence failed"))[1])
            else:
                yield writer.finish(index, event)
        if writer.include_usage:
            yield writer.usage([f for f in gen.finishes if f is not None])
    except GgufchatError as exc:  # the timeout, above all
        yield writer.error(describe(exc)[1])
    except (asyncio.CancelledError, GeneratorExit):
        gen.close("disconnect")
        raise
    finally:
        gen.close()
    yield writer.DONE
