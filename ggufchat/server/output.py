"""A choice's output in the OpenAI shapes. Model text goes through the formats parser (content,
reasoning_content, tool_calls); token logprobs become the chat or the completions shape. Pure: the
routes feed engine events in and send what comes out, streamed or as one body."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ggufchat.engine.types import Delta, Finish, TokenLogprob
from ggufchat.formats import OutputFormat, OutputParser
from ggufchat.formats.events import Content, OutputEvent, Reasoning, ToolCallArguments, ToolCallStart

# The raw bytes of token ids (Engine.token_pieces).
Pieces = Callable[[list[int]], list[bytes]]

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}


def finish_reason(finish: Finish, called: bool = False) -> str:
    if called and finish.reason in ("stop", "cancelled"):
        return "tool_calls"
    return FINISH_REASONS.get(finish.reason, finish.reason)


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(entries: list[TokenLogprob], pieces: Pieces) -> list[dict[str, Any]]:
    """`choices[].logprobs.content` entries: token, logprob, bytes and the top alternatives."""
    ids = [e.token for e in entries] + [t for e in entries for t, _ in e.top]
    table = dict(zip(ids, pieces(ids), strict=True))
    out = []
    for e in entries:
        piece = table[e.token]
        out.append({"token": _text(piece), "logprob": e.logprob, "bytes": list(piece),
                    "top_logprobs": [{"token": _text(table[t]), "logprob": lp, "bytes": list(table[t])}
                                     for t, lp in e.top]})
    return out


class CompletionLogprobs:
    """The completions `logprobs` object, built a chunk at a time: tokens, token_logprobs, top_logprobs
    and text_offset (characters from the start of the choice's text, echo included)."""

    def __init__(self, pieces: Pieces) -> None:
        self.pieces = pieces
        self.offset = 0

    def chunk(self, token_ids: list[int], entries: list[TokenLogprob | None]) -> dict[str, Any]:
        ids = list(token_ids) + [t for e in entries if e is not None for t, _ in e.top]
        table = dict(zip(ids, self.pieces(ids), strict=True))
        tokens, logprobs, tops, offsets = [], [], [], []
        for tok, e in zip(token_ids, entries, strict=True):
            text = _text(table[tok])
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            logprobs.append(None if e is None else e.logprob)
            # Several ids can share a text; the best one keeps its place, as in OpenAI's dict.
            tops.append(None if e is None else _top_dict(e, table))
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _top_dict(e: TokenLogprob, table: dict[int, bytes]) -> dict[str, float]:
    top: dict[str, float] = {}
    for t, lp in e.top:
        top.setdefault(_text(table[t]), lp)
    return top


def merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key, values in part.items():
            merged[key].extend(values)
    return merged


def _wire_delta(event: OutputEvent) -> dict[str, Any]:
    if isinstance(event, Content):
        return {"content": event.text}
    if isinstance(event, Reasoning):
        return {"reasoning_content": event.text}
    if isinstance(event, ToolCallStart):
        return {"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                "function": {"name": event.name, "arguments": ""}}]}
    assert isinstance(event, ToolCallArguments)
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.fragment}}]}


class ChatOutput:
    """One chat choice: each engine Delta in, the wire deltas (and logprobs) to stream out; at the end,
    the whole message. `fmt` None: plain text, nothing parsed (the fast path)."""

    def __init__(self, fmt: OutputFormat | None, pieces: Pieces | None = None) -> None:
        self.parser = OutputParser(fmt) if fmt is not None else None
        self.pieces = pieces  # set: the client asked for logprobs
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.logprobs: list[dict[str, Any]] = []

    @property
    def called(self) -> bool:
        return bool(self.parser and self.parser.calls)

    def push(self, delta: Delta) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        """(delta, logprobs) pairs to stream for this engine Delta; logprobs ride on the first."""
        events = self.parser.push(delta.text) if self.parser else [Content(delta.text)] if delta.text else []
        logprobs = None
        if self.pieces is not None and delta.logprobs:
            entries = chat_logprobs(delta.logprobs, self.pieces)
            self.logprobs.extend(entries)
            logprobs = {"content": entries}
        return self._wire(events, logprobs)

    def end(self) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        return self._wire(self.parser.finish(), None) if self.parser else []

    def _wire(self, events: list[OutputEvent], logprobs: dict[str, Any] | None):
        out = []
        for event in events:
            if isinstance(event, Content):
                self.content.append(event.text)
            elif isinstance(event, Reasoning):
                self.reasoning.append(event.text)
            out.append((_wire_delta(event), logprobs))
            logprobs = None
        if logprobs is not None:  # the tokens' text is held back (a possible call): their logprobs are not
            out.append(({"content": ""}, logprobs))
        return out

    def message(self) -> dict[str, Any]:
        content = "".join(self.content)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.called:
            message["content"] = content or None  # OpenAI's shape for a reply that is only calls
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in self.parser.calls]
        return message

    def choice(self, index: int, finish: Finish, *, with_logprobs: bool) -> dict[str, Any]:
        return {"index": index, "message": self.message(),
                "logprobs": {"content": self.logprobs} if with_logprobs else None,
                "finish_reason": finish_reason(finish, self.called)}
