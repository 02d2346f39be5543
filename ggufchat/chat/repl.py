"""The terminal chat as plain functions over the engine facade (simonw/llm's _run_chat habit).

Replies go to `out` (stdout); everything else (stats, notices) to `err`, so `chat -p ... > file` holds
only the reply.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from ggufchat.engine import Delta, Engine, GenerationRequest, SamplingParams
from ggufchat.engine.types import Finish
from ggufchat.errors import ContextOverflow

HELP = """Commands:
  /help           this help
  /clear          start a new conversation (keeps the system prompt)
  /regen          answer the last message again
  /system TEXT    set the system prompt and start over
  /stats          show the last reply's token counts and speeds
  /exit           leave (Ctrl-D or Ctrl-C at an empty prompt also leaves)
End a line with \\ to continue the message on the next line."""


@dataclass
class ChatConfig:
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stats: bool = False
    color: bool = False


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


def stream_reply(engine: Engine, messages: list[dict], cfg: ChatConfig, out: TextIO) -> tuple[str, Finish]:
    """Stream one reply to `out`. Ctrl-C stops the reply; the text so far is returned."""
    tokens = engine.chat_tokens(messages)
    stream = engine.submit(GenerationRequest(tokens, cfg.sampling, max_tokens=cfg.max_tokens, stop=cfg.stop))
    parts: list[str] = []
    try:
        for event in stream:
            if isinstance(event, Delta) and event.text:
                parts.append(event.text)
                out.write(event.text)
                out.flush()
    except KeyboardInterrupt:
        stream.cancel()
        for event in stream:  # drain to the Finish so the engine and the stream agree
            if isinstance(event, Delta):
                parts.append(event.text)
    assert stream.finish is not None
    return "".join(parts), stream.finish


def one_shot(engine: Engine, prompt: str, cfg: ChatConfig, out: TextIO = sys.stdout,
             err: TextIO = sys.stderr) -> Finish:
    messages = ([{"role": "system", "content": cfg.system}] if cfg.system else [])
    messages.append({"role": "user", "content": prompt})
    text, finish = stream_reply(engine, messages, cfg, out)
    if text and not text.endswith("\n"):
        out.write("\n")
    out.flush()
    if finish.error is not None:
        raise finish.error
    if cfg.stats:
        print(format_stats(finish), file=err)
    return finish


def run_repl(engine: Engine, cfg: ChatConfig, *, read: Callable[[str], str] = input,
             out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
    style = Style(cfg.color)
    system = cfg.system
    history: list[dict] = []
    last: Finish | None = None

    def base() -> list[dict]:
        return [{"role": "system", "content": system}] if system else []

    while True:
        try:
            line = _read_message(read, style.prompt("> "), style.prompt(". "))
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit", "/bye"):
                return
            if cmd == "/help":
                print(HELP, file=err)
            elif cmd == "/clear":
                history.clear()
                print(style.dim("[conversation cleared]"), file=err)
            elif cmd == "/system":
                system = arg.strip() or None
                history.clear()
                print(style.dim("[system prompt set; conversation cleared]"), file=err)
            elif cmd == "/stats":
                print(style.dim(format_stats(last)) if last else "[no reply yet]", file=err)
            elif cmd == "/regen":
                if not history or history[-1]["role"] != "assistant":
                    print("[nothing to regenerate]", file=err)
                    continue
                history.pop()
                last = _answer(engine, base() + history, history, cfg, out, err, style)
            else:
                print(f"[unknown command {cmd}; /help lists them]", file=err)
            continue
        history.append({"role": "user", "content": line})
        last = _answer(engine, base() + history, history, cfg, out, err, style)


def _answer(engine: Engine, messages: list[dict], history: list[dict], cfg: ChatConfig, out: TextIO,
            err: TextIO, style: Style) -> Finish | None:
    try:
        reply, finish = stream_reply(engine, messages, cfg, out)
    except ContextOverflow as exc:
        history.pop()
        print(f"[the conversation no longer fits the context ({exc.n_prompt} of {exc.n_ctx} tokens); "
              "/clear starts over, or restart with a larger -c]", file=err)
        return None
    out.write("\n")
    out.flush()
    if finish.reason == "cancelled":
        print(style.dim("[stopped]"), file=err)
    if finish.error is not None:
        print(f"[error: {finish.error}]", file=err)
    history.append({"role": "assistant", "content": reply})
    if cfg.stats:
        print(style.dim(format_stats(finish)), file=err)
    return finish


def _read_message(read: Callable[[str], str], prompt: str, more: str) -> str:
    lines = [read(prompt)]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read(more))
    return "\n".join(lines)
