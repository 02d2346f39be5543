"""One API request's sequences in the engine: submit, merge their events, enforce the timeout, cancel
on disconnect, and record metrics. Routes only translate; this is where requests and the engine meet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.types import Receive

from ggufchat.engine.engine import AsyncStream, Engine, Prepared
from ggufchat.engine.types import Delta, Event, Finish, GenerationRequest
from ggufchat.errors import RequestTimeout
from ggufchat.server.convert import Choice
from ggufchat.server.lifecycle import Lease, ModelHolder
from ggufchat.server.metrics import Metrics

log = logging.getLogger(__name__)


def _prepare(engine: Engine, requests: list[GenerationRequest]) -> list[Prepared]:
    prepared: list[Prepared] = []
    try:
        for req in requests:
            prepared.append(engine.prepare(req))
    except BaseException:
        for p in prepared:
            p.discard()
        raise
    return prepared


class Generation:
    def __init__(self, holder: ModelHolder, lease: Lease, requests: list[GenerationRequest],
                 http_request: Request | None = None) -> None:
        self.holder = holder
        self.metrics: Metrics = holder.metrics
        self.lease = lease
        self.requests = requests
        self.http_request = http_request
        self.t_arrival = time.perf_counter()
        self.streams: list[AsyncStream] = []
        self.finishes: list[Finish | None] = [None] * len(requests)
        self.why_cancelled: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task | None = None
        self._merged: asyncio.Queue | None = None  # n > 1: the sequences' events, pumped into one queue
        self._pumps: list[asyncio.Task] = []
        self._last_delta = [0.0] * len(requests)  # for the inter-token latency
        self._closed = False

    @classmethod
    async def start(cls, holder: ModelHolder, lease: Lease, prepared: list[Prepared],
                    http_request: Request | None = None, *, watch_disconnect: bool = False) -> Generation:
        gen = cls(holder, lease, [p.request for p in prepared], http_request)
        try:
            for p in prepared:
                gen.streams.append(lease.engine.submit_async(p))
        except BaseException:
            for p in prepared:
                p.discard()
            gen.close()
            raise
        timeout = holder.config.timeout
        if timeout:
            gen._timer = asyncio.get_running_loop().call_later(timeout, gen.cancel, "timeout")
        if watch_disconnect and http_request is not None:
            gen.watch_disconnect(http_request.receive)
        return gen

    @classmethod
    async def open(cls, holder: ModelHolder, http_request: Request, n_seq: int,
                   build: Callable[[Engine], list[GenerationRequest]], *, stream: bool,
                   keep_alive: float | None = None) -> Generation:
        """Lease the engine for n_seq sequences, build and prepare the requests with it off the event
        loop (templates, tokenizing, grammars: a big request takes seconds, and every other client would
        wait for it), and start them. Streams are cancelled on disconnect by EventStream, other
        responses by a watcher of the connection. keep_alive: how long the model stays loaded after
        this request (Lease)."""
        lease = await holder.lease(n_seq, keep_alive=keep_alive)
        try:
            engine = lease.engine
            prepared = await holder.off_loop(lambda: _prepare(engine, build(engine)))
            return await cls.start(holder, lease, prepared, http_request, watch_disconnect=not stream)
        except BaseException:
            lease.release()
            raise

    def watch_disconnect(self, receive: Receive) -> None:
        """Cancel the sequences when the client goes away. The request body has been read, so the next
        ASGI message is http.disconnect: either the client left, or the response is complete (then
        close() has stopped the watcher first)."""

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.cancel("disconnect")

        self._watcher = asyncio.create_task(watch())

    def cancel(self, why: str) -> None:
        """Cancel every unfinished sequence; they end with a 'cancelled' Finish at the next step."""
        if self.why_cancelled is not None:
            return
        running = [s for s, f in zip(self.streams, self.finishes, strict=False) if f is None]
        if not running:
            return
        self.why_cancelled = why
        self.metrics.cancelled.labels(why).inc(len(running))
        for stream in running:
            stream.cancel()
        self.lease.release_admission()  # they end at the engine's next step; the queue need not wait

    async def next(self) -> tuple[int, Event] | None:
        """The next (choice index, event); None once every sequence has finished, or RequestTimeout
        then if the timeout cut them short. A coroutine, not a generator: a streamed token reaches
        the socket without passing through layers of async generators (each costs a few us per token
        on the event loop, and at one client that loop time is on the path of every token)."""
        if None not in self.finishes:
            if self.why_cancelled == "timeout":
                raise RequestTimeout(f"the request took longer than the server's --timeout of "
                                     f"{self.holder.config.timeout:g} s")
            return None
        if len(self.streams) == 1:
            index, event = 0, await self.streams[0].next()
        else:
            if self._merged is None:
                self._merged = asyncio.Queue()
                self._pumps = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self.streams)]
            index, event = await self._merged.get()
        now = time.perf_counter()
        if isinstance(event, Delta):
            if self._last_delta[index]:
                self.metrics.itl.observe(now - self._last_delta[index])
            self._last_delta[index] = now
        else:
            self._record(index, event)
        return index, event

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """next() as an async iterator."""
        while (item := await self.next()) is not None:
            yield item

    async def _pump(self, index: int, stream: AsyncStream) -> None:
        async for event in stream:
            self._merged.put_nowait((index, event))

    def _record(self, index: int, finish: Finish) -> None:
        self.finishes[index] = finish
        m = self.metrics
        usage = finish.usage
        m.finished.labels(finish.reason).inc()
        m.generated_tokens.inc(usage.completion_tokens)
        if usage.drafted_tokens:
            m.draft_tokens.inc(usage.drafted_tokens)
            m.draft_accepted.inc(usage.accepted_tokens)
        if index == 0:  # the n choices share one prompt
            m.prompt_tokens.inc(usage.prompt_tokens)
            m.cached_tokens.inc(usage.cached_tokens)
        if usage.t_first_token:
            m.ttft.observe(max(0.0, usage.t_first_token - self.t_arrival))

    async def collect(self) -> list[Choice]:
        """Wait for every sequence (non-streaming responses)."""
        choices = [Choice(i) for i in range(len(self.streams))]
        async for index, event in self.events():
            if isinstance(event, Delta):
                choices[index].add(event)
            else:
                choices[index].finish = event
                if event.reason == "error" and event.error is not None:
                    raise event.error
        return choices

    def close(self, why: str | None = None) -> None:
        """Idempotent: cancel what still runs (why: 'disconnect'...), stop timers, release the lease."""
        if self._closed:
            return
        self._closed = True
        if why is not None:
            self.cancel(why)
        elif not all(self.finishes):
            self.cancel("abandoned")
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        for pump in self._pumps:
            pump.cancel()
        self.lease.release()
