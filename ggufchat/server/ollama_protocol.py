"""Wire types of the Ollama API (/api/*): what Ollama clients send. Responses are built in ollama_convert.py.

Departures from Ollama, on purpose (docs/ollama.md has the user-facing list):
- `model` must be present. A server started with one model answers every name with it; a server with
  several picks the model by name (pool.py's resolve decides, for the OpenAI routes too).
- `options`: the sampling ones map to the engine (num_predict, temperature, top_k, top_p, min_p, stop,
  seed, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty); `num_ctx` caps the context
  of this request at most to the loaded one (larger values are clamped: clients send their own defaults);
  load-time options (num_gpu, num_thread, use_mmap, ...) and the ones llama.cpp dropped (mirostat,
  tfs_z, penalize_newline, ...) are accepted and ignored, as Ollama ignores options it does not know.
- `images` are refused with 400: ggufchat serves text models.
- `template` (a Go template in Ollama) and `context` (deprecated token memory) are refused with 400.
- `keep_alive` (seconds, or a duration such as "5m", "1h30m", "0", "-1") sets how long the model stays
  loaded after the request, as in Ollama; absent, the server's --idle-unload (or the model's config)
  decides. A model given to the server already loaded (tests) never unloads.
- Unknown fields are ignored, as Ollama does.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ggufchat.server.protocol import MAX_TOOLS, Text, Tool


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float | None:
    """Seconds: a number (seconds, as Ollama reads a bare number), or a Go duration string ("5m",
    "1h30m", "300ms", "-1s"), or a numeric string. Negative: keep the model loaded for ever; 0: unload
    after the request. None: the server's default."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a number of seconds or a duration such as \"5m\"")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("keep_alive must be finite")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("keep_alive must be a number of seconds or a duration such as \"5m\"")
    text = value.strip()
    try:
        return float(text)  # "300", "-1"
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    pos, total = 0, 0.0
    for m in _DURATION.finditer(body):
        if m.start() != pos:
            break
        total += float(m[1]) * _UNITS[m[2]]
        pos = m.end()
    if not body or pos != len(body):
        raise ValueError(f"keep_alive {value!r} is not a duration: use seconds or a form such as \"5m\", "
                         "\"1h30m\", \"0\" or \"-1\"")
    return sign * total


KeepAlive = Annotated[float | None, BeforeValidator(parse_keep_alive)]


class OllamaOptions(_Wire):
    """Ollama's `options`: the ones ggufchat uses, with Ollama's names; the rest are accepted and ignored."""

    num_ctx: int | None = Field(default=None, ge=1)
    num_predict: int | None = Field(default=None, ge=-2)  # -1: no limit; -2: until the context is full
    temperature: float | None = Field(default=None, ge=0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    stop: list[Text] | Text | None = None
    seed: int | None = Field(default=None, ge=-1, lt=2**32)
    repeat_penalty: float | None = Field(default=None, gt=0)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)


class OllamaToolCallFunction(_Wire):
    name: Text
    arguments: dict[str, Any] | Text = Field(default_factory=dict)  # Ollama sends an object


class OllamaToolCall(_Wire):
    function: OllamaToolCallFunction


class OllamaMessage(_Wire):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text | None = ""
    thinking: Text | None = None  # an assistant's earlier reasoning; not shown to the model again
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_name: Text | None = None


Format = Literal["", "json"] | dict[str, Any]


class _Generating(_Wire):
    model: Text = Field(min_length=1)
    stream: bool = True  # Ollama streams unless told not to
    format: Format | None = None
    options: OllamaOptions = Field(default_factory=OllamaOptions)
    keep_alive: KeepAlive = None
    think: bool | Literal["low", "medium", "high", "max"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class OllamaChatRequest(_Generating):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)


class OllamaGenerateRequest(_Generating):
    prompt: Text = ""
    suffix: Text | None = None
    system: Text | None = None
    template: Text | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class OllamaShowRequest(_Wire):
    # "name" is what older clients send (Ollama still reads it).
    model: Text | None = None
    name: Text | None = None
    verbose: bool = False


class OllamaPullRequest(_Wire):
    model: Text | None = None
    name: Text | None = None
    insecure: bool = False
    stream: bool = True


class OllamaDeleteRequest(_Wire):
    model: Text | None = None
    name: Text | None = None



class OllamaEmbedRequest(_Wire):
    model: Text = Field(min_length=1)
    input: Text | list[Text] = ""  # "" or []: only load the model, as in Ollama
    truncate: bool = True  # Ollama's default: a text longer than the model takes is cut, not refused
    dimensions: int | None = Field(default=None, ge=1)
    options: OllamaOptions = Field(default_factory=OllamaOptions)
    keep_alive: KeepAlive = None


class OllamaEmbeddingsRequest(_Wire):
    """The older /api/embeddings: one `prompt`, one `embedding`."""

    model: Text = Field(min_length=1)
    prompt: Text = ""
    options: OllamaOptions = Field(default_factory=OllamaOptions)
    keep_alive: KeepAlive = None
