"""`ggufchat serve`: the OpenAI API, the seeds' simple APIs, health and metrics over HTTP."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from ggufchat.cli import options as o
from ggufchat.engine.grammar import GrammarLimits
from ggufchat.errors import InvalidParameter

_SERVER = "Server"
_MODELS = "Several models"


def _env(name: str) -> dict:
    return {"envvar": f"GGUFCHAT_{name}", "show_envvar": True, "rich_help_panel": _SERVER}


def _models_env(name: str) -> dict:
    return {"envvar": f"GGUFCHAT_{name}", "show_envvar": True}


@o.engine_options(omit=("model_arg",))
def serve(
    *,  # engine_flags, filled in by engine_options, has no default
    models: Annotated[list[str] | None, typer.Argument(
        metavar="MODEL", show_default=False,
        help="Models: .gguf paths, cached models or aliases. One: it answers every request, whatever "
             "`model` they name. None or several: each request's `model` picks one, loaded on first use "
             "(none: every cached model and the embedded SmolLM2-135M).")] = None,
    models_dir: Annotated[Path | None, typer.Option("--models-dir", help="Also serve every .gguf in DIR, by "
                                                    "file name.", **_models_env("MODELS_DIR"), rich_help_panel=_MODELS)]
    = None,
    models_config: Annotated[Path | None, typer.Option("--models-config", help="Per-model settings (context, "
                                                       "-np, -ngl, template, speculation, aliases, keep_alive): "
                                                       "a TOML file, see docs/models.md.",
                                                       **_models_env("MODELS_CONFIG"), rich_help_panel=_MODELS)] = None,
    max_loaded: Annotated[int, typer.Option("--max-loaded", help="Models loaded at once; the least recently "
                                            "used idle one is unloaded for the next (0 = as the memory budget "
                                            "allows).", **_models_env("MAX_LOADED"), rich_help_panel=_MODELS)] = 0,
    memory_budget: Annotated[str, typer.Option("--memory-budget", help="Memory the loaded models may take "
                                               "together, e.g. 12GiB (auto = the RAM, and GPU memory with "
                                               "-ngl, free at start less 1 GiB each; 0 = no limit).",
                                               **_models_env("MEMORY_BUDGET"), rich_help_panel=_MODELS)] = "auto",
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0 exposes the server to "
                                      "your network: set an API key).", **_env("HOST"))] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0 = any free port).", **_env("PORT"))] = 6006,
    parallel: Annotated[int, typer.Option("-np", "--parallel", help="Sequences decoded together (continuous "
                                          "batching); more requests wait in the queue.",
                                          **_env("PARALLEL"))] = 4,
    api_key: Annotated[str | None, typer.Option("--api-key", help="Require `Authorization: Bearer KEY` on every "
                                                   "route but /health.", **_env("API_KEY"))] = None,
    api_key_file: Annotated[Path | None, typer.Option("--api-key-file", help="Read API keys from FILE, one per "
                                                         "line.", **_env("API_KEY_FILE"))] = None,
    cors_origin: Annotated[list[str] | None, typer.Option("--cors-origin", help="Allow browser requests from "
                                                             "this origin (repeatable; env: space-separated).",
                                                             **_env("CORS_ORIGINS"))] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests that may wait for a free sequence; "
                                           "beyond that the server answers 429.", **_env("MAX_QUEUE"))] = 64,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds a request may take (0 = no limit).",
                                           **_env("TIMEOUT"))] = 600,
    idle_unload: Annotated[float, typer.Option("--idle-unload", help="Free a model after this many seconds "
                                               "without requests; the next request reloads it (0 = never). "
                                               "A request's keep_alive (Ollama API) overrides it.",
                                               **_env("IDLE_UNLOAD"))] = 0,
    max_body: Annotated[int, typer.Option("--max-body", help="Largest request body in bytes.",
                                          **_env("MAX_BODY"))] = 4 << 20,
    max_messages: Annotated[int, typer.Option("--max-messages", help="Chat messages in one request.",
                                              **_env("MAX_MESSAGES"))] = 2048,
    reasoning_format: Annotated[Literal["deepseek", "none"], typer.Option(
        "--reasoning-format", help="deepseek: a reasoning model's <think> text goes to reasoning_content, "
        "apart from the answer; none: it stays in content, tags and all.", **_env("REASONING_FORMAT"))] = "deepseek",
    max_grammar_bytes: Annotated[int, typer.Option("--max-grammar-bytes", help="Largest grammar a "
                                                   "response_format may compile to, in bytes of GBNF.",
                                                   **_env("MAX_GRAMMAR_BYTES"))] = GrammarLimits.max_bytes,
    max_grammar_alternatives: Annotated[int, typer.Option("--max-grammar-alternatives", help="Alternatives "
                                                          "(enum values, anyOf branches) in such a grammar: "
                                                          "each one slows every decode step while it is used.",
                                                          **_env("MAX_GRAMMAR_ALTERNATIVES"))]
    = GrammarLimits.max_alternatives,
    max_schema_bytes: Annotated[int, typer.Option("--max-schema-bytes", help="Largest JSON schema in a "
                                                  "response_format, serialised.",
                                                  **_env("MAX_SCHEMA_BYTES"))] = GrammarLimits.max_schema_bytes,
    header_timeout: Annotated[float, typer.Option("--header-timeout", help="Seconds a client may take to send "
                                                  "a request's headers; then it is closed (0 = no limit).",
                                                  **_env("HEADER_TIMEOUT"))] = 10,
    body_timeout: Annotated[float, typer.Option("--body-timeout", help="Seconds a client may take to send a "
                                                "request's body (0 = no limit).", **_env("BODY_TIMEOUT"))] = 60,
    keep_alive: Annotated[float, typer.Option("--keep-alive", help="Seconds an idle connection stays open "
                                              "for the next request (0 = close after each response).",
                                              **_env("KEEP_ALIVE"))] = 15,
    max_connections: Annotated[int, typer.Option("--max-connections", help="Open connections; beyond that "
                                                 "the one waiting longest for a request is closed, or with "
                                                 "none waiting the new request is answered 503 (0 = no "
                                                 "limit).",
                                                 **_env("MAX_CONNECTIONS"))] = 1000,
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", help="On SIGTERM or Ctrl-C, seconds to "
                                                 "let the requests in flight finish while new ones get 503 "
                                                 "(a second signal cuts it to 5 s; 0 = no drain).",
                                                 **_env("DRAIN_TIMEOUT"))] = 60,
    wedge_timeout: Annotated[float, typer.Option("--wedge-timeout", help="GET /health/live fails once the "
                                                 "engine has held work this many seconds without decoding "
                                                 "a step.", **_env("WEDGE_TIMEOUT"))] = 120,
    alias: Annotated[str | None, typer.Option("--alias", help="Model id reported by /v1/models (default: "
                                                 "the MODEL you named, or the file name); with several models, "
                                                 "the default model's.",
                                                 **_env("ALIAS"))] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Show llama.cpp's log.",
                                          rich_help_panel=_SERVER)] = False,
    engine_flags: o.EngineFlags,
) -> None:
    """Serve models over HTTP: OpenAI API (/v1), Ollama API (/api), POST / and /chat, /health, /metrics, /docs."""
    from ggufchat.cli.main import setup_logging

    setup_logging(verbose=verbose)
    for name in ("ggufchat.server", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.INFO)
    if parallel < 1:
        raise InvalidParameter("-np/--parallel must be at least 1", param="parallel")
    if max_queue < 0 or timeout < 0 or idle_unload < 0 or max_body < 1:
        raise InvalidParameter("--max-queue, --timeout and --idle-unload must be >= 0, --max-body positive")
    if min(max_messages, max_grammar_bytes, max_grammar_alternatives, max_schema_bytes) < 1:
        raise InvalidParameter("--max-messages, --max-grammar-bytes, --max-grammar-alternatives and "
                               "--max-schema-bytes must be at least 1")
    if max_loaded < 0:
        raise InvalidParameter("--max-loaded must be >= 0", param="max_loaded")
    budget = None if memory_budget.strip().lower() == "auto" else _parse_size(memory_budget)
    if drain_timeout < 0 or wedge_timeout <= 0:
        raise InvalidParameter("--drain-timeout must be >= 0 and --wedge-timeout positive")
    grammar = GrammarLimits(max_bytes=max_grammar_bytes, max_alternatives=max_grammar_alternatives,
                            max_schema_bytes=max_schema_bytes)
    if min(header_timeout, body_timeout, keep_alive, max_connections) < 0:
        raise InvalidParameter("--header-timeout, --body-timeout, --keep-alive and --max-connections must be >= 0")
    named = [*(models or []), *([engine_flags.model] if engine_flags.model else [])]
    from ggufchat.settings import load_settings

    single = not models_dir and not models_config and (len(named) == 1 or (not named and load_settings().model))
    from ggufchat.models.gguf import read_gguf

    catalog = load = None
    if single:
        spec = named[0] if named else None
        load = engine_flags.for_model(spec).load_options(n_seq_max=parallel)
        # A file that is not a GGUF fails here, before the port is taken.
        read_gguf(load.model_path)
        model_id = alias or _model_id(spec, load.model_path)
    else:
        catalog = _catalog(engine_flags, named, models_dir, models_config, parallel, max_loaded, budget, grammar,
                           alias)
        model_id = catalog.default

    from ggufchat.server.lifecycle import ServerConfig

    config = ServerConfig(
        model_id=model_id,
        n_parallel=parallel,
        api_keys=_api_keys(api_key, api_key_file),
        cors_origins=[origin for value in cors_origin or [] for origin in value.split()],
        max_queue=max_queue,
        timeout=timeout or None,
        idle_unload=idle_unload or None,
        max_body_bytes=max_body,
        max_messages=max_messages,
        reasoning_format=reasoning_format,
        wedge_timeout=wedge_timeout,
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not config.api_keys:
        print(f"ggufchat: warning: listening on {host} without an API key: anyone who can reach this port "
              "can use the model", file=sys.stderr)
    from ggufchat.server.connections import HttpLimits

    limits = HttpLimits(header_timeout=header_timeout or None, body_timeout=body_timeout or None,
                        keep_alive=keep_alive, max_connections=max_connections or None)
    _run(config, load, catalog, limits, grammar, host, port, engine_flags.engine_kwargs(), drain_timeout)


def _parse_size(text: str) -> int:
    from ggufchat.cli.serve_models import parse_size

    return parse_size(text)


def _catalog(flags, named: list[str], models_dir: Path | None, models_config: Path | None, parallel: int,
             max_loaded: int, budget: int | None, grammar, alias: str | None):
    from ggufchat.cli.serve_models import (
        CatalogSources,
        ModelsConfig,
        build_catalog,
        default_memory_budget,
        read_models_config,
    )

    if models_dir is not None and not models_dir.is_dir():
        raise InvalidParameter(f"--models-dir {models_dir} is not a directory", param="models_dir")
    config = read_models_config(models_config) if models_config is not None else ModelsConfig()
    if budget is None:
        budget = default_memory_budget(offload=flags.values.get("n_gpu_layers") not in ("0", 0))
    return build_catalog(CatalogSources(flags, parallel, grammar, named=named, models_dir=models_dir, config=config,
                                        max_loaded=max_loaded, memory_budget=budget, alias=alias))


def _speculation(load) -> str:
    if load.spec == "draft":
        return f"; drafts from {Path(load.model_draft).name}"
    return "; n-gram drafts" if load.spec == "ngram" else ""


def _model_id(spec: str | None, path: Path) -> str:
    from ggufchat.models.embedded import NAME

    if spec is None or Path(spec).expanduser().is_file():
        return NAME if spec is None else path.stem
    return spec


def _api_keys(api_key: str | None, api_key_file: Path | None) -> list[str]:
    keys = [api_key] if api_key else []
    if api_key_file is not None:
        try:
            text = api_key_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidParameter(f"cannot read the API key file {api_key_file}: {exc.strerror}") from exc
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if not keys:
            raise InvalidParameter(f"the API key file {api_key_file} holds no key")
    return keys


def _bind(host: str, port: int) -> socket.socket:
    # Bound here rather than by uvicorn, so a taken port is one `Error:` line and the exit status 1.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise InvalidParameter(f"cannot listen on {host}:{port}: {exc.strerror}",
                               hint="Pick another --port, or stop what is using this one.") from exc


def _run(config, load, catalog, limits, grammar, host: str, port: int, engine_kwargs: dict,
         drain_timeout: float) -> None:
    import uvicorn

    from ggufchat.engine import Engine
    from ggufchat.server.app import create_app
    from ggufchat.server.connections import raise_open_file_limit, uvicorn_config

    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    fatal: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        if server is not None:
            server.should_exit = True

    def factory() -> Engine:
        return Engine(load, grammar_limits=grammar, **engine_kwargs)

    url_host = f"[{host}]" if ":" in host else host
    if catalog is None:
        app = create_app(config, factory=factory, on_fatal=on_fatal)
        what = (f"{load.model_path} as {config.model_id!r}", f"-np {config.n_parallel}{_speculation(load)}")
    else:
        app = create_app(config, catalog=catalog, on_fatal=on_fatal)
        found = catalog.discover()
        budget = (f"memory budget {catalog.memory_budget / (1 << 30):.1f} GiB" if catalog.memory_budget
                  else "no memory budget")
        loaded = f", at most {catalog.max_loaded} loaded" if catalog.max_loaded else ""
        count = f"{len(found)} model{'s' if len(found) != 1 else ''}"
        what = (f"{count} (default {config.model_id!r}; GET /v1/models lists them)",
                f"{budget}{loaded}")
    print(f"ggufchat: serving {what[0]} on http://{url_host}:{bound} ({what[1]}; OpenAI API at /v1, Ollama API "
          "at /api, docs at /docs)", file=sys.stderr, flush=True)
    raise_open_file_limit(limits.max_connections)
    server = _draining_server(uvicorn_config(app, limits, graceful_shutdown=5), app.state.server.pool,
                              drain_timeout)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on Ctrl-C / SIGTERM, then re-raises the signal; for a server
        # that is the normal way to stop, not a failure.
        pass
    finally:
        sock.close()
    if fatal:
        raise fatal[0]


def _draining_server(config, pool, drain_timeout: float):
    """uvicorn's Server, with a drain before its own shutdown. uvicorn alone, on SIGTERM, closes the
    listening socket at once and gives the requests in flight `graceful_shutdown` seconds: too short for
    a long stream, and a connection refused is all a balancer or a Kubernetes Service then sees. Here the
    first signal only starts the drain: the socket stays open, /health/ready and every new request answer
    503 with Retry-After (a balancer retries elsewhere), and uvicorn's shutdown starts once no request
    holds the engine, or after drain_timeout seconds."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if drain_timeout and pool.draining_since is None and not self.should_exit:
                pool.begin_drain()
                super().handle_exit(sig, frame)  # records the signal (uvicorn re-raises it at the end)
                self.should_exit = False  # ...and on_tick sets it once drained
                return
            # A second signal: uvicorn's own shutdown now (streams get its graceful_shutdown seconds).
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if pool.drained(drain_timeout):
                self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer(config)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
