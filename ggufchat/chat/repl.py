"""The terminal chat as plain functions over the engine facade (simonw/llm's _run_chat habit).

Replies go to `out` (stdout); everything else (stats, notices) to `err`, so `chat -p ... > file` holds
only the reply.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ggufchat.chat.conversation import RawConversation, TemplateConversation
from ggufchat.engine import Delta, Engine, GenerationRequest, SamplingParams
from ggufchat.engine.types import Finish
from ggufchat.errors import ContextOverflow

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
    return (f"[prompt {u.prompt_tokens} tokens ({u.cached_tokens} cached), "
            f"time to first token {u.time_to_first_token * 1000:.0f} ms, "
            f"{u.completion_tokens} tokens at {u.decode_tokens_per_second:.1f} tokens/s, {finish.reason}]")


def stream_tokens(engine: Engine, tokens: list[int], cfg: ChatConfig,
                  out: TextIO) -> tuple[str, list[int], Finish]:
    """Stream one reply to `out`. Ctrl-C stops the reply; the text so far is returned."""
    stream = engine.submit(GenerationRequest(tokens, cfg.sampling, max_tokens=cfg.max_tokens, stop=cfg.stop,
                                             ignore_eos=cfg.ignore_eos))
    parts: list[str] = []
    ids: list[int] = []
    try:
        for event in stream:
            if isinstance(event, Delta):
                ids += event.token_ids
                if event.text:
                    parts.append(event.text)
                    out.write(event.text)
                    out.flush()
    except KeyboardInterrupt:
        stream.cancel()
        for event in stream:  # drain to the Finish so the engine and the stream agree
            if isinstance(event, Delta):
                ids += event.token_ids
                parts.append(event.text)
    assert stream.finish is not None
    return "".join(parts), ids, stream.finish


def one_shot(engine: Engine, prompt: str, cfg: ChatConfig, *, convo: Conversation | None = None,
             out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> Finish:
    convo = convo or TemplateConversation(engine, cfg.system)
    convo.add_user(prompt)
    text, _, finish = stream_tokens(engine, convo.prompt_tokens(), cfg, out)
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
                text, ids, finish = stream_tokens(self.engine, self.convo.prompt_tokens(), self.cfg, self.out)
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
