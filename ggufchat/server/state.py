"""What the routes reach through `request.app.state.server`: no module globals for models or settings."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from ggufchat.server.lifecycle import ServerConfig
from ggufchat.server.metrics import Metrics
from ggufchat.server.pool import ModelPool


@dataclass
class ServerState:
    config: ServerConfig
    pool: ModelPool
    metrics: Metrics


async def server_state(request: Request) -> ServerState:
    # async: a plain def dependency would cost every request a hop through the thread pool.
    return request.app.state.server
