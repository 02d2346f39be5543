"""Finding tool calls in a reply streamed in deltas cut anywhere, without delaying the rest of it.

What is recognised (every family's markup everywhere, since the template only says what the model
was taught, not what it writes):
- tagged: `<tool_call>` JSON `</tool_call>` (Hermes, Qwen2.5, ggufchat's fallback prompt);
- `<|python_tag|>` JSON (Llama 3.x);
- `[TOOL_CALLS]` followed by a JSON array of calls, or by name[ARGS]{…} (Mistral, older and newer);
- at the start of the reply or right after a call, a bare JSON object or one in a ``` / ```json
  fence: what small models (Qwen2.5-Coder-0.5B) really write instead of their template's tags.
A wrapper may hold several calls (an array, or objects separated by whitespace, "," or ";").

Text streams as content at once; only a possible start of a call is held back: a tail that may
still become an opener, or, at the start of the reply, whitespace and the first characters of an
object until its first key (or the name it calls) shows that it is not a call (calls.plausible_start).
A call is held until complete, then checked against the tools (calls.Toolbox) and emitted as
ToolCallStart + ToolCallArguments; none of its markup reaches the content. A wrapper none of whose
calls is valid is shown as the content it was; invalid calls next to valid ones are shown as content
after the wrapper. Each delta costs time in proportion to its length: the JSON scanner and the
searches resume where they stopped."""

from __future__ import annotations

import json
import re

from ggufchat.formats.calls import Toolbox, plausible_start
from ggufchat.formats.events import Content, OutputEvent, ToolCall, ToolCallArguments, ToolCallStart, new_call_id
from ggufchat.formats.families import MISTRAL_CALLS, PYTHON_TAG, TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from ggufchat.formats.reasoning import partial_suffix

FENCE = "```"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
# Openers recognised anywhere in a reply; a fence or a bare object only where a call may start.
OPENERS = {TOOL_CALL_OPEN: "tag", PYTHON_TAG: "python", MISTRAL_CALLS: "mistral"}
BOUNDARY_OPENERS = {**OPENERS, FENCE: "fence"}
CLOSERS = {"tag": TOOL_CALL_CLOSE, "fence": FENCE}
FENCE_LANGS = frozenset({"", "json", "json5", "tool_call", "tool_calls"})
MAX_NAME = 128  # a [TOOL_CALLS]name[ARGS] name longer than this is not a name

_WS = " \t\r\n"
_OUT_OF_STRING = re.compile(r'["{}\[\]]')
_IN_STRING = re.compile(r'["\\]')
_NON_WS = re.compile(r"[^ \t\r\n]")
_WORD = re.compile(r"[A-Za-z0-9_-]*")
_NAME = re.compile(r"[A-Za-z0-9_.:-]*")
_CALL_ID_BODY = re.compile(r"[A-Za-z0-9_-]*")

_BOUNDARY, _TEXT, _WRAPPER = range(3)


class JsonEnd:
    """Where a JSON object or array that starts at a given index ends, fed piece by piece: tracks
    nesting and strings only, so each character is looked at once. Validity is json.loads's job."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def scan(self, text: str, pos: int) -> int:
        """Read text[pos:]; the index just after the value's end, or -1 when it has not ended."""
        n = len(text)
        while pos < n:
            if self.escaped:
                self.escaped = False
                pos += 1
            elif self.in_string:
                m = _IN_STRING.search(text, pos)
                if m is None:
                    return -1
                pos = m.end()
                if m.group() == "\\":
                    self.escaped = True
                else:
                    self.in_string = False
            else:
                m = _OUT_OF_STRING.search(text, pos)
                if m is None:
                    return -1
                pos = m.end()
                c = m.group()
                if c == '"':
                    self.in_string = True
                elif c in "{[":
                    self.depth += 1
                else:
                    self.depth -= 1
                    if self.depth <= 0:
                        return pos
        return -1


