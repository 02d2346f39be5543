"""The terminal chat as plain functions over the engine facade (simonw/llm's _run_chat habit).

Replies go to `out` (stdout); everything else (stats, notices) to `err`, so `chat -p ... > file` holds
only the reply.

A reasoning model's thinking (`<think>...</think>`, split off by the formats parser as the server splits
it) streams dimmed before the answer, in the REPL on `out` and with -p on `err`; only the answer goes
into the conversation, as reasoning models' chat templates expect.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

from ggufchat import formats
from ggufchat.chat.conversation import RawConversation, TemplateConversation
from ggufchat.engine import Delta, Engine, GenerationRequest, SamplingParams
from ggufchat.engine.types import Finish
from ggufchat.errors import ContextOverflow
from ggufchat.formats.events import Content, OutputEvent, Reasoning

HELP = """Commands:
  /help           this help
  /clear          start a new conversation (keeps the system prompt)
  /regen          answer the last message again
  /system TEXT    set the system prompt and start over
  /save FILE      save the conversation as JSON
  /load FILE      load a conversation saved with /save
  /stats          show the last reply's token counts and speeds
  /exit           leave (Ctrl-D or Ctrl-C at an empty prompt also leaves)
Ctrl-C stops a reply. End a line with \\ to continue the message on the next line."""

Conversation = TemplateConversation | RawConversation


@dataclass
class ChatConfig:
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stats: bool = False
    color: bool = False
    context_shift: bool = False
    ignore_eos: bool = False
    # deepseek: show a reasoning model's <think> text apart from the answer; none: print the raw text.
    reasoning_format: Literal["deepseek", "none"] = "deepseek"
    hide_thinking: bool = False  # print only "[thought for N tokens]" (stderr) instead of the thinking


class Style:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled else text

    def prompt(self, text: str) -> str:
        return self._wrap("1;32", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)


def format_stats(finish: Finish) -> str:
    u = finish.usage
    spec = (f", {u.accepted_tokens}/{u.drafted_tokens} drafted tokens accepted" if u.drafted_tokens else "")
    return (f"[prompt {u.prompt_tokens} tokens ({u.cached_tokens} cached), "
            f"time to first token {u.time_to_first_token * 1000:.0f} ms, "
            f"{u.completion_tokens} tokens at {u.decode_tokens_per_second:.1f} tokens/s{spec}, {finish.reason}]")


def output_format(engine: Engine, convo: Conversation, cfg: ChatConfig) -> formats.OutputFormat | None:
    """How this turn's reply is read, as the server reads it: the thinking is split off when
    --reasoning-format is deepseek and the chat template knows <think>; the reply starts inside the
    thinking when the rendered prompt itself opens <think>. None: the raw text (raw mode has no template)."""
    if cfg.reasoning_format != "deepseek" or not isinstance(convo, TemplateConversation) \
            or "<think>" not in engine.template.source:
        return None
    return formats.OutputFormat(reasoning=True, in_reasoning=formats.opens_reasoning(convo.prompt_text()))


class ReplyPrinter:
    """One reply on the terminal as it streams in.

    Without a format the text goes to `out` as it comes. With one, the parser splits the thinking from
    the answer: the answer goes to `out`; the thinking goes to `thinking`, dimmed (without colour between
    a "[thinking]" and a "[/thinking]" line), then a blank line, then the answer. With `hide` the thinking
    is not printed; a dim "[thought for N tokens]" line goes to `err` instead. Leading and trailing blank
    space around the thinking and at the start of the answer is not printed (models write "<think>\\n"
    and "</think>\\n\\n").
    """

    def __init__(self, out: TextIO, style: Style, *, fmt: formats.OutputFormat | None = None,
                 thinking: TextIO | None = None, err: TextIO | None = None, hide: bool = False) -> None:
        self.out = out
        self.style = style
        self.parser = formats.OutputParser(fmt) if fmt is not None else None
        self.thinking = thinking or out
        self.err = err or sys.stderr
        self.hide = hide
        self.quiet = False  # after Ctrl-C: keep reading what is left, print nothing more of it
        self.thinking_tokens = 0  # tokens of the reply before its answer began (the thinking and its tags)
        self._answer: list[str] = []
        self._seen_reasoning = False  # any thinking, blank included: the answer's leading blank space is dropped
        self._thought = False  # thinking with something in it
        self._answering = False
        self._block_open = False  # a thinking block is on screen and not yet closed
        self._held = ""  # the thinking's trailing blank space, printed only if more thinking follows
        self._noted = False

    @property
    def answer(self) -> str:
        """The reply without its thinking (the raw text when there is no format)."""
        return "".join(self._answer)

    def push(self, delta: Delta) -> None:
        if self.parser is None:
            self._answer.append(delta.text)
            self._write(self.out, delta.text)
            return
        if not self._answering:
            self.thinking_tokens += len(delta.token_ids)
        if delta.text:
            self._handle(self.parser.push(delta.text))

    def finish(self) -> None:
        """The reply ended (or was stopped): flush the parser and close an open thinking block."""
        if self.parser is None:
            return
        self._handle(self.parser.finish())  # quiet after Ctrl-C: the rest of the text is not printed
        self.quiet = False  # but the thinking block is closed (the colour reset, the closing line)
        self._end_thinking(blank_line=False)

    def _handle(self, events: list[OutputEvent]) -> None:
        for event in events:
            if isinstance(event, Reasoning):
                self._on_thinking(event.text)
            elif isinstance(event, Content):
                self._on_answer(event.text)
            # The terminal chat offers no tools, so no tool-call events come.

    def _on_thinking(self, text: str) -> None:
        self._seen_reasoning = True
        if not self._block_open and not self._held:
            text = text.lstrip()  # the start of a block: no leading blank lines
        if not text:
            return
        self._thought = True
        if self.hide:
            return
        if not self._block_open:
            self._block_open = True
            if not self.style.enabled:
                self._write(self.thinking, "[thinking]\n")
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body):]
        if body:
            self._write(self.thinking, self.style.dim(body))

    def _on_answer(self, text: str) -> None:
        if not self._answering:
            if self._seen_reasoning:
                text = text.lstrip()
                if not text:
                    return
            if not self.quiet:  # after Ctrl-C, finish() closes the block
                self._end_thinking(blank_line=True)
            self._answering = True
        self._answer.append(text)
        self._write(self.out, text)

    def _end_thinking(self, *, blank_line: bool) -> None:
        if self._block_open:
            self._block_open = False
            self._held = ""
            self._write(self.thinking, "\n" + ("" if self.style.enabled else "[/thinking]\n")
                        + ("\n" if blank_line else ""))
        elif self.hide and self._thought and not self._noted:
            self._noted = True
            self.out.flush()
            print(self.style.dim(f"[thought for {self.thinking_tokens} tokens]"), file=self.err, flush=True)

    def _write(self, stream: TextIO, text: str) -> None:
        if text and not self.quiet:
            stream.write(text)
            stream.flush()


def stream_tokens(engine: Engine, tokens: list[int], cfg: ChatConfig, printer: ReplyPrinter,
                  ) -> tuple[str, list[int], Finish]:
    """Stream one reply through `printer`. Ctrl-C stops the reply; the answer so far is returned."""
    stream = engine.submit(GenerationRequest(tokens, cfg.sampling, max_tokens=cfg.max_tokens, stop=cfg.stop,
                                             ignore_eos=cfg.ignore_eos))
    ids: list[int] = []
    try:
        for event in stream:
            if isinstance(event, Delta):
                ids += event.token_ids
                printer.push(event)
    except KeyboardInterrupt:
        stream.cancel()
        printer.quiet = True
        for event in stream:  # drain to the Finish so the engine and the stream agree
            if isinstance(event, Delta):
                ids += event.token_ids
                printer.push(event)
    printer.finish()
    assert stream.finish is not None
    return printer.answer, ids, stream.finish


def one_shot(engine: Engine, prompt: str, cfg: ChatConfig, *, convo: Conversation | None = None,
             out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> Finish:
    convo = convo or TemplateConversation(engine, cfg.system)
    convo.add_user(prompt)
    # stdout holds only the answer: the thinking goes to stderr.
    printer = ReplyPrinter(out, Style(cfg.color), fmt=output_format(engine, convo, cfg), thinking=err, err=err,
                           hide=cfg.hide_thinking)
    text, _, finish = stream_tokens(engine, convo.prompt_tokens(), cfg, printer)
    if text and not text.endswith("\n"):
        out.write("\n")
    out.flush()
    if finish.error is not None:
        raise finish.error
    if cfg.stats:
        print(format_stats(finish), file=err)
    return finish


class Repl:
    def __init__(self, engine: Engine, convo: Conversation, cfg: ChatConfig, *, read: Callable[[str], str],
                 out: TextIO, err: TextIO) -> None:
        self.engine = engine
        self.convo = convo
        self.cfg = cfg
        self.read = read
        self.out = out
        self.err = err
        self.style = Style(cfg.color)
        self.last: Finish | None = None

    def note(self, text: str) -> None:
        print(self.style.dim(text), file=self.err)

    def run(self, *, generate_first: bool = False) -> None:
        if generate_first:
            self.answer()
        while True:
            try:
                line = self._read_message()
            except (EOFError, KeyboardInterrupt):
                self.out.write("\n")
                return
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if self.command(text) == "exit":
                    return
                continue
            self.convo.add_user(line)
            self.answer()

    def command(self, text: str) -> str | None:
        cmd, _, arg = text.partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit", "/bye"):
            return "exit"
        if cmd == "/help":
            print(HELP, file=self.err)
        elif cmd == "/clear":
            self.convo.clear()
            self.note("[conversation cleared]")
        elif cmd == "/system":
            self.convo.set_system(arg or None)
            self.note("[system prompt set; conversation cleared]" if arg else "[system prompt removed]")
        elif cmd == "/stats":
            self.note(format_stats(self.last) if self.last else "[no reply yet]")
        elif cmd == "/regen":
            if self.convo.drop_reply():
                self.answer()
            else:
                self.note("[nothing to regenerate]")
        elif cmd == "/save":
            self._save(arg)
        elif cmd == "/load":
            self._load(arg)
        else:
            self.note(f"[unknown command {cmd}; /help lists them]")
        return None

    def answer(self) -> None:
        while True:
            try:
                printer = ReplyPrinter(self.out, self.style, fmt=output_format(self.engine, self.convo, self.cfg),
                                       err=self.err, hide=self.cfg.hide_thinking)
                text, ids, finish = stream_tokens(self.engine, self.convo.prompt_tokens(), self.cfg, printer)
                break
            except ContextOverflow as exc:
                if self.cfg.context_shift and self.convo.drop_oldest_turn():
                    self.note("[context full: dropped the oldest turn]")
                    continue
                self.convo.undo_user()
                self.note(f"[the conversation no longer fits the context ({exc.n_prompt} of {exc.n_ctx} "
                          "tokens); /clear starts over, or restart with --context-shift or a larger -c]")
                return
        self.out.write("\n")
        self.out.flush()
        self.convo.add_reply(text, ids, finish)
        self.last = finish
        if finish.reason == "cancelled":
            self.note("[stopped]")
        elif finish.reason == "length" and (self.cfg.max_tokens is None
                                            or finish.usage.completion_tokens < self.cfg.max_tokens):
            self.note("[context full: the reply was cut; /clear starts over]")
        if finish.error is not None:
            self.note(f"[error: {finish.error}]")
        if self.cfg.stats:
            self.note(format_stats(finish))

    def _save(self, path: str) -> None:
        if not path:
            self.note("[usage: /save FILE]")
            return
        try:
            Path(path).expanduser().write_text(json.dumps(self.convo.transcript(), ensure_ascii=False, indent=2),
                                               encoding="utf-8")
        except OSError as exc:
            self.note(f"[cannot save {path}: {exc.strerror}]")
            return
        self.note(f"[saved to {path}]")

    def _load(self, path: str) -> None:
        if not path:
            self.note("[usage: /load FILE]")
            return
        try:
            data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("messages", []), list):
                raise ValueError("not a ggufchat transcript")
            self.convo.load(data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.note(f"[cannot load {path}: {getattr(exc, 'strerror', None) or exc}]")
            return
        self.note(f"[loaded {len(data.get('messages', []))} messages from {path}]")

    def _read_message(self) -> str:
        lines = [self.read(self.style.prompt("> "))]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(self.read(self.style.prompt(". ")))
        return "\n".join(lines)


def run_repl(engine: Engine, cfg: ChatConfig, *, convo: Conversation | None = None, generate_first: bool = False,
             read: Callable[[str], str] = input, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
    convo = convo or TemplateConversation(engine, cfg.system)
    Repl(engine, convo, cfg, read=read, out=out, err=err).run(generate_first=generate_first)
