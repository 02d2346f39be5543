"""The model's life inside the server: load in the background, admit requests, unload when idle.

Every request holds a lease on the engine while it runs, so the idle timer can never free a model
that someone is using; a request that arrives after an unload waits for the reload.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.exceptions import HTTPException

from ggufchat.engine import Engine, EngineStats
from ggufchat.errors import EngineStopped, QueueFull
from ggufchat.machine import available_cpus
from ggufchat.server.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
_NO_ENGINE = EngineStats()


@dataclass
class ServerConfig:
    model_id: str
    n_parallel: int = 4
    api_keys: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    max_queue: int = 64  # requests waiting beyond the -np running ones
    timeout: float | None = None  # seconds a request may take, None = no limit
    idle_unload: float | None = None  # seconds without requests before the model is freed
    max_body_bytes: int = 4 << 20
    max_messages: int = 2048  # chat messages in one request
    reasoning_format: str = "deepseek"  # deepseek: <think> text goes to reasoning_content; none: stays in content
    # Seconds the engine may hold work without finishing a decode step before /health/live fails (a
    # wedged engine: restarting the process is the only cure). Generous: one step of a big prompt chunk
    # on a slow CPU takes seconds, and a liveness failure kills every stream of the replica.
    wedge_timeout: float = 120.0


class Lease:
    """A request's hold on the engine; release() exactly once (extra calls are harmless).

    It holds two things: a place in the admission count (running + queued sequences, what 429 is
    decided on) and the engine itself (no unload under it). A cancelled request gives its place back
    at once (release_admission), though the engine ends its sequences only at its next step: a burst
    of clients that give up must not make the next one wait for a 429 (seen after 200 aborted
    connections, while a long prefill held the engine)."""

    def __init__(self, holder: ModelHolder, engine: Engine, n_seq: int) -> None:
        self.holder = holder
        self.engine = engine
        self.n_seq = n_seq
        self.t_start = time.perf_counter()
        self._admitted = True
        self._released = False

    def release_admission(self) -> None:
        if self._admitted:
            self._admitted = False
            self.holder.in_flight -= self.n_seq

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.release_admission()
            self.holder._release(self)


class ModelHolder:
    """Owns the engine (when built from a factory) and decides when it is loaded."""

    def __init__(self, config: ServerConfig, metrics: Metrics, *, engine: Engine | None = None,
                 factory: Callable[[], Engine] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        if engine is None and factory is None:
            raise ValueError("give an engine or a factory")
        self.config = config
        self.metrics = metrics
        self.engine = engine
        self.factory = factory
        self.on_fatal = on_fatal
        self.state = "ready" if engine is not None else "unloaded"
        self.error: BaseException | None = None
        self.in_flight = 0  # sequences admitted and not finished
        self.users = 0  # leases held: the engine may not be unloaded under them
        self.last_used = time.monotonic()
        self.created = int(time.time())
        self._durations: collections.deque[float] = collections.deque(maxlen=64)
        self._lock = asyncio.Lock()
        self._idle_task: asyncio.Task | None = None
        self._load_task: asyncio.Task | None = None
        self.draining_since: float | None = None  # monotonic time of the SIGTERM, None while serving
        self._progress = (-1, time.monotonic())  # (engine steps last seen, when they last moved)
        # Preparing a request (template, tokenizing, a grammar) runs here, never on the event loop.
        # As many threads as the default executor: tokenizing releases the GIL, and one big request
        # must not make the small ones behind it wait.
        self._pool = ThreadPoolExecutor(max_workers=min(32, available_cpus() + 4),
                                        thread_name_prefix="ggufchat-prepare")
        metrics.model_loaded.set(1 if engine is not None else 0)
        metrics.slots.set(config.n_parallel)
        metrics.watch(self.stats)
        metrics.admitted.set_function(lambda: self.in_flight)

    def stats(self) -> EngineStats:
        """The engine's counters, all zero while no model is loaded."""
        engine = self.engine  # read once: an unload may set it to None meanwhile
        return engine.stats() if engine is not None else _NO_ENGINE

    # Lifespan.
    async def start(self) -> None:
        if self.engine is None:
            self.state = "loading"
            self._load_task = asyncio.create_task(self._initial_load())
        if self.config.idle_unload and self.factory is not None:
            self._idle_task = asyncio.create_task(self._idle_loop())

    async def _initial_load(self) -> None:
        try:
            await self.acquire_engine()
        except Exception as exc:
            self.error = exc
            self.state = "failed"
            if self.on_fatal is not None:
                self.on_fatal(exc)

    async def off_loop(self, fn: Callable[[], T]) -> T:
        """Run fn on a preparation thread and wait for it without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def stop(self) -> None:
        # Wait for preparations still running: they use the model, which is freed below.
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        for task in (self._idle_task, self._load_task):
            if task is not None:
                task.cancel()
        if self.factory is not None and self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.close)

    # Draining, readiness, liveness.
    def begin_drain(self) -> None:
        """SIGTERM: stop taking new requests (503 + Retry-After, so a balancer or an OpenAI client tries
        another replica) while the ones admitted finish; the server exits once drained()."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()
            self.metrics.draining.set(1)
            log.info("draining: %d request(s) in flight; new requests get 503", self.users)

    def drained(self, timeout: float) -> bool:
        """Draining and nothing left to wait for (no lease held), or `timeout` seconds spent waiting."""
        since = self.draining_since
        return since is not None and (self.users == 0 or time.monotonic() - since >= timeout)

    def not_ready(self) -> str | None:
        """Why a balancer should send no new request here (None: ready). Idle-unloaded counts as ready:
        the next request reloads the model."""
        self.check_engine()
        if self.draining_since is not None:
            return "draining"
        if self.state in ("ready", "unloaded"):
            return None
        return self.state  # loading, failed

    def not_live(self) -> str | None:
        """Why the process should be restarted (None: live): the engine thread died, or it holds work
        and has not finished a decode step for config.wedge_timeout seconds. Loading and draining are
        live. Progress is sampled when asked (each probe), so a wedge is seen within the timeout plus
        one probe period."""
        self.check_engine()
        if self.state == "failed":
            return f"the engine stopped: {self.error}"
        stats = self.stats()
        now = time.monotonic()
        steps, since = self._progress
        if stats.steps != steps or not (stats.active_sequences or stats.queue_depth):
            self._progress = (stats.steps, now)
            return None
        if now - since >= self.config.wedge_timeout:
            return (f"the engine holds {stats.active_sequences + stats.queue_depth} sequence(s) and has not "
                    f"decoded a step for {now - since:.0f} s")
        return None

    # Requests.
    def admit(self, n_seq: int) -> None:
        """Refuse with 503 while draining, with 429 when the running sequences and the queue are full."""
        if self.draining_since is not None:
            # Retry-After 1: the balancer (or the client) should go elsewhere now, not wait for this one.
            raise HTTPException(503, "the server is shutting down; retry (another replica takes it)",
                                headers={"Retry-After": "1"})
        capacity = self.config.n_parallel + self.config.max_queue
        if self.in_flight + n_seq > capacity:
            self.metrics.rejected.inc()
            raise QueueFull(f"the server is busy: {self.in_flight} sequences running or queued (at most "
                            f"{capacity})", retry_after=self._retry_after())

    def _retry_after(self) -> int:
        typical = statistics.median(self._durations) if self._durations else 1.0
        waiting = max(0, self.in_flight - self.config.n_parallel)
        return max(1, min(60, math.ceil(typical * (waiting / self.config.n_parallel + 1))))

    async def lease(self, n_seq: int = 1) -> Lease:
        self.admit(n_seq)
        self.in_flight += n_seq
        self.users += 1
        self.last_used = time.monotonic()
        try:
            engine = await self.acquire_engine()
        except BaseException:
            self.in_flight -= n_seq
            self.users -= 1
            raise
        return Lease(self, engine, n_seq)

    def _release(self, lease: Lease) -> None:
        self.users -= 1
        self.last_used = time.monotonic()
        self._durations.append(time.perf_counter() - lease.t_start)

    def check_engine(self) -> None:
        """Notice an engine whose decode loop died: the server is then unhealthy (GET /health 503) and
        every request gets 503, rather than being accepted and never answered."""
        engine = self.engine
        if engine is not None and self.state != "failed" and engine.failure is not None:
            self.state = "failed"
            self.error = engine.failure
            self.metrics.model_loaded.set(0)
            log.error("the engine stopped; the server now answers 503 until it is restarted: %s", engine.failure)

    async def acquire_engine(self) -> Engine:
        engine = self.engine
        self.check_engine()
        if self.state == "failed" and engine is not None:
            raise EngineStopped(f"{self.error}; restart the server",
                                hint="The engine thread failed; see the server log.")
        if engine is not None and self.state == "ready":
            return engine
        async with self._lock:
            if self.engine is None:
                if self.factory is None:
                    raise EngineStopped("the model is not loaded")
                self.state = "loading"
                t0 = time.perf_counter()
                try:
                    self.engine = await asyncio.to_thread(self.factory)
                except BaseException:
                    self.state = "unloaded"
                    raise
                self.metrics.model_loads.inc()
                self.metrics.model_loaded.set(1)
                log.info("model loaded in %.1f s (%s)", time.perf_counter() - t0, self.engine.offload_summary())
            self.state = "ready"
            self.error = None
            return self.engine

    # Idle unload.
    async def _idle_loop(self) -> None:
        idle = self.config.idle_unload
        while True:
            await asyncio.sleep(min(idle / 4, 1.0))
            if self.engine is not None and self.users == 0 and time.monotonic() - self.last_used >= idle:
                await self._unload()

    async def _unload(self) -> None:
        async with self._lock:
            if self.engine is None or self.users:
                return
            engine, self.engine = self.engine, None
            self.state = "unloaded"
            self.metrics.model_loaded.set(0)
            await asyncio.to_thread(engine.close)
            log.info("model unloaded after %.0f s idle", self.config.idle_unload)