class _Wrapper:
    """One attempt at a call: its markup and the calls in it. Indexes count from the start of the
    stage's buffer, which the attempt owns from its first character (the whitespace before it)."""

    def __init__(self, kind: str, pos: int) -> None:
        self.kind = kind
        self.phase = "lang" if kind == "fence" else "inner"
        self.pos = pos  # next unread index
        self.end = pos  # the wrapper so far ends here (what a failed attempt shows as content)
        self.bracket = 0  # 1: inside "[", 2: after "]"
        self.elements = 0
        self.valid = 0
        self.invalid: list[str] = []
        self.json_start = 0
        self.scanner = JsonEnd()
        self.decided = False
        self.name: str | None = None  # a [TOOL_CALLS]name[ARGS] call's name, its arguments pending


class ToolStage:
    """The reply (after any reasoning) in, content and tool-call events out."""

    def __init__(self, toolbox: Toolbox, *, parallel: bool) -> None:
        self.toolbox = toolbox
        self.parallel = parallel
        self.calls: list[ToolCall] = []
        self.buf = ""
        self.state = _BOUNDARY
        self.wrapper: _Wrapper | None = None
        self.called = False  # a call was recognised (kept or, with parallel off, dropped)
        self._steps = {_BOUNDARY: self._boundary, _TEXT: self._text, _WRAPPER: self._wrapper}

    def feed(self, text: str, final: bool = False) -> list[OutputEvent]:
        self.buf += text
        out: list[OutputEvent] = []
        while self._steps[self.state](out, final):
            pass
        return out

    # -- states: each returns True when it changed state and the loop should go on

    def _boundary(self, out: list[OutputEvent], final: bool) -> bool:
        """At the start of the reply or after a call: whitespace is held (dropped before a call)."""
        rest = self.buf.lstrip(_WS)
        lead = len(self.buf) - len(rest)
        if not rest:
            if final:
                if not self.called:
                    _content(out, self.buf)
                self.buf = ""
            return False
        if rest[0] == "{":
            self._open("bare", lead)
            return True
        for opener, kind in BOUNDARY_OPENERS.items():
            if rest.startswith(opener):
                self._open(kind, lead + len(opener))
                return True
        if not final and any(opener.startswith(rest) for opener in BOUNDARY_OPENERS):
            return False
        self.state = _TEXT
        return True

    def _text(self, out: list[OutputEvent], final: bool) -> bool:
        """Inside prose: stream it, holding back only a tail that may become an opener."""
        buf = self.buf
        found = -1
        if "<" in buf or "[" in buf:
            for opener in OPENERS:
                at = buf.find(opener)
                if at >= 0 and (found < 0 or at < found):
                    found, kind = at, OPENERS[opener]
        if found >= 0:
            _content(out, buf[:found])
            self.buf = buf[found:]
            self._open(kind, len(_opener(kind)))
            return True
        keep = 0 if final else max(partial_suffix(buf, opener) for opener in OPENERS)
        _content(out, buf[:len(buf) - keep])
        self.buf = buf[len(buf) - keep:]
        return False

    def _open(self, kind: str, pos: int) -> None:
        self.state = _WRAPPER
        self.wrapper = w = _Wrapper(kind, pos)
        if kind == "bare":
            self._start_json(w, pos)

    def _start_json(self, w: _Wrapper, at: int) -> None:
        w.phase = "json"
        w.json_start = w.pos = at
        w.scanner = JsonEnd()
        w.decided = w.name is not None or w.valid > 0  # early refusal only while nothing is a call

    def _wrapper(self, out: list[OutputEvent], final: bool) -> bool:
        w = self.wrapper
        assert w is not None
        buf = self.buf
        while True:
            if w.phase == "json":
                if not w.decided:
                    verdict, n = plausible_start(self.toolbox, buf[w.json_start:w.json_start + 256])
                    if verdict is False:
                        return self._close(out, w.json_start + n)
                    w.decided = verdict is True
                end = w.scanner.scan(buf, w.pos)
                if end < 0:
                    w.pos = len(buf)
                    if not final:
                        return False
                    w.invalid.append(buf[w.json_start:])
                    return self._close(out, len(buf))
                self._element(out, w, buf[w.json_start:end])
                w.pos = w.end = end
                if w.kind == "bare":
                    return self._close(out, end)
                w.phase = "inner"
                continue
            if w.phase == "lang":
                m = _WORD.match(buf, w.pos)
                if m.end() == len(buf) and not final:
                    return False
                w.pos = w.end = m.end()
                if m.group().lower() not in FENCE_LANGS:
                    return self._close(out, w.end)
                w.phase = "inner"
                continue
            if w.phase == "name":
                return self._mistral_name(out, w, final)
            # inner: between the calls of a wrapper
            m = _NON_WS.search(buf, w.pos)
            if m is None:
                if final:
                    return self._close(out, w.end)
                return False
            at, c = m.start(), m.group()
            if c == "{":
                self._start_json(w, at)
                continue
            if c == "[" and w.bracket == 0 and w.elements == 0:
                w.bracket = 1
            elif c == "]" and w.bracket == 1:
                w.bracket = 2
            elif c in ",;" and w.elements:
                pass
            else:
                closer = CLOSERS.get(w.kind)
                if closer is not None:
                    if buf.startswith(closer, at):
                        return self._close(out, at + len(closer))
                    if len(buf) - at < len(closer) and closer.startswith(buf[at:]):
                        if final:  # cut off inside the closer: it was the closer
                            return self._close(out, len(buf))
                        return False
                if w.kind == "mistral" and w.elements == 0 and w.bracket == 0 and _NAME.match(c).end():
                    w.phase, w.pos = "name", at
                    continue
                return self._close(out, w.end)
            w.pos = w.end = at + 1

    def _mistral_name(self, out: list[OutputEvent], w: _Wrapper, final: bool) -> bool:
        """[TOOL_CALLS]name[ARGS]{…} or [TOOL_CALLS]name[CALL_ID]id[ARGS]{…} (Mistral Small 3.2+)."""
        buf = self.buf
        m = _NAME.match(buf, w.pos)
        after = m.end()
        if after - w.pos > MAX_NAME:
            return self._close(out, w.end)
        rest = buf[after:]
        if rest.startswith(CALL_ID):
            ident = _CALL_ID_BODY.match(buf, after + len(CALL_ID))
            after, rest = ident.end(), buf[ident.end():]
        if rest.startswith(ARGS):
            args = after + len(ARGS)
            if len(buf) == args and not final:
                return False
            if buf.startswith("{", args):
                w.name = m.group()
                self._start_json(w, args)
                return True
            return self._close(out, w.end)
        if not final and (not rest or ARGS.startswith(rest) or CALL_ID.startswith(rest)):
            return False
        return self._close(out, w.end)

    def _element(self, out: list[OutputEvent], w: _Wrapper, text: str) -> None:
        w.elements += 1
        if w.name is not None:
            name, w.name = w.name, None
            call = self.toolbox.call_text(f'{{"name": {json.dumps(name)}, "arguments": {text}}}')
            text = f"{name}{ARGS}{text}"
        else:
            call = self.toolbox.call_text(text)
        if call is None:
            w.invalid.append(text)
            return
        w.valid += 1
        self.called = True
        if self.calls and not self.parallel:
            return  # at most one call: a further one is dropped, not shown
        name, arguments = call
        index = len(self.calls)
        call_id = new_call_id()
        self.calls.append(ToolCall(call_id, name, arguments))
        out.append(ToolCallStart(index, call_id, name))
        out.append(ToolCallArguments(index, arguments))

    def _close(self, out: list[OutputEvent], end: int) -> bool:
        """End the wrapper at buf[end]; what follows goes back to the boundary (after a call) or prose."""
        w = self.wrapper
        assert w is not None
        self.wrapper = None
        if w.valid:
            if w.invalid:
                _content(out, "\n".join(w.invalid))
            self.state = _BOUNDARY
        else:
            _content(out, self.buf[:end])
            self.state = _TEXT
        self.buf = self.buf[end:]
        return True


def _opener(kind: str) -> str:
    return next(opener for opener, k in BOUNDARY_OPENERS.items() if k == kind)


def _content(out: list[OutputEvent], text: str) -> None:
    if not text:
        return
    if out and isinstance(out[-1], Content):
        out[-1] = Content(out[-1].text + text)
    else:
        out.append(Content(text))
