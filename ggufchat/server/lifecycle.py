"""A model's life inside the server: load on demand, admit requests, unload when idle or for room.

Each model the server can serve has a ModelHolder; the pool (pool.py) keeps them, decides which
holder a request's `model` names and which idle model makes room for another. Every request holds a
lease on its model's engine while it runs, so neither the idle timer nor an eviction can free a
model that someone is using; a request that arrives after an unload waits for the reload.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException

from ggufchat.engine import Engine, EngineStats
from ggufchat.errors import EngineStopped, QueueFull
from ggufchat.server.metrics import ModelMetrics

if TYPE_CHECKING:
    from ggufchat.server.pool import ModelPool

log = logging.getLogger(__name__)

_NO_ENGINE = EngineStats()


@dataclass
class ServerConfig:
    model_id: str  # the model served (one model), or the default one (several): requests without `model`
    n_parallel: int = 4  # -np of every model the config file does not set it for
    api_keys: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    max_queue: int = 64  # requests waiting beyond the -np running ones
    timeout: float | None = None  # seconds a request may take, None = no limit
    idle_unload: float | None = None  # seconds without requests before a model is freed (keep_alive default)
    max_body_bytes: int = 4 << 20
    max_messages: int = 2048  # chat messages in one request
    reasoning_format: str = "deepseek"  # deepseek: <think> text goes to reasoning_content; none: stays in content
    # Seconds the engine may hold work without finishing a decode step before /health/live fails (a
    # wedged engine: restarting the process is the only cure). Generous: one step of a big prompt chunk
    # on a slow CPU takes seconds, and a liveness failure kills every stream of the replica.
    wedge_timeout: float = 120.0


class Lease:
    """A request's hold on a model's engine; release() exactly once (extra calls are harmless).

    It holds two things: a place in the admission count (running + queued sequences, what 429 is
    decided on) and the engine itself (no unload under it). A cancelled request gives its place back
    at once (release_admission), though the engine ends its sequences only at its next step: a burst
    of clients that give up must not make the next one wait for a 429 (seen after 200 aborted
    connections, while a long prefill held the engine).

    `keep_alive`: how long the model stays loaded after this request (Ollama's semantics: seconds,
    0 = unload when it ends, negative = keep; None = the model's default). `load_seconds`: how long the
    request waited for its model to load (0 when it was loaded)."""

    def __init__(self, holder: ModelHolder, engine: Engine, n_seq: int, keep_alive: float | None,
                 load_seconds: float) -> None:
        self.holder = holder
        self.engine = engine
        self.n_seq = n_seq
        self.keep_alive = keep_alive
        self.load_seconds = load_seconds
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
    """One model: owns its engine (when built from a factory) and decides when it is loaded.

    `keep_alive`: the default seconds the model stays loaded after its last request (None: until
    evicted for room or the server stops). A holder given a ready engine never unloads it."""

    def __init__(self, name: str, pool: ModelPool, metrics: ModelMetrics, *, n_parallel: int,
                 engine: Engine | None = None, factory: Callable[[], Engine] | None = None,
                 keep_alive: float | None = None, memory: Callable[[], int] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        if engine is None and factory is None:
            raise ValueError("give an engine or a factory")
        self.name = name
        self.pool = pool
        self.config: ServerConfig = pool.config
        self.metrics = metrics
        self.n_parallel = n_parallel
        self.engine = engine
        self.factory = factory
        self.keep_alive = keep_alive
        self._estimate = memory
        self.memory = 0  # estimated bytes while loaded (what the pool's budget counts)
        self.on_fatal = on_fatal
        self.state = "ready" if engine is not None else "unloaded"
        self.error: BaseException | None = None
        self.in_flight = 0  # sequences admitted and not finished
        self.users = 0  # leases held (and loads under way): the engine may not be unloaded under them
        self.last_used = time.monotonic()
        self.expires: float | None = None  # monotonic time the idle model unloads; None = never
        self.created = int(time.time())
        self._durations: collections.deque[float] = collections.deque(maxlen=64)
        self._lock = asyncio.Lock()
        self._progress = (-1, time.monotonic())  # (engine steps last seen, when they last moved)
        metrics.model_loaded.set(1 if engine is not None else 0)
        metrics.slots.set(n_parallel)
        metrics.watch(self.stats)
        metrics.admitted.set_function(lambda: self.in_flight)

    @property
    def unloadable(self) -> bool:
        return self.factory is not None

    def stats(self) -> EngineStats:
        """The engine's counters, all zero while no model is loaded."""
        engine = self.engine  # read once: an unload may set it to None meanwhile
        return engine.stats() if engine is not None else _NO_ENGINE

    async def off_loop(self, fn):
        """Run fn on the pool's preparation threads, never on the event loop."""
        return await self.pool.off_loop(fn)

    # Lifespan.
    async def preload(self) -> None:
        """Load at startup (in the background: /health says loading meanwhile). A failure is fatal when
        on_fatal is set (the model the server was started for), else it is reported by /health and the
        next request tries again."""
        self.state = "loading"
        self.users += 1  # not evictable while it loads
        try:
            await self.acquire_engine()
        except Exception as exc:
            self.error = exc
            self.state = "failed" if self.on_fatal is not None else "unloaded"
            log.error("model %s failed to load: %s", self.name, exc)
            if self.on_fatal is not None:
                self.on_fatal(exc)
        finally:
            self.users -= 1
            self.last_used = time.monotonic()
            self._set_expiry(None)

    async def close(self) -> None:
        if self.factory is not None and self.engine is not None:
            engine, self.engine = self.engine, None
            await asyncio.to_thread(engine.close)

    # Readiness, liveness.
    def not_live(self) -> str | None:
        """Why the process should be restarted (None: live): the engine thread died, or it holds work
        and has not finished a decode step for config.wedge_timeout seconds. Loading and draining are
        live. Progress is sampled when asked (each probe), so a wedge is seen within the timeout plus
        one probe period."""
        self.check_engine()
        if self.state == "failed" and self.engine is not None:
            return f"the engine of {self.name} stopped: {self.error}"
        if self.state == "failed" and self.on_fatal is not None:
            return f"{self.name} failed to load: {self.error}"
        stats = self.stats()
        now = time.monotonic()
        steps, since = self._progress
        if stats.steps != steps or not (stats.active_sequences or stats.queue_depth):
            self._progress = (stats.steps, now)
            return None
        if now - since >= self.config.wedge_timeout:
            return (f"the engine of {self.name} holds {stats.active_sequences + stats.queue_depth} sequence(s) "
                    f"and has not decoded a step for {now - since:.0f} s")
        return None

    # Requests.
    def admit(self, n_seq: int) -> None:
        """Refuse with 503 while draining, with 429 when the running sequences and the queue are full."""
        if self.pool.draining_since is not None:
            # Retry-After 1: the balancer (or the client) should go elsewhere now, not wait for this one.
            raise HTTPException(503, "the server is shutting down; retry (another replica takes it)",
                                headers={"Retry-After": "1"})
        capacity = self.n_parallel + self.config.max_queue
        if self.in_flight + n_seq > capacity:
            self.metrics.rejected.inc()
            raise QueueFull(f"the server is busy: {self.in_flight} sequences of {self.name} running or queued "
                            f"(at most {capacity})", retry_after=self._retry_after())

    def _retry_after(self) -> int:
        typical = statistics.median(self._durations) if self._durations else 1.0
        waiting = max(0, self.in_flight - self.n_parallel)
        return max(1, min(60, math.ceil(typical * (waiting / self.n_parallel + 1))))

    async def lease(self, n_seq: int = 1, *, keep_alive: float | None = None) -> Lease:
        self.admit(n_seq)
        self.in_flight += n_seq
        self.users += 1
        self.last_used = time.monotonic()
        t0 = time.perf_counter()
        try:
            engine = await self.acquire_engine()
        except BaseException:
            self.in_flight -= n_seq
            self.users -= 1
            self.pool.released()
            raise
        waited = time.perf_counter() - t0
        return Lease(self, engine, n_seq, keep_alive, waited if waited > 0.001 else 0.0)

    def _release(self, lease: Lease) -> None:
        self.users -= 1
        self.last_used = time.monotonic()
        self._durations.append(time.perf_counter() - lease.t_start)
        self._set_expiry(lease.keep_alive)
        self.pool.released()

    def _set_expiry(self, keep_alive: float | None) -> None:
        """When the idle model unloads, counted from now: the request's keep_alive, else the model's."""
        seconds = self.keep_alive if keep_alive is None else keep_alive
        if not self.unloadable or seconds is None or seconds < 0:
            self.expires = None
        else:
            self.expires = time.monotonic() + seconds
            if seconds == 0 and self.users == 0:
                self.pool.unload_soon(self)

    def expired(self, now: float) -> bool:
        return (self.engine is not None and self.users == 0 and self.state == "ready"
                and self.expires is not None and now >= self.expires)

    def check_engine(self) -> None:
        """Notice an engine whose decode loop died: the model is then unhealthy (GET /health 503) and
        every request for it gets 503, rather than being accepted and never answered."""
        engine = self.engine
        if engine is not None and self.state != "failed" and engine.failure is not None:
            self.state = "failed"
            self.error = engine.failure
            self.metrics.model_loaded.set(0)
            log.error("the engine of %s stopped; its requests get 503 until the server is restarted: %s",
                      self.name, engine.failure)

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
                await self._load()
            self.state = "ready"
            self.error = None
            return self.engine

    async def _load(self) -> None:
        """Load under the pool's load lock, after it made room (which may wait for a busy model)."""
        async with self.pool.loading:
            if self._estimate is not None and not self.memory:
                self.memory = await self.off_loop(self._estimate)
            await self.pool.make_room(self)
            self.state = "loading"
            t0 = time.perf_counter()
            try:
                self.engine = await asyncio.to_thread(self.factory)
            except BaseException:
                self.state = "unloaded"
                raise
        self.metrics.model_loads.inc()
        self.metrics.model_loaded.set(1)
        self.metrics.model_memory.set(self.memory)
        log.info("model %s loaded in %.1f s (%s)", self.name, time.perf_counter() - t0,
                 self.engine.offload_summary())

    async def unload(self, why: str) -> bool:
        """Free the engine unless a request holds it (then False). why: idle or evicted."""
        async with self._lock:
            if self.engine is None or self.users or not self.unloadable:
                return False
            engine, self.engine = self.engine, None
            self.state = "unloaded"
            self.expires = None
            self.metrics.model_loaded.set(0)
            self.metrics.model_memory.set(0)
            self.metrics.unloads.labels(why).inc()
            await asyncio.to_thread(engine.close)
            log.info("model %s unloaded (%s)", self.name, why)
            return True
