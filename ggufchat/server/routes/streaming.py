"""Running a Generation to a response: one JSON body, or a stream of server-sent events."""

from __future__ import annotations

import asyncio

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ggufchat.engine.types import Delta, Finish
from ggufchat.errors import EngineStopped, GgufchatError
from ggufchat.server.convert import Choice, ChunkWriter
from ggufchat.server.errors import describe
from ggufchat.server.generation import Generation
from ggufchat.server.output import ChatOutput, CompletionLogprobs

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def collect(gen: Generation) -> list[Choice]:
    try:
        return await gen.collect()
    finally:
        gen.close()


class PlainChunks:
    """Text only: the fast path, one cached chunk shape per choice."""

    def __init__(self, writer: ChunkWriter) -> None:
        self.writer = writer

    def delta(self, index: int, event: Delta) -> str:
        return self.writer.text(index, event.text) if event.text else ""

    def finish(self, index: int, finish: Finish) -> str:
        return self.writer.finish(index, finish)


class ChatChunks:
    """Chat choices through their ChatOutput: reasoning, tool calls and logprobs."""

    def __init__(self, writer: ChunkWriter, outputs: list[ChatOutput]) -> None:
        self.writer = writer
        self.outputs = outputs

    def delta(self, index: int, event: Delta) -> str:
        return "".join(self.writer.delta(index, d, lp) for d, lp in self.outputs[index].push(event))

    def finish(self, index: int, finish: Finish) -> str:
        output = self.outputs[index]
        tail = "".join(self.writer.delta(index, d, lp) for d, lp in output.end())
        return tail + self.writer.finish(index, finish, called=output.called)


class CompletionChunks:
    """Completions with logprobs: the prompt's (with echo) in a chunk of their own, then each token's."""

    def __init__(self, writer: ChunkWriter, builders: list[CompletionLogprobs], prompt_tokens: list[int]) -> None:
        self.writer = writer
        self.builders = builders
        self.prompt_tokens = prompt_tokens

    def delta(self, index: int, event: Delta) -> str:
        builder, out = self.builders[index], []
        if event.prompt_logprobs is not None:
            out.append(self.writer.delta(index, {"content": ""},
                                         builder.chunk(self.prompt_tokens, event.prompt_logprobs)))
        if event.token_ids:
            entries = event.logprobs or [None] * len(event.token_ids)
            out.append(self.writer.delta(index, {"content": event.text}, builder.chunk(event.token_ids, entries)))
        elif event.text:
            out.append(self.writer.text(index, event.text))
        return "".join(out)

    def finish(self, index: int, finish: Finish) -> str:
        return self.writer.finish(index, finish)


def load_header(gen: Generation) -> dict[str, str]:
    """The seconds a request waited for its model to load (several models: on first use, or after an
    unload), as a response header; none when the model was loaded."""
    seconds = gen.lease.load_seconds
    return {"X-Model-Load-Seconds": f"{seconds:.3f}"} if seconds else {}


class EventStream(Response):
    """A Generation as server-sent events. In place of StreamingResponse over an async generator:
    each token is one await of Generation.next() and one send of ready bytes, no generator layers and
    no task group per response. A failure midway becomes an error event; the stream still ends with
    [DONE]. A client that goes away cancels its sequences (the disconnect watcher)."""

    media_type = "text/event-stream"

    def __init__(self, gen: Generation, writer: ChunkWriter, echo: str = "",
                 chunks: PlainChunks | ChatChunks | CompletionChunks | None = None) -> None:
        self.gen = gen
        self.writer = writer
        self.echo = echo
        self.chunks = chunks or PlainChunks(writer)
        self.status_code = 200
        self.background = None
        # no body: no content-length, so the server sends it chunked
        self.init_headers({**SSE_HEADERS, **load_header(gen)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gen, writer, chunks = self.gen, self.writer, self.chunks
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
                        chunk = chunks.delta(index, event)
                        if not chunk:
                            continue
                    elif event.reason == "error":
                        chunk = writer.error(describe(event.error or EngineStopped("the sequence failed"))[1])
                    else:
                        chunk = chunks.finish(index, event)
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
