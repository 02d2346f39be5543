"""Splitting a model's <think>…</think> reasoning from its reply, fed in deltas cut anywhere.

Reasoning is recognised only at the very start of the output (after whitespace), or from the first
token when the prompt already opened <think>: a tag later in a reply is the reply's own text, and
looking for one everywhere would hold back every "<" of every answer. The reply that follows goes
on to the tool-call stage, so a call after </think> still parses. When reasoning is not split
(--reasoning-format none) the reasoning and its tags pass through verbatim as content, but the reply
still starts after </think>, so tool calls are found in the same place either way.

Work per delta is proportional to the delta: only a possible partial "</think>" (at most 7 chars) is
held back, and whitespace before </think> is held separately (never re-scanned) so that DeepSeek-R1's
"\\n\\n</think>\\n\\n" does not leave blank lines on either side."""

from __future__ import annotations

from ggufchat.formats.events import Content, Reasoning
from ggufchat.formats.families import THINK_CLOSE, THINK_OPEN

_START, _THINK, _LEAD, _REPLY = range(4)
_WS = " \t\r\n"

# What the splitter yields: Reasoning/Content events, or a str of reply text for the next stage.
Piece = Content | Reasoning | str


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker (0 if none)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ThinkSplitter:
    def __init__(self, *, split: bool, in_reasoning: bool) -> None:
        self.split = split
        self.state = _THINK if in_reasoning else _START
        self.buf = ""  # _START: what may still be "<think>"; _THINK: a partial "</think>"
        self.lead = True  # no reasoning text emitted yet: leading whitespace is dropped
        self.ws = ""  # whitespace held at the end of the reasoning so far

    def feed(self, text: str, final: bool = False) -> list[Piece]:
        out: list[Piece] = []
        if self.state == _START:
            self.buf += text
            text = ""
            body = self.buf.lstrip(_WS)
            if body.startswith(THINK_OPEN):
                if not self.split:
                    out.append(Content(self.buf[:len(self.buf) - len(body) + len(THINK_OPEN)]))
                self.buf = body[len(THINK_OPEN):]
                self.state = _THINK
            elif not final and (not body or THINK_OPEN.startswith(body)):
                return out
            else:
                self.state = _REPLY
                text, self.buf = self.buf, ""
        if self.state == _THINK:
            self.buf += text
            text = ""
            end = self.buf.find(THINK_CLOSE)
            if end < 0:
                keep = 0 if final else partial_suffix(self.buf, THINK_CLOSE)
                ready, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                if self.split:
                    self._reasoning(out, ready, closing=final)
                elif ready:
                    out.append(Content(ready))
                return out
            before, text = self.buf[:end], self.buf[end + len(THINK_CLOSE):]
            self.buf = ""
            if self.split:
                self._reasoning(out, before, closing=True)
                self.state = _LEAD
            else:
                out.append(Content(before + THINK_CLOSE))
                self.state = _REPLY
        if self.state == _LEAD:
            text = text.lstrip(_WS)
            if not text:
                return out
            self.state = _REPLY
        if text:
            out.append(text)
        return out

    def _reasoning(self, out: list[Piece], text: str, *, closing: bool) -> None:
        if self.lead:
            text = text.lstrip(_WS)
            if not text:
                return
            self.lead = False
        body = text.rstrip(_WS)
        if body:
            out.append(Reasoning(self.ws + body))
            self.ws = ""
        self.ws = "" if closing else self.ws + text[len(body):]
