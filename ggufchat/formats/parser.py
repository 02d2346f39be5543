"""The output parser: a stream of model text deltas in, typed events out (see events.py).

One parser per generated sequence. push() runs on the server's event loop once per token, so it does
work in proportion to the delta and holds back only what may still turn out to be markup: the two
stages (reasoning.ThinkSplitter, then tools.ToolStage on the reply) each keep their own small
buffer. With no tools and no reasoning split the text passes straight through."""

from __future__ import annotations

from dataclasses import dataclass

from ggufchat.formats.calls import Toolbox
from ggufchat.formats.events import Content, OutputEvent, Reasoning, ToolCall, ToolCallArguments, ToolSpec
from ggufchat.formats.families import GENERIC
from ggufchat.formats.reasoning import ThinkSplitter
from ggufchat.formats.tools import ToolStage


@dataclass(frozen=True)
class OutputFormat:
    """How to read one request's output."""

    reasoning: bool = False  # split <think>…</think> into Reasoning events; False: tags stay in Content
    in_reasoning: bool = False  # the prompt already opened <think>: output is reasoning until </think>
    tools: tuple[ToolSpec, ...] = ()  # empty: no tool-call parsing, all non-reasoning text is Content
    family: str = GENERIC  # informational here: the parser reads every family's markup (see tools.py)
    parallel: bool = True  # False: at most one call (a further call's text is dropped, not shown)


class OutputParser:
    """Feed it every delta with push(), then finish() once; `calls` holds the valid calls so far."""

    def __init__(self, fmt: OutputFormat) -> None:
        self.fmt = fmt
        self._tools = ToolStage(Toolbox(fmt.tools), parallel=fmt.parallel) if fmt.tools else None
        # Without tools and without a split there is nothing to find: no stage, no hold-back. With
        # tools but no split, reasoning is still recognised (shown verbatim) so that calls are looked
        # for where the reply starts, after </think>.
        self._think = (ThinkSplitter(split=fmt.reasoning, in_reasoning=fmt.in_reasoning)
                       if fmt.reasoning or self._tools is not None else None)
        self._finished = False

    @property
    def calls(self) -> list[ToolCall]:
        return self._tools.calls if self._tools is not None else []

    def push(self, text: str) -> list[OutputEvent]:
        """Events for one delta of model text (a fragment cut anywhere, even inside a tag)."""
        if not text:
            return []
        return self._run(text, final=False)

    def finish(self) -> list[OutputEvent]:
        """End of output: flush whatever was held back (an unfinished call becomes content)."""
        if self._finished:
            return []
        self._finished = True
        return self._run("", final=True)

    def _run(self, text: str, *, final: bool) -> list[OutputEvent]:
        if self._think is None:
            return [Content(text)] if text else []
        out: list[OutputEvent] = []
        reply: list[str] = []
        for piece in self._think.feed(text, final):
            if isinstance(piece, str):
                reply.append(piece)
            else:
                _add(out, piece)
        if self._tools is None:
            if reply:
                _add(out, Content("".join(reply)))
        elif reply or final:
            for event in self._tools.feed("".join(reply), final):
                _add(out, event)
        return out


def _add(out: list[OutputEvent], event: OutputEvent) -> None:
    """Append, merging with the previous event when both are text of the same kind."""
    if out and type(out[-1]) is type(event) and isinstance(event, (Content, Reasoning)):
        out[-1] = type(event)(out[-1].text + event.text)
    elif (out and isinstance(event, ToolCallArguments) and isinstance(out[-1], ToolCallArguments)
          and out[-1].index == event.index):
        out[-1] = ToolCallArguments(event.index, out[-1].fragment + event.fragment)
    else:
        out.append(event)


def parse_output(text: str, fmt: OutputFormat) -> tuple[str, str, list[ToolCall]]:
    """A whole output at once: (content, reasoning, calls)."""
    parser = OutputParser(fmt)
    events = parser.push(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
    return content, reasoning, parser.calls
