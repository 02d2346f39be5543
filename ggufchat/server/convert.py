"""Wire requests -> engine requests, engine results -> wire responses. Pure: no I/O, no engine calls.

Every field is mapped explicitly (never `**body.model_dump()` into the engine), so a field the engine
does not know can neither slip through nor be silently dropped.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ggufchat.engine import grammar
from ggufchat.engine.grammar import GrammarLimits
from ggufchat.engine.sampling import SamplingParams
from ggufchat.engine.types import Finish, GenerationRequest
from ggufchat.errors import InvalidParameter, Unsupported
from ggufchat.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseFormat,
    SimpleRequest,
    _Sampling,
)

SIMPLE_MAX_TOKENS = 512  # the seeds' FastAPI servers: max_new_tokens=512
CHAT_ROUTE_MAX_TOKENS = 256  # the EverAI seed: max_length=256
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions
MAX_STOPS = 4


# ------------------------------------------------------------------ requests
def _text_content(message: ChatMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise Unsupported(f"content parts of type {part.type!r} are not supported (text only)",
                              param="messages")
        texts.append(part.text)
    return "".join(texts)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        # "developer" is OpenAI's newer name for the system role; chat templates only know "system".
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": _text_content(m)})
    return out


def simple_messages(req: SimpleRequest) -> list[dict[str, str]]:
    """The seeds' history: a list of {"role", "content"}, or of [user, assistant] pairs (ChatGLM style)."""
    messages = [{"role": "system", "content": req.system}] if req.system else []
    for i, item in enumerate(req.history):
        if isinstance(item, ChatMessage):
            messages.extend(chat_messages([item]))
        elif len(item) == 2:
            messages += [{"role": "user", "content": item[0]}, {"role": "assistant", "content": item[1]}]
        else:
            raise InvalidParameter(f"history[{i}] must be {{'role', 'content'}} or a [user, assistant] pair",
                                   param="history")
    messages.append({"role": "user", "content": req.prompt})
    return messages


def stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise InvalidParameter(f"at most {MAX_STOPS} stop sequences", param="stop")
    if any(not s for s in stops):
        raise InvalidParameter("stop sequences must not be empty", param="stop")
    return stops


