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

from ggufchat import formats
from ggufchat.engine import grammar
from ggufchat.engine.grammar import GrammarLimits
from ggufchat.engine.sampling import SamplingParams
from ggufchat.engine.types import Delta, Finish, GenerationRequest, TokenLogprob
from ggufchat.errors import InvalidParameter, Unsupported
from ggufchat.formats import OutputFormat
from ggufchat.formats.events import ToolSpec, new_call_id
from ggufchat.server.output import ChatOutput, CompletionLogprobs, Pieces, finish_reason, merge_completion_logprobs
from ggufchat.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    NamedToolChoice,
    ResponseFormat,
    SimpleRequest,
    Tool,
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


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        # "developer" is OpenAI's newer name for the system role; chat templates only know "system".
        role = "system" if m.role == "developer" else m.role
        message: dict[str, Any] = {"role": role, "content": _text_content(m)}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_calls:
            # The template parses string arguments into objects (engine/templates.py).
            message["tool_calls"] = [{"id": c.id or new_call_id(), "type": "function",
                                      "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                     for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
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


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools and tool_choice decide before generation: the tools the template
    shows and the parser accepts, their call syntax, and the grammar that constrains the reply."""

    tools: tuple[ToolSpec, ...] = ()  # empty: no tools shown, nothing parsed as a call
    family: str = "generic"
    grammar: str | None = None
    triggers: list[str] | None = None  # set: the grammar is lazy, on from the first match (tool_choice auto)

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        return [t.as_openai() for t in self.tools] or None


def tool_plan(req: ChatCompletionRequest, template_source: str | None, limits: GrammarLimits) -> ToolPlan:
    shaped = req.response_format is not None and req.response_format.type != "text"
    return plan_tools(req.tools, req.tool_choice, template_source, limits, shaped=shaped,
                      parallel=req.parallel_tool_calls)


def plan_tools(tools: list[Tool] | None, choice: str | NamedToolChoice | None, template_source: str | None,
               limits: GrammarLimits, *, shaped: bool, parallel: bool) -> ToolPlan:
    """tool_plan for any route: `shaped` when a response format (a grammar of its own) shapes the reply.
    The Ollama routes use it too (their tool choice is always auto)."""
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    specs = tuple(ToolSpec(t.function.name, t.function.description or "",
                           t.function.parameters or {"type": "object", "properties": {}}) for t in tools or ())
    if not specs:
        if choice == "required" or named:
            raise InvalidParameter("tool_choice needs tools to choose from", param="tool_choice")
        return ToolPlan()
    names = [t.name for t in specs]
    if len(set(names)) != len(names):
        raise InvalidParameter("tool names must be unique", param="tools")
    if choice == "none":  # the model neither sees the tools nor has its reply read as calls
        return ToolPlan()
    if named and named not in names:
        raise InvalidParameter(f"tool_choice names {named!r}, which is not among the tools", param="tool_choice")
    family = formats.tool_family(template_source)
    if choice == "required" or named:
        if shaped:
            raise InvalidParameter("a forced tool call (tool_choice required or a named function) and a "
                                   "response_format cannot both shape the reply; drop one", param="response_format")
        forced = [t for t in specs if t.name == named] if named else list(specs)
        grammar = formats.tool_grammar(forced, family, name=named, parallel=parallel, limits=limits)
        return ToolPlan(specs, family, grammar)
    if shaped:  # auto with a response_format: that grammar shapes the reply (docs/tools.md)
        return ToolPlan(specs, family)
    grammar, triggers = formats.lazy_tool_grammar(specs, family, parallel=parallel, limits=limits)
    return ToolPlan(specs, family, grammar, triggers)


def chat_requests(req: ChatCompletionRequest, prompt_tokens: list[int], limits: GrammarLimits,
                  plan: ToolPlan | None = None) -> list[GenerationRequest]:
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise InvalidParameter("max_tokens and max_completion_tokens disagree", param="max_tokens")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens == 0:
        raise InvalidParameter("max_tokens must be at least 1", param="max_tokens")
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidParameter("top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    plan = plan or ToolPlan()
    if plan.grammar is not None:
        return _fan_out(req, prompt_tokens, max_tokens, plan.grammar, logprobs=logprobs, triggers=plan.triggers,
                        grammar_param="tools")
    return _fan_out(req, prompt_tokens, max_tokens, grammar_for(req.response_format, limits), logprobs=logprobs)


def completion_requests(req: CompletionRequest, prompt_tokens: list[int],
                        limits: GrammarLimits) -> list[GenerationRequest]:
    if req.suffix:
        raise Unsupported("suffix (fill-in-the-middle) is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise Unsupported("best_of other than n is not supported", param="best_of")
    max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETIONS_MAX_TOKENS
    if max_tokens == 0 and not (req.echo and req.logprobs is not None):
        raise InvalidParameter("max_tokens 0 only scores the prompt: it needs echo and logprobs", param="max_tokens")
    # With echo, logprobs cover the prompt too (what loglikelihood evaluation sends).
    prompt_logprobs = req.logprobs if req.echo else None
    return _fan_out(req, prompt_tokens, max_tokens, grammar_for(req.response_format, limits),
                    logprobs=req.logprobs, prompt_logprobs=prompt_logprobs)


def _fan_out(req: _Sampling, prompt_tokens: list[int], max_tokens: int | None, grammar: str | None, *,
             logprobs: int | None = None, prompt_logprobs: int | None = None, triggers: list[str] | None = None,
             grammar_param: str = "response_format") -> list[GenerationRequest]:
    stops = stop_list(req.stop)
    requests = []
    for i in range(req.n):
        sampling = sampling_params(req, grammar, i)
        sampling.grammar_triggers = triggers
        sampling.grammar_param = grammar_param
        requests.append(GenerationRequest(prompt_tokens=list(prompt_tokens), sampling=sampling,
                                          max_tokens=max_tokens, stop=stops, ignore_eos=req.ignore_eos,
                                          logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                          speculative=req.speculative))
    return requests


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
@dataclass
class Choice:
    """What one sequence produced, gathered from its events."""

    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish: Finish | None = None

    @property
    def content(self) -> str:
        return "".join(self.text)

    def add(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs

    def as_delta(self) -> Delta:
        """Everything it produced as one Delta (a non-streamed reply goes through the same output code)."""
        return Delta(self.content, self.token_ids, logprobs=self.logprobs or None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_dict(finishes: list[Finish]) -> dict[str, Any]:
    # The prompt is counted once for all n choices, as OpenAI does.
    first = finishes[0].usage
    completion = sum(f.usage.completion_tokens for f in finishes)
    usage = {
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": first.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
    }
    drafted = sum(f.usage.drafted_tokens for f in finishes)
    if drafted:
        # Speculation's drafts, in the fields OpenAI reports its predicted outputs in.
        accepted = sum(f.usage.accepted_tokens for f in finishes)
        usage["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                              "rejected_prediction_tokens": drafted - accepted}
    return usage


def chat_completion(rid: str, model: str, choices: list[Choice], fmt: OutputFormat | None = None,
                    pieces: Pieces | None = None) -> dict[str, Any]:
    """The whole response. `pieces` (token bytes) when the client asked for logprobs."""
    out = []
    for c in choices:
        output = ChatOutput(fmt, pieces)
        output.push(c.as_delta())
        output.end()
        out.append(output.choice(c.index, c.finish, with_logprobs=pieces is not None))
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": out,
        "usage": usage_dict([c.finish for c in choices]),
    }


def text_completion(rid: str, model: str, choices: list[Choice], echo: str = "", *,
                    pieces: Pieces | None = None, prompt_tokens: list[int] | None = None) -> dict[str, Any]:
    out = []
    for c in choices:
        logprobs = None
        if pieces is not None:
            builder = CompletionLogprobs(pieces)
            parts = []
            if echo and c.prompt_logprobs is not None and prompt_tokens is not None:
                parts.append(builder.chunk(prompt_tokens, c.prompt_logprobs))
            parts.append(builder.chunk([e.token for e in c.logprobs], list(c.logprobs)))
            logprobs = merge_completion_logprobs(parts)
        out.append({"index": c.index, "text": echo + c.content, "logprobs": logprobs,
                    "finish_reason": finish_reason(c.finish)})
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": out,
        "usage": usage_dict([c.finish for c in choices]),
    }


_encode_str = json.JSONEncoder(ensure_ascii=False).encode


class ChunkWriter:
    """Server-sent events for one streamed response. Chunks share everything but their payload, so the
    common part is serialised once; a token's chunk is a cached prefix and suffix around its text,
    encoded as one JSON string (json.dumps with any option builds a new JSONEncoder per call, several
    times the cost; docs/benchmarks.md, costs behind design choices)."""

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

    def delta(self, index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None) -> str:
        """A chunk of anything but plain text: reasoning, tool calls, logprobs."""
        if self.chat:
            return self._event([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}])
        return self._event([{"index": index, "text": delta.get("content", ""), "logprobs": logprobs,
                             "finish_reason": None}])

    def finish(self, index: int, finish: Finish, *, called: bool = False) -> str:
        reason = finish_reason(finish, called)
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
