"""Ollama wire requests -> engine requests, engine results -> Ollama's JSON lines. Pure: no I/O, no
engine calls (tokenizing functions come in as arguments). The Ollama sibling of convert.py: every field
is mapped explicitly, and the pieces both APIs share (stop lists, response-format grammars, tool plans)
are convert.py's own."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ggufchat.engine.grammar import GrammarLimits
from ggufchat.engine.sampling import SamplingParams
from ggufchat.engine.types import Finish, GenerationRequest
from ggufchat.errors import ContextOverflow, InvalidParameter, Unsupported
from ggufchat.formats import OutputFormat, OutputParser
from ggufchat.formats.events import Content, OutputEvent, Reasoning, ToolCall
from ggufchat.models.catalog import quant_of
from ggufchat.models.gguf import GGUFInfo
from ggufchat.server import convert
from ggufchat.server.ollama_protocol import OllamaMessage, OllamaOptions
from ggufchat.server.protocol import JsonSchemaSpec, ResponseFormat

DONE_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}

# Options copied to SamplingParams under the same name when the client sets them.
_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
             "frequency_penalty")


# ------------------------------------------------------------------ requests
def refuse_images(images: list[str] | None, where: str) -> None:
    if images:
        raise Unsupported("images are not supported: ggufchat serves text-only models", param=where)


def chat_messages(messages: list[OllamaMessage]) -> list[dict[str, Any]]:
    """Ollama messages in the shape chat templates read (the OpenAI one): tool calls with their
    arguments as objects, a tool result's `tool_name` as the message's name."""
    out = []
    for i, m in enumerate(messages):
        refuse_images(m.images, f"messages[{i}].images")
        message: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:
            message["tool_calls"] = [{"type": "function", "function": {"name": c.function.name,
                                                                       "arguments": c.function.arguments}}
                                     for c in m.tool_calls]
        if m.tool_name is not None:
            message["name"] = m.tool_name
        out.append(message)
    return out


def format_grammar(fmt: str | dict[str, Any] | None, limits: GrammarLimits) -> str | None:
    """`format`: "json" (any JSON object) or a JSON schema, through the same grammars as the OpenAI
    response_format; "" or absent: free text."""
    if not fmt:
        return None
    wire = (ResponseFormat(type="json_object") if fmt == "json" else
            ResponseFormat(type="json_schema", json_schema=JsonSchemaSpec(schema=fmt)))
    try:
        return convert.grammar_for(wire, limits)
    except InvalidParameter as exc:
        raise InvalidParameter(str(exc).replace("response_format", "format"), param="format", hint=exc.hint) from exc


def sampling_params(options: OllamaOptions, grammar: str | None, *, triggers: list[str] | None = None,
                    grammar_param: str = "format") -> SamplingParams:
    params = SamplingParams()
    for name in _SAMPLING:
        value = getattr(options, name)
        if value is not None:
            setattr(params, name, value)
    if options.seed is not None and options.seed != -1:  # -1: random, as in llama.cpp
        params.seed = options.seed
    params.grammar = grammar
    params.grammar_triggers = triggers
    params.grammar_param = grammar_param
    params.validate()
    return params


def generation_request(options: OllamaOptions, prompt_tokens: list[int], n_ctx_seq: int,
                       sampling: SamplingParams) -> GenerationRequest:
    """num_ctx: a ceiling on prompt + reply, clamped to the context the model was loaded with (clients
    send their own defaults, often larger); num_predict: -1 or -2 until the context is full."""
    n_ctx = min(options.num_ctx or n_ctx_seq, n_ctx_seq)
    if len(prompt_tokens) >= n_ctx:
        raise ContextOverflow(len(prompt_tokens), n_ctx)
    predict = options.num_predict
    max_tokens = None if predict is None or predict < 0 else predict
    if options.num_ctx is not None and n_ctx < n_ctx_seq:
        room = n_ctx - len(prompt_tokens)
        max_tokens = room if max_tokens is None else min(max_tokens, room)
    return GenerationRequest(prompt_tokens=list(prompt_tokens), sampling=sampling, max_tokens=max_tokens,
                             stop=stop_list(options.stop))


# Ollama sets no limit, and its clients send many (Continue's autocomplete a dozen or more), so more
# than the OpenAI routes' 4; each one is matched against every token's text on the engine thread.
MAX_STOPS = 32
MAX_STOP_CHARS = 256


def stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]  # Ollama ignores empty ones
    if len(stops) > MAX_STOPS:
        raise InvalidParameter(f"at most {MAX_STOPS} stop sequences", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise InvalidParameter(f"a stop sequence may have at most {MAX_STOP_CHARS} characters", param="stop")
    return stops


# Fill-in-the-middle: the special tokens of the model families that have them, prefix / suffix / middle,
# found by their text when the GGUF names no ids (llama.cpp looks them up the same way).
FIM_TEXTS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, CodeGemma
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SmolLM
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
)
FIM_KEYS = (("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.fim_mid_token_id"),
            ("tokenizer.ggml.prefix_token_id", "tokenizer.ggml.suffix_token_id", "tokenizer.ggml.middle_token_id"))

Tokenize = Callable[..., list[int]]  # Engine.tokenize(text, add_special=..., parse_special=...)


def fim_tokens(tokenize: Tokenize, metadata: dict[str, Any], n_vocab: int) -> tuple[int, int, int] | None:
    """(prefix, suffix, middle) token ids, or None when the model has no fill-in-the-middle tokens."""
    for keys in FIM_KEYS:
        ids = [metadata.get(k) for k in keys]
        if all(isinstance(i, int) and 0 <= i < n_vocab for i in ids):
            return ids[0], ids[1], ids[2]
    for texts in FIM_TEXTS:
        found = []
        for text in texts:
            ids = tokenize(text, add_special=False, parse_special=True)
            # One special token, not plain text that happens to be one token.
            if len(ids) != 1 or len(tokenize(text, add_special=False, parse_special=False)) == 1:
                break
            found.append(ids[0])
        else:
            return found[0], found[1], found[2]
    return None


def fim_prompt(fim: tuple[int, int, int], start: list[int], prefix: list[int], suffix: list[int]) -> list[int]:
    """Prefix-suffix-middle order, as llama-server's /infill and Ollama's coder templates build it."""
    pre, suf, mid = fim
    return [*start, pre, *prefix, suf, *suffix, mid]


# ------------------------------------------------------------------ responses
def timestamp() -> str:
    """RFC 3339 in UTC, as Ollama writes `created_at` (its clients parse it as a datetime)."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def done_fields(finish: Finish, t_arrival: float, load_seconds: float, *, called: bool = False) -> dict[str, Any]:
    """The final object's statistics, durations in nanoseconds. prompt_eval: from the sequence entering
    a slot to its first token (the prefill); eval: from the first token to the last."""
    u = finish.usage
    start = u.t_start or u.t_submit
    first = u.t_first_token or u.t_end
    return {
        "done_reason": DONE_REASONS.get(finish.reason, finish.reason),
        "total_duration": ns(time.perf_counter() - t_arrival),
        "load_duration": ns(load_seconds),
        "prompt_eval_count": u.prompt_tokens,
        "prompt_eval_duration": ns(first - start) if start else 0,
        "eval_count": u.completion_tokens,
        "eval_duration": ns(u.t_end - u.t_first_token) if u.t_first_token else 0,
    }


def tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Ollama's shape: arguments as an object, not a JSON string."""
    return [{"function": {"name": c.name, "arguments": c.arguments_object()}} for c in calls]


_encode = json.JSONEncoder(ensure_ascii=False).encode


class Lines:
    """The JSON lines of one response, /api/chat (chat=True) or /api/generate. Text deltas are the hot
    path: their line is written around the one encoded string (json.dumps with options builds a new
    encoder per call; see ChunkWriter in convert.py)."""

    def __init__(self, model: str, *, chat: bool) -> None:
        self.chat = chat
        self.model = model
        self._head = '{"model": ' + _encode(model) + ', "created_at": "'
        self._field = "message" if chat else "response"

    def _wrap(self, body: str) -> str:
        return f'{self._head}{timestamp()}", {body}, "done": false}}\n'

    def text(self, text: str) -> str:
        if self.chat:
            return self._wrap('"message": {"role": "assistant", "content": ' + _encode(text) + "}")
        return self._wrap('"response": ' + _encode(text))

    def thinking(self, text: str) -> str:
        if self.chat:
            return self._wrap('"message": {"role": "assistant", "content": "", "thinking": ' + _encode(text) + "}")
        return self._wrap('"response": "", "thinking": ' + _encode(text))

    def calls(self, calls: list[ToolCall]) -> str:
        message = {"role": "assistant", "content": "", "tool_calls": tool_calls(calls)}
        return self._wrap('"message": ' + _encode(message))

    def final(self, fields: dict[str, Any], **body: Any) -> dict[str, Any]:
        """The last object (streamed: with empty text; not streamed: with the whole reply in `body`)."""
        empty = {"message": {"role": "assistant", "content": ""}} if self.chat else {"response": ""}
        return {"model": self.model, "created_at": timestamp(), **empty, **body, "done": True, **fields}

    @staticmethod
    def line_of(obj: dict[str, Any]) -> str:
        return _encode(obj) + "\n"

    @staticmethod
    def error(message: str) -> str:
        return _encode({"error": message}) + "\n"


