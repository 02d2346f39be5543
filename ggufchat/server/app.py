"""create_app: the FastAPI app for one model or several. The engine (or a factory that loads it, or a
catalog of models) comes in as an argument and lives on app.state; nothing is global, so tests build
as many apps as they like."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ggufchat import __version__
from ggufchat.engine import Engine
from ggufchat.server import body, errors
from ggufchat.server.lifecycle import ServerConfig
from ggufchat.server.metrics import Metrics
from ggufchat.server.middleware import ApiKeyAuth, BodyLimit, RequestMetrics
from ggufchat.server.ollama_errors import OllamaErrorShape
from ggufchat.server.ollama_models import OllamaState
from ggufchat.server.pool import Catalog, ModelPool
from ggufchat.server.protocol import BODY_MODELS
from ggufchat.server.routes import embeddings, ollama, openai, simple, system, web
from ggufchat.server.state import ServerState
from ggufchat.settings import Settings

# Reachable without the API key: load balancers probe it.
PUBLIC_PATHS = set(system.PROBE_PATHS)
# GET only: the web page and its static files (they hold no secret; the page asks for the key).
PUBLIC_GET_PATHS = web.PUBLIC_GET


def create_app(config: ServerConfig, *, engine: Engine | None = None, factory: Callable[[], Engine] | None = None,
               catalog: Catalog | None = None, on_fatal: Callable[[BaseException], None] | None = None,
               settings: Settings | None = None) -> FastAPI:
    """`engine`: serve this engine (the caller closes it). `factory`: load one in the background at
    startup, and again after an idle unload (the app closes it). `catalog`: serve several models, each
    loaded on first use (pool.py). `settings`: the model cache and hub endpoints the Ollama API's tags,
    pull and delete use (default: read from the environment when first needed)."""
    metrics = Metrics()
    pool = ModelPool(config, metrics, engine=engine, factory=factory, catalog=catalog, on_fatal=on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await pool.start()
        try:
            yield
        finally:
            await pool.stop()

    app = FastAPI(title="ggufchat", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API, the Ollama API, the seeds' simple APIs, health and "
                              "metrics for GGUF models.")
    app.state.server = ServerState(config, pool, metrics)
    app.state.ollama = OllamaState(settings)
    errors.install(app)
    routers = (openai.router, embeddings.router, ollama.router, simple.router, system.router, web.router)
    for router in routers:
        app.include_router(router)

    # add_middleware wraps: the last added is the outermost.
    if config.api_keys:
        app.add_middleware(ApiKeyAuth, keys=config.api_keys, exempt=PUBLIC_PATHS, exempt_get=PUBLIC_GET_PATHS)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(OllamaErrorShape)  # around auth and the body limit: /api/* errors in Ollama's shape
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"],
                           max_age=600)
    _document_bodies(app)
    routes = {getattr(r, "path", "") for r in [*app.routes, *(r for router in routers for r in router.routes)]}
    app.add_middleware(RequestMetrics, metrics=metrics, routes=routes)
    return app


def _document_bodies(app: FastAPI) -> None:
    """The routes parse their bodies themselves (server/body.py); their models go into the OpenAPI
    document's components, where the routes' openapi_extra points."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            body.add_schemas(generate(), BODY_MODELS)
        return app.openapi_schema

    app.openapi = openapi
