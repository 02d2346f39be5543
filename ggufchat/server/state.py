"""What the routes reach through `request.app.state.server`: no module globals for model or settings."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from ggufchat.server.lifecycle import ModelHolder, ServerConfig
from ggufchat.server.metrics import Metrics


@dataclass
class ServerState:
    config: ServerConfig
    holder: ModelHolder
    metrics: Metrics


async def server_state(request: Request) -> ServerState:
    # async: a plain def dependency would cost every request a hop through the thread pool.
    return request.app.state.server
