"""Wire types: what clients send, for every route family. Responses are built in convert.py.

Departures from the OpenAI API, on purpose:
- `model` is accepted and echoed but not checked: one server serves one model, and the seeds send
  whatever path their server was started with ("/mnt/model/Llama-2-70b-hf").
- Extensions, as llama-server has them: `top_k`, `min_p`, `repeat_penalty`, `ignore_eos`.
- /v1/completions parses special tokens in the prompt (the client owns the whole prompt text);
  /v1/chat/completions never does in message content (see engine/templates.py).
- Features we do not implement are refused with 400 rather than ignored: `logprobs`, `tools`,
  `suffix`, `best_of` != n, non-text content parts.
- Unknown fields are ignored (clients send `store`, `metadata`, `user`, ...), as OpenAI does.
- Text with lone surrogates (JSON `"\\ud800"`, or the raw bytes ED A0 80, which Python's JSON
  parser lets through) is accepted with each one replaced by U+FFFD, as a browser would show it.
- `seed` must fit llama.cpp's 32 bits (0 .. 2**32-1, or -1 for a random one); OpenAI takes any int64.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ggufchat.engine.tokens import valid_unicode

MAX_N = 16


# Every string a client sends: it reaches the tokenizer, hashes and JSON replies, which all need UTF-8.
Text = Annotated[str, AfterValidator(valid_unicode)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Wire):
    type: str
    text: Text | None = None


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None


class JsonSchemaSpec(_Wire):
    name: str = "response"
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(_Wire):
    include_usage: bool = False


class _Sampling(_Wire):
    """Fields shared by chat and text completions. Ranges are OpenAI's; the engine checks again."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=-1, lt=2**32)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    # Extensions (llama-server's names).
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    echo: bool = False
    suffix: Text | None = None
    best_of: int | None = None
    response_format: ResponseFormat | None = None  # not in OpenAI's completions; llama-server has it


class SimpleRequest(_Wire):
    """The seeds' `POST /` body. `history`: [{"role", "content"}, ...] or [[user, assistant], ...]."""

    prompt: Text
    history: list[ChatMessage | list[Text]] = Field(default_factory=list)
    system: Text | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_length: int | None = Field(default=None, ge=1)  # the seed's Streamlit slider name
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)


class ChatRouteRequest(_Wire):
    """The EverAI seed's `POST /chat` body."""

    prompt: Text


class TokenizeRequest(_Wire):
    content: Text
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Wire):
    tokens: list[int]


# What the routes parse from request bodies (server/body.py), for the OpenAPI document.
BODY_MODELS: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest, SimpleRequest, ChatRouteRequest,
                                      TokenizeRequest, DetokenizeRequest]