def grammar_for(fmt: ResponseFormat | None, limits: GrammarLimits) -> str | None:
    """A GBNF grammar that enforces the response format, or None for free text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return grammar.json_object()
    schema = fmt.json_schema.schema_ if fmt.json_schema else None
    if schema is None:
        raise InvalidParameter("response_format json_schema needs json_schema.schema", param="response_format")
    return grammar.from_schema(schema, limits)


# Request fields copied to SamplingParams under the same name when the client sets them.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
                    "frequency_penalty")


def _sampling(req, fields: tuple[str, ...]) -> SamplingParams:
    params = SamplingParams()
    for name in fields:
        value = getattr(req, name)
        if value is not None:
            setattr(params, name, value)
    return params


def sampling_params(req: _Sampling, grammar: str | None, seed_offset: int = 0) -> SamplingParams:
    params = _sampling(req, _SAMPLING_FIELDS)
    if req.seed is not None and req.seed != -1:  # -1: random, as in llama.cpp
        # n > 1 with a seed: distinct but reproducible choices.
        params.seed = (req.seed + seed_offset) % 2**32
    params.grammar = grammar
    params.validate()
    return params


def _refuse_unsupported(req: _Sampling) -> None:
    if req.logprobs:
        raise Unsupported("logprobs are not supported", param="logprobs")


def chat_requests(req: ChatCompletionRequest, prompt_tokens: list[int],
                  limits: GrammarLimits) -> list[GenerationRequest]:
    _refuse_unsupported(req)
    if req.tools:
        raise Unsupported("tools / function calling are not supported", param="tools")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise InvalidParameter("max_tokens and max_completion_tokens disagree", param="max_tokens")
    max_tokens = req.max_completion_tokens or req.max_tokens
    return _fan_out(req, prompt_tokens, max_tokens, grammar_for(req.response_format, limits))


def completion_requests(req: CompletionRequest, prompt_tokens: list[int],
                        limits: GrammarLimits) -> list[GenerationRequest]:
    _refuse_unsupported(req)
    if req.suffix:
        raise Unsupported("suffix (fill-in-the-middle) is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise Unsupported("best_of other than n is not supported", param="best_of")
    max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETIONS_MAX_TOKENS
    return _fan_out(req, prompt_tokens, max_tokens, grammar_for(req.response_format, limits))


def _fan_out(req: _Sampling, prompt_tokens: list[int], max_tokens: int | None,
             grammar: str | None) -> list[GenerationRequest]:
    stops = stop_list(req.stop)
    return [GenerationRequest(prompt_tokens=list(prompt_tokens), sampling=sampling_params(req, grammar, i),
                              max_tokens=max_tokens, stop=stops, ignore_eos=req.ignore_eos)
            for i in range(req.n)]


def simple_request(req: SimpleRequest, prompt_tokens: list[int], default_max_tokens: int) -> GenerationRequest:
    params = _sampling(req, ("temperature", "top_p"))
    params.validate()
    max_tokens = req.max_tokens or req.max_length or default_max_tokens
    return GenerationRequest(prompt_tokens=prompt_tokens, sampling=params, max_tokens=max_tokens)


def completion_prompt(prompt: str | list[str] | list[int] | list[list[int]]) -> str | list[int]:
    """One prompt, as text or token ids. Batches of prompts are refused (send one request each)."""
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise InvalidParameter("the prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return list(prompt)
    if len(prompt) == 1:
        return completion_prompt(prompt[0])
    raise Unsupported("several prompts in one request are not supported; send one request per prompt",
                      param="prompt")


# ------------------------------------------------------------------ responses
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}


@dataclass
class Choice:
    """What one sequence produced, gathered from its events."""

    index: int
    text: list[str] = field(default_factory=list)
    finish: Finish | None = None

    @property
    def content(self) -> str:
        return "".join(self.text)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_dict(finishes: list[Finish]) -> dict[str, Any]:
    # The prompt is counted once for all n choices, as OpenAI does.
    first = finishes[0].usage
    completion = sum(f.usage.completion_tokens for f in finishes)
    return {
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": first.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
    }


def chat_completion(rid: str, model: str, choices: list[Choice]) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.content},
                     "logprobs": None, "finish_reason": FINISH_REASONS.get(c.finish.reason, c.finish.reason)}
                    for c in choices],
        "usage": usage_dict([c.finish for c in choices]),
    }


def text_completion(rid: str, model: str, choices: list[Choice], echo: str = "") -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": c.index, "text": echo + c.content, "logprobs": None,
                     "finish_reason": FINISH_REASONS.get(c.finish.reason, c.finish.reason)} for c in choices],
        "usage": usage_dict([c.finish for c in choices]),
    }


_encode_str = json.JSONEncoder(ensure_ascii=False).encode


class ChunkWriter:
    """Server-sent events for one streamed response. Chunks share everything but their payload, so the
    common part is serialised once; a token's chunk is a cached prefix and suffix around its text,
    encoded as one JSON string (json.dumps with any option builds a new JSONEncoder per call: 3.4 us
    a token against 0.65 us this way)."""

    def __init__(self, rid: str, model: str, *, chat: bool, include_usage: bool) -> None:
        self.chat = chat
        self.include_usage = include_usage
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": obj, "created": int(time.time()), "model": model}
        self._head = json.dumps(head, ensure_ascii=False)[:-1]  # without the closing brace
        self._tail = ', "usage": null}' if include_usage else "}"
        self._around: dict[int, tuple[str, str]] = {}  # choice index -> text chunk before and after the text

    def _event(self, choices: list[dict[str, Any]]) -> str:
        return f'data: {self._head}, "choices": {json.dumps(choices, ensure_ascii=False)}{self._tail}\n\n'

    def role(self, index: int) -> str:
        return self._event([{"index": index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def text(self, index: int, text: str) -> str:
        around = self._around.get(index)
        if around is None:
            marker = "\x00"  # stands in for the text while the chunk's shape is serialised once
            whole = self._event([{"index": index, "delta": {"content": marker}, "logprobs": None,
                                  "finish_reason": None}] if self.chat else
                                [{"index": index, "text": marker, "logprobs": None, "finish_reason": None}])
            before, _, after = whole.rpartition(_encode_str(marker))  # the last: no user text follows it
            around = self._around[index] = (before, after)
        return around[0] + _encode_str(text) + around[1]

    def finish(self, index: int, finish: Finish) -> str:
        reason = FINISH_REASONS.get(finish.reason, finish.reason)
        if self.chat:
            return self._event([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}])
        return self._event([{"index": index, "text": "", "logprobs": None, "finish_reason": reason}])

    def usage(self, finishes: list[Finish]) -> str:
        return f'data: {self._head}, "choices": [], "usage": {json.dumps(usage_dict(finishes))}}}\n\n'

    @staticmethod
    def error(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    DONE = "data: [DONE]\n\n"


def simple_response(text: str) -> dict[str, Any]:
    return {"response": text, "status": 200, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
