"""Running a Generation to a response: one JSON body, or a stream of server-sent events."""

from __future__ import annotations

import asyncio

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

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


class EventStream(Response):
    """A Generation as server-sent events. In place of StreamingResponse over an async generator:
    each token is one await of Generation.next() and one send of ready bytes, no generator layers and
    no task group per response. A failure midway becomes an error event; the stream still ends with
    [DONE]. A client that goes away cancels its sequences (the disconnect watcher)."""

    media_type = "text/event-stream"

    def __init__(self, gen: Generation, writer: ChunkWriter, echo: str = "") -> None:
        self.gen = gen
        self.writer = writer
        self.echo = echo
        self.status_code = 200
        self.background = None
        self.init_headers(SSE_HEADERS)  # no body: no content-length, so the server sends it chunked

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gen, writer = self.gen, self.writer
        gen.watch_disconnect(receive)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            first = []
            for index in range(len(gen.streams)):
                if writer.chat:
                    first.append(writer.role(index))
                elif self.echo:
                    first.append(writer.text(index, self.echo))
            if first:
                await send({"type": "http.response.body", "body": "".join(first).encode(), "more_body": True})
            try:
                while (item := await gen.next()) is not None:
                    index, event = item
                    if isinstance(event, Delta):
                        if not event.text:
                            continue
                        chunk = writer.text(index, event.text)
                    elif event.reason == "error":
                        chunk = writer.error(describe(event.error or EngineStopped("the sequence failed"))[1])
                    else:
                        chunk = writer.finish(index, event)
                    await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
                tail = writer.usage([f for f in gen.finishes if f is not None]) if writer.include_usage else ""
            except GgufchatError as exc:  # the timeout, above all
                tail = writer.error(describe(exc)[1])
            await send({"type": "http.response.body", "body": (tail + writer.DONE).encode(), "more_body": False})
        except (asyncio.CancelledError, OSError):
            gen.close("disconnect")
            raise
        finally:
            gen.close()
