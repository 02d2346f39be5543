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


def server_state(request: Request) -> ServerState:
    return request.app.state.server