@dataclass
class Reply:
    """A whole non-streamed reply: its text, reasoning and tool calls."""

    content: str = ""
    thinking: str = ""
    calls: list[ToolCall] | None = None

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.thinking:
            message["thinking"] = self.thinking
        if self.calls:
            message["tool_calls"] = tool_calls(self.calls)
        return message


Piece = tuple[str, Any]  # ("text", str) | ("thinking", str) | ("calls", [ToolCall, ...])


class ReplyReader:
    """One reply's model text through the formats parser (reasoning and tool calls; None: plain text),
    as the pieces Ollama sends: text, thinking, and each tool call once it is complete (Ollama sends a
    call whole, its arguments an object, never in fragments). `reply` gathers the whole of it."""

    def __init__(self, fmt: OutputFormat | None) -> None:
        self.parser = OutputParser(fmt) if fmt is not None else None
        self.reply = Reply()
        self._text: list[str] = []
        self._thinking: list[str] = []
        self._sent = 0

    def push(self, text: str) -> list[Piece]:
        if self.parser is None:
            if not text:
                return []
            self._text.append(text)
            return [("text", text)]
        return self._pieces(self.parser.push(text))

    def end(self) -> list[Piece]:
        pieces = self._pieces(self.parser.finish()) if self.parser is not None else []
        self.reply.content = "".join(self._text)
        self.reply.thinking = "".join(self._thinking)
        self.reply.calls = list(self.parser.calls) if self.parser is not None else None
        return pieces

    def _pieces(self, events: list[OutputEvent]) -> list[Piece]:
        out: list[Piece] = []
        for event in events:
            if isinstance(event, Content) and event.text:
                self._text.append(event.text)
                out.append(("text", event.text))
            elif isinstance(event, Reasoning) and event.text:
                self._thinking.append(event.text)
                out.append(("thinking", event.text))
        calls = self.parser.calls
        if len(calls) > self._sent:
            out.append(("calls", calls[self._sent:]))
            self._sent = len(calls)
        return out


# ------------------------------------------------------------------ models
# llama.cpp's llama_ftype values (general.file_type) for files whose name carries no quant tag.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
              18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
              25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
              32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE"}


def parameter_size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e3:.0f}K"


def details(info: GGUFInfo, filename: str, n_params: int) -> dict[str, Any]:
    arch = info.architecture or ""
    quant = quant_of(filename)
    level = quant.upper() if quant else FILE_TYPES.get(info.get("general.file_type"), "unknown")
    return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch] if arch else None,
            "parameter_size": parameter_size(n_params), "quantization_level": level}


def model_info(info: GGUFInfo, n_params: int) -> dict[str, Any]:
    """The GGUF metadata as Ollama's model_info: scalars as they are, the long arrays (tokens, merges)
    empty as Ollama shows them without `verbose`; the chat template is `template`, not here."""
    out = {k: v for k, v in info.metadata.items() if k != "tokenizer.chat_template"}
    out.setdefault("general.parameter_count", n_params)
    return out
