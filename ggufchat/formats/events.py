"""What the output parsers make of a model's text: typed events that every front end (the OpenAI and
Ollama routes, the terminal chat) renders in its own shape, so none of them parses model text."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Content:
    """Answer text for the user."""

    text: str


@dataclass(frozen=True)
class Reasoning:
    """The model's thinking (between <think> and </think>), apart from the answer."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A tool call begins: index counts the calls of one reply from 0; id is unique ("call_...")."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    """A fragment of the JSON text of call `index`'s arguments; the fragments concatenate to a JSON
    object that satisfies the tool's parameters schema."""

    index: int
    fragment: str


OutputEvent = Content | Reasoning | ToolCallStart | ToolCallArguments


@dataclass(frozen=True)
class ToolSpec:
    """One tool a request offers: its name, description and JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_openai(self) -> dict[str, Any]:
        """The shape chat templates are written for ({"type": "function", "function": {...}})."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    """A complete call, as a non-streamed response reports it."""

    id: str
    name: str
    arguments: str  # JSON text of an object

    def arguments_object(self) -> dict[str, Any]:
        return json.loads(self.arguments)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
