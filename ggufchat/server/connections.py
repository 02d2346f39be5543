"""The HTTP connection layer under the app: uvicorn's settings, built in one place for `ggufchat serve` and
the tests, and the limits on slow and idle clients that uvicorn does not have.

uvicorn bounds idle time after a response (`timeout_keep_alive`, and any byte that arrives cancels it)
but not how long a client may take to send its request: a socket that sends half a request line and
then nothing is held until the process exits (slowloris). `GuardedHttpProtocol` adds deadlines for the
request headers and the request body, and keeps the connection count bounded without letting such
sockets lock real clients out.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ggufchat.server.errors import error_body

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    """None switches a limit off."""

    # Real clients send their headers in one write; 10 s covers a slow link many times over.
    header_timeout: float | None = 10.0
    # Counted from the end of the headers: 60 s carries the largest default body (4 MiB) at ~70 KB/s;
    # prompts are far smaller.
    body_timeout: float | None = 60.0
    # Longer than the 5 s after which httpx (the OpenAI client) drops an idle pooled connection, so the
    # client, not the server, ends the idle connection and never sends into one the server is closing.
    keep_alive: float = 15.0
    # Open connections of every kind: far above what -np and --max-queue can serve at once, few enough
    # that the sockets stay a few MB. (serve lifts a 1024 open-file limit to fit them.)
    max_connections: int | None = 1000
    # Request line and headers together; browsers send a few KB. (uvicorn's h11 protocol stops at 16 KiB,
    # its httptools one not at all.)
    max_header_bytes: int | None = 64 << 10
    # Connections the kernel queues before they are accepted (uvicorn's default; Linux caps it at
    # net.core.somaxconn).
    backlog: int = 2048


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines for the request headers and body, a cap on header
    size, and eviction at the connection limit.

    Why a subclass: the deadlines hang on the parser callbacks (`on_headers_complete`,
    `on_message_complete`) and on asyncio's Protocol methods, which are httptools' and asyncio's public
    interfaces, so nothing here depends on how uvicorn parses or buffers. Of uvicorn's own state it reads
    only `transport`, `loop`, `connections`, `server_state.default_headers` and `cycle.response_complete`
    / `response_started`, which its HTTP protocols have kept for years. A wrapper that watched raw bytes
    would have to parse HTTP a second time; an ASGI middleware cannot help at all, since the app is only
    called once the headers are in. httptools is a hard dependency, so uvicorn's h11 protocol (which has
    its own header size cap but no deadlines either) is never picked.
    """

    limits: HttpLimits = HttpLimits()
    # Connections waiting for a request (new, part sent, or idle keep-alive), oldest first; one dict per
    # server, see protocol_class().
    waiting: dict[GuardedHttpProtocol, None] = {}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._reading_body = False
        # Bytes of the next request so far. Any: a timeout answers 408, where a connection that sent
        # nothing is closed without a word (an unasked-for response on an idle keep-alive connection would
        # be read as the answer to the client's next request).
        self._header_bytes = 0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_waiting()
        self._arm_header_timer()
        limit = self.limits.max_connections
        if limit is not None and len(self.connections) > limit:
            self._evict_one()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self.waiting.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        awaiting = self._awaiting_headers()
        if awaiting:
            self._header_bytes += len(data)
            # A keep-alive connection starts its header deadline at its first byte, not when the response
            # before ended: uvicorn's keep-alive timeout covers the silence until then (and any byte cancels
            # it, so without this one CRLF every few seconds would hold the connection for ever).
            if self._header_timer is None:
                self._arm_header_timer()
        super().data_received(data)
        # httptools buffers a header of any size; checked after the parse, so a chunk that completes the
        # headers (and carries body bytes) is never counted against them.
        cap = self.limits.max_header_bytes
        if awaiting and cap is not None and self._header_bytes > cap and self._awaiting_headers():
            self._drop(431, f"the request headers are larger than {cap} bytes", "invalid_request_error",
                       "request_too_large")

    def on_headers_complete(self) -> None:
        pipelined = not self._idle()
        self._cancel(self._header_timer)
        self._header_timer = None
        self._header_bytes = 0
        self._reading_body = True
        self.waiting.pop(self, None)
        super().on_headers_complete()
        # A pipelined request's body is not read until the one before it is answered (uvicorn pauses
        # reading), so a deadline for it would measure the wrong thing.
        if not pipelined and self.limits.body_timeout is not None:
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._cancel(self._body_timer)
        self._body_timer = None
        self._reading_body = False
        super().on_message_complete()
        # The app answered before it read the body (401, 413) and uvicorn drained the rest: waiting only
        # now, and the drained bytes cancelled uvicorn's keep-alive timer, so the header deadline stands in.
        if self._idle():
            self._start_waiting()
            if self._header_timer is None:
                self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._awaiting_headers():
            self._start_waiting()

    def _idle(self) -> bool:
        """No request between its headers and the end of its response (uvicorn's own test in shutdown())."""
        return self.cycle is None or self.cycle.response_complete

    def _awaiting_headers(self) -> bool:
        return self._idle() and not self._reading_body and not self.transport.is_closing()

    def _start_waiting(self) -> None:
        self.waiting.pop(self, None)
        self.waiting[self] = None  # at the end: the newest

    def _arm_header_timer(self) -> None:
        if self.limits.header_timeout is not None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timed_out)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._awaiting_headers():
            self._drop(408, f"the request headers did not arrive within {self.limits.header_timeout:g} s",
                       "invalid_request_error", "request_timeout")

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_started:
            self._respond(408, f"the request body did not arrive within {self.limits.body_timeout:g} s",
                          "invalid_request_error", "request_timeout")
        # The app, if still waiting for the body, gets http.disconnect.
        self.transport.close()

    def _evict_one(self) -> None:
        """At the connection limit, close the connection that has waited longest for a request, so
        sockets that never finish a request cannot lock real clients out: a real client sends its request
        at once and leaves the waiting list long before it is the oldest entry. With none waiting every
        connection is busy, and uvicorn answers the new one's request 503 (limit_concurrency)."""
        victim = next((c for c in self.waiting if c is not self and not c.transport.is_closing()), None)
        if victim is not None:
            victim._drop(503, "the server is at its connection limit; try again", "server_error", "unavailable")
            # uvicorn forgets a connection only in connection_lost, a loop turn or more after the close;
            # a burst of new connections (and limit_concurrency) would still count the victims until then.
            self.connections.discard(victim)

    def _drop(self, status: int, message: str, type_: str, code: str) -> None:
        self.waiting.pop(self, None)
        if self.transport.is_closing():
            return
        if self._header_bytes:
            self._respond(status, message, type_, code)
        self.transport.close()

    def _respond(self, status: int, message: str, type_: str, code: str) -> None:
        payload = json.dumps(error_body(message, type_, code=code)).encode()
        head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(payload),
                 b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + payload)

    def _cancel_timers(self) -> None:
        self._cancel(self._header_timer)
        self._cancel(self._body_timer)
        self._header_timer = self._body_timer = None

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()


