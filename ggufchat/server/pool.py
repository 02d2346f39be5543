"""The models a server holds: which one a request's `model` names, and which idle one makes room.

One model on the command line: one holder, and every `model` value reaches it (today's OpenAI-style
behaviour, kept). Several models (none named, several named, --models-dir, --models-config): a holder
per catalog entry, loaded on first use, unloaded least-recently-used when the next one would not fit
`--max-loaded` or the memory budget, and never while a request holds it (its lease). A model that
cannot get room waits for one to become free, up to the request timeout.

The catalog is re-read when a request names a model it does not know (at most once a second), so a
model downloaded while the server runs (`ggufchat download`, /api/pull) is served without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ggufchat.engine import Engine
from ggufchat.engine.describe import ModelFacts
from ggufchat.errors import ModelNotFound, NoRoom
from ggufchat.machine import available_cpus
from ggufchat.server.lifecycle import ModelHolder, ServerConfig
from ggufchat.server.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
RESCAN_SECONDS = 1.0  # the catalog is re-read at most this often for an unknown name
ROOM_WAIT = 600.0  # the longest a load waits for a busy model to free room when the server has no --timeout
_LATEST = ":latest"  # Ollama clients add the tag to untagged names


@dataclass
class ModelEntry:
    """A model the server can load: its name (what requests give), how to load it, and its settings."""

    name: str
    path: Path
    factory: Callable[[], Engine] = field(compare=False)
    n_parallel: int
    aliases: tuple[str, ...] = ()
    keep_alive: float | None = None  # seconds loaded after the last request; None = the server's --idle-unload
    # Estimated bytes once loaded (blocking: reads the GGUF header).
    memory: Callable[[], int] | None = field(default=None, compare=False)
    # Its facts without loading it (engine/describe.py), given the fill-in-the-middle check (blocking).
    describe: Callable[[Callable], ModelFacts] | None = field(default=None, compare=False)


@dataclass
class Catalog:
    """Several models: `discover` lists them (blocking; called off the event loop), the budget bounds
    how many are loaded at once. `default`: the model of requests without a `model`, loaded at start."""

    discover: Callable[[], list[ModelEntry]]
    default: str
    max_loaded: int = 0  # 0 = as many as the memory budget allows
    memory_budget: int = 0  # bytes; 0 = no memory limit


@dataclass(frozen=True)
class Target:
    """The model a request reaches: its name (what responses report) and the holder that serves it."""

    name: str
    holder: ModelHolder


class ModelPool:
    def __init__(self, config: ServerConfig, metrics: Metrics, *, engine: Engine | None = None,
                 factory: Callable[[], Engine] | None = None, catalog: Catalog | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.catalog = catalog
        self.on_fatal = on_fatal
        self.holders: dict[str, ModelHolder] = {}
        self._names: dict[str, str] = {}  # name or alias -> holder name
        self.entries: dict[str, ModelEntry] = {}
        self.draining_since: float | None = None  # monotonic time of the SIGTERM, None while serving
        self.loading = asyncio.Lock()  # one load at a time: each decides on room with the others settled
        self._freed = asyncio.Event()
        self._scanned = 0.0
        self._tasks: list[asyncio.Task] = []
        # Preparing a request (template, tokenizing, a grammar) runs here, never on the event loop.
        # As many threads as the default executor: tokenizing releases the GIL, and one big request
        # must not make the small ones behind it wait.
        self._pool = ThreadPoolExecutor(max_workers=min(32, available_cpus() + 4),
                                        thread_name_prefix="ggufchat-prepare")
        if catalog is None:
            self.default = self._add(config.model_id, engine=engine, factory=factory, n_parallel=config.n_parallel,
                                     keep_alive=config.idle_unload, on_fatal=on_fatal)
        else:
            self.default = None  # set by start(), once the catalog is read

    @property
    def several(self) -> bool:
        return self.catalog is not None

    def _add(self, name: str, *, on_fatal=None, **kwargs) -> ModelHolder:
        holder = ModelHolder(name, self, self.metrics.model(name), on_fatal=on_fatal, **kwargs)
        self.holders[name] = holder
        self._names[name] = name
        return holder

    # Lifespan.
    async def start(self) -> None:
        if self.catalog is not None:
            await self.refresh(force=True)
            name = self._names.get(self.catalog.default)
            if name is None:
                raise ModelNotFound(f"the default model {self.catalog.default!r} is not among the models found")
            self.default = self.holders[name]
            self.default.on_fatal = self.on_fatal
        if self.default.engine is None:
            self._tasks.append(asyncio.create_task(self.default.preload()))
        self._tasks.append(asyncio.create_task(self._idle_loop()))

    async def stop(self) -> None:
        # Wait for preparations still running: they use the models, which are freed below.
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        for task in self._tasks:
            task.cancel()
        for holder in self.holders.values():
            await holder.close()

    async def off_loop(self, fn: Callable[[], T]) -> T:
        """Run fn on a preparation thread and wait for it without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    # The catalog.
    async def refresh(self, *, force: bool = False) -> None:
        """Re-read the catalog (several models only): new models get a holder; a model gone from it stays
        while loaded (its files are mapped) and is dropped once unloaded."""
        if self.catalog is None or (not force and time.monotonic() - self._scanned < RESCAN_SECONDS):
            return
        self._scanned = time.monotonic()
        found = await self.off_loop(self.catalog.discover)
        entries = {e.name: e for e in found}
        for entry in found:
            holder = self.holders.get(entry.name)
            if holder is None or (holder.engine is None and self.entries.get(entry.name) != entry):
                if holder is not None and holder.users:
                    continue  # a load is under way with the old entry; the next scan replaces it
                self._add(entry.name, factory=entry.factory, n_parallel=entry.n_parallel,
                                   keep_alive=entry.keep_alive if entry.keep_alive is not None
                                   else self.config.idle_unload, memory=entry.memory)
        for name, holder in list(self.holders.items()):
            if name not in entries and holder.engine is None and not holder.users and holder is not self.default:
                del self.holders[name]
        self.entries = entries
        self._names = {}
        for entry in found:  # aliases first, so a model's own name wins over another's alias
            for alias in entry.aliases:
                self._names.setdefault(alias, entry.name)
        self._names.update({name: name for name in self.holders})

    def invalidate(self) -> None:
        """The cache changed here (a pull, a delete): the next lookup reads the catalog again at once."""
        self._scanned = 0.0

    def lookup(self, name: str) -> ModelHolder | None:
        for candidate in (name, name.removesuffix(_LATEST)):
            if candidate in self._names and self._names[candidate] in self.holders:
                return self.holders[self._names[candidate]]
        return None

    async def resolve(self, name: str | None) -> Target:
        """The one place a request's `model` is turned into a model. One model: it, whatever the name.
        Several: the one named (the default when no name is given); unknown -> 404 model_not_found."""
        if self.catalog is None or not name:
            return Target(self.default.name, self.default)
        holder = self.lookup(name)
        if holder is None:
            await self.refresh()
            holder = self.lookup(name)
        if holder is None:
            raise ModelNotFound(f"model {name!r} is not served here; GET /v1/models or /api/tags lists the models "
                                "this server has (`ggufchat list` the cached ones, `ggufchat download` adds one)")
        return Target(holder.name, holder)

    async def models(self) -> list[ModelHolder]:
        """Every model a listing shows: the default first, then by name (several models: after a fresh
        read of the catalog)."""
        await self.refresh()
        rest = sorted((h for h in self.holders.values() if h is not self.default), key=lambda h: h.name)
        return [self.default, *rest]

    def loaded(self) -> list[ModelHolder]:
        return [h for h in self.holders.values() if h.engine is not None]

    # Room.
    def _over(self, holder: ModelHolder, others: list[ModelHolder]) -> str | None:
        """Why loading `holder` beside `others` would break the budget (None: it fits)."""
        catalog = self.catalog
        if catalog is None or not others:
            return None  # alone, a model loads whatever its size: the budget is for sharing
        if catalog.max_loaded and len(others) + 1 > catalog.max_loaded:
            return f"--max-loaded {catalog.max_loaded}"
        if catalog.memory_budget and sum(h.memory for h in others) + holder.memory > catalog.memory_budget:
            return f"the memory budget ({catalog.memory_budget / (1 << 30):.1f} GiB)"
        return None

    async def make_room(self, holder: ModelHolder) -> None:
        """Unload idle models, least recently used first, until `holder` fits; while every loaded model
        is answering requests, wait for one to finish (NoRoom after the request timeout)."""
        deadline = time.monotonic() + (self.config.timeout or ROOM_WAIT)
        while True:
            others = [h for h in self.loaded() if h is not holder]
            why = self._over(holder, others)
            if why is None:
                return
            idle = sorted((h for h in others if not h.users and h.unloadable), key=lambda h: h.last_used)
            if idle:
                log.info("unloading %s to make room for %s (%s)", idle[0].name, holder.name, why)
                await idle[0].unload("evicted")
                continue
            left = deadline - time.monotonic()
            busy = ", ".join(sorted(h.name for h in others))
            if left <= 0:
                raise NoRoom(f"cannot load {holder.name} now: {why} is full with models answering requests "
                             f"({busy})", retry_after=max(1, math.ceil(min(60.0, self.config.timeout or 5.0))))
            log.info("%s waits for room: %s is full with models answering requests (%s)", holder.name, why, busy)
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), timeout=left)
            except TimeoutError:
                pass

    def released(self) -> None:
        """A lease ended: a load waiting for room looks again."""
        self._freed.set()

    def unload_soon(self, holder: ModelHolder) -> None:
        """keep_alive 0: unload as soon as the request that asked for it is done."""
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.get_running_loop().create_task(holder.unload("idle")))

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for holder in list(self.holders.values()):
                if holder.expired(now):
                    await holder.unload("idle")

    # Draining, readiness, liveness.
    @property
    def users(self) -> int:
        return sum(h.users for h in self.holders.values())

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
        """Why a balancer should send no new request here (None: ready): draining, or the default model
        loading or failed. Idle-unloaded models count as ready: the next request loads them."""
        holder = self.default
        holder.check_engine()
        if self.draining_since is not None:
            return "draining"
        if holder.state in ("ready", "unloaded"):
            return None
        return holder.state  # loading, failed

    def not_live(self) -> str | None:
        """Why the process should be restarted (None: live): a model's engine thread died, or one holds
        work and has not decoded a step for --wedge-timeout seconds."""
        for holder in list(self.holders.values()):
            why = holder.not_live()
            if why is not None:
                return why
        return None
