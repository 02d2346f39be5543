"""Wire types: what clients send, for every route family. Responses are built in convert.py.

Departures from the OpenAI API, on purpose:
- `model`, on a server started with one model, is accepted and echoed but not checked: the seeds send
  whatever path their server was started with ("/mnt/model/Llama-2-70b-hf"). On a server with several
  models it picks the model (404 `model_not_found` when unknown; absent: the default model).
- Extensions, as llama-server has them: `top_k`, `min_p`, `repeat_penalty`, `ignore_eos`.
- /v1/completions parses special tokens in the prompt (the client owns the whole prompt text);
  /v1/chat/completions never does in message content (see engine/templates.py).
- Features we do not implement are refused with 400 rather than ignored: `suffix`, `best_of` != n,
  non-text content parts, several prompts in one completions request.
- Tools: `tool_choice` "required" or a named function forces a valid call with a grammar, so
  `response_format` must then be absent or "text"; with "auto", `response_format` shapes the reply and
  a reply that is a JSON call of a given tool is still reported as a call (docs/tools.md).
- `chat_template_kwargs` (llama-server's and vLLM's name) go to the chat template, e.g.
  {"enable_thinking": false}.
- Logprobs are log-softmax over the model's raw logits, before temperature, penalties and grammars.
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
MAX_TOP_LOGPROBS = 20
MAX_TOOLS = 128


# Every string a client sends: it reaches the tokenizer, hashes and JSON replies, which all need UTF-8.
Text = Annotated[str, AfterValidator(valid_unicode)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Wire):
    type: str
    text: Text | None = None


class FunctionCall(_Wire):
    name: Text
    arguments: Text | dict[str, Any] = "{}"  # OpenAI sends a JSON string; some clients an object


class ToolCallWire(_Wire):
    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallWire] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: Text | None = None


# Function names as OpenAI allows them; they end up in prompts and grammars, so nothing else.
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionDef(_Wire):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Wire):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Wire):
    name: FunctionName


class NamedToolChoice(_Wire):
    type: Literal["function"]
    function: NamedFunction


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
    max_tokens: int | None = Field(default=None, ge=0)  # 0: completions with echo score the prompt only
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=-1, lt=2**32)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extensions (llama-server's names).
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False
    speculative: bool = True  # false: this request never speculates (greedy requests draft by default)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # OpenAI allows 5; llama-server more
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
    model: str | None = None  # several models: whose tokenizer (default: the default model's)
    content: Text
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Wire):
    model: str | None = None
    tokens: list[int]


# What the routes parse from request bodies (server/body.py), for the OpenAPI document.
BODY_MODELS: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest, SimpleRequest, ChatRouteRequest,
                                      TokenizeRequest, DetokenizeRequest]


class EmbeddingRequest(_Wire):
    """`POST /v1/embeddings`. Departures from the OpenAI API, on purpose:
    - `dimensions` is honoured for every model, by keeping the first components and normalising again
      (what Matryoshka-trained models are made for; with other models, it loses more quality).
    - `encoding_format` "base64" is little-endian float32, as OpenAI's; the official Python client asks
      for it by default when numpy is installed.
    - An input longer than the model takes is refused with 400, never truncated (as OpenAI does); an
      empty string or token array is refused too.
    """

    input: Text | list[Text] | list[int] | list[list[int]]
    model: Text | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: Text | None = None


BODY_MODELS.append(EmbeddingRequest)