def protocol_class(limits: HttpLimits) -> type[GuardedHttpProtocol]:
    """A protocol class for one server: its limits and its own list of waiting connections."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"limits": limits, "waiting": {}})


def uvicorn_config(app: Callable, limits: HttpLimits | None = None, *,
                   graceful_shutdown: int = 5) -> uvicorn.Config:
    """The uvicorn settings of `ggufchat serve`; the tests serve with the same ones."""
    limits = limits or HttpLimits()
    return uvicorn.Config(
        app,
        http=protocol_class(limits),
        # The app serves no WebSocket, and a connection handed to a WebSocket protocol would leave the
        # limits above behind.
        ws="none",
        log_config=None,
        server_header=False,
        timeout_keep_alive=limits.keep_alive,  # type: ignore[arg-type] (call_later takes a float)
        # uvicorn counts every open connection (this one included, so +1) and every running request, and
        # answers 503 at the end of the headers; with the eviction above it is only reached when every
        # connection is busy with a request.
        limit_concurrency=None if limits.max_connections is None else limits.max_connections + 1,
        backlog=limits.backlog,
        timeout_graceful_shutdown=graceful_shutdown,
    )


def raise_open_file_limit(connections: int | None) -> None:
    """Lift the soft limit on open files (often 1024) toward the hard one, so `connections` sockets and
    the server's own files fit; past the limit accept() fails and the kernel queue fills instead."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return
    needed = (connections or 0) + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        log.warning("only %d open files allowed (ulimit -n): fewer than --max-connections %s can be open",
                    target, connections)
