"""What a chat remembers between turns, in the two modes llama.cpp's CLI has.

Both hand the engine the whole conversation as tokens each turn; the engine's prefix reuse makes that
cost only the new tokens, since the conversation's sequence keeps its KV between turns.
"""

from __future__ import annotations

import re

from ggufchat.engine import Engine
from ggufchat.engine.types import Finish

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f",
            "v": "\v", "0": "\0"}
_ESCAPE_RE = re.compile(r"\\(x[0-9a-fA-F]{2}|.)", re.DOTALL)


def process_escapes(text: str) -> str:
    r"""Interpret \n, \t, \\, \xHH ... as llama-cli does for --in-prefix, --in-suffix and -r."""

    def repl(m: re.Match) -> str:
        code = m.group(1)
        if code.startswith("x") and len(code) == 3:
            return chr(int(code[1:], 16))
        return _ESCAPES.get(code, m.group(0))

    return _ESCAPE_RE.sub(repl, text)


class TemplateConversation:
    """Messages rendered through the model's chat template."""

    def __init__(self, engine: Engine, system: str | None) -> None:
        self.engine = engine
        self.system = system
        self.history: list[dict] = []

    def _messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def add_user(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})

    def prompt_tokens(self) -> list[int]:
        return self.engine.chat_tokens(self._messages())

    def prompt_text(self) -> str:
        """The rendered prompt (to see whether the template opens <think> for the reply)."""
        return self.engine.render_chat(self._messages())

    def add_reply(self, text: str, token_ids: list[int], finish: Finish) -> None:
        # `text` is the answer alone: a reasoning model's thinking is not kept, as its template expects.
        self.history.append({"role": "assistant", "content": text})

    def undo_user(self) -> None:
        if self.history and self.history[-1]["role"] == "user":
            self.history.pop()

    def drop_reply(self) -> bool:
        """Forget the last reply so it can be generated again; False when there is none."""
        if self.history and self.history[-1]["role"] == "assistant":
            self.history.pop()
            return True
        return False

    def drop_oldest_turn(self) -> bool:
        """Context shift: forget the oldest user/assistant exchange, keeping the system prompt."""
        if len(self.history) <= 1:
            return False
        del self.history[:2]
        return True

    def clear(self) -> None:
        self.history.clear()

    def set_system(self, text: str | None) -> None:
        self.system = text
        self.history.clear()

    def transcript(self) -> dict:
        return {"mode": "template", "system": self.system, "messages": list(self.history)}

    def load(self, data: dict) -> None:
        self.system = data.get("system")
        self.history = [{"role": m["role"], "content": m["content"]} for m in data.get("messages", [])]


class RawConversation:
    """A token stream, as llama-cli's -i/--in-prefix/--in-suffix mode builds it.

    The initial prompt (-f FILE) and the prefix/suffix are text with special tokens in them
    (`<|im_start|>user\\n`); what the user types is tokenized with special-token parsing off.
    """

    def __init__(self, engine: Engine, initial: str, in_prefix: str, in_suffix: str) -> None:
        self.engine = engine
        self.initial = initial
        self.in_prefix = in_prefix
        self.in_suffix = in_suffix
        self._start = self._initial_tokens()
        self.tokens = list(self._start)
        self._turns: list[int] = []  # where each user turn starts in self.tokens
        self._reply_start: int | None = None
        self.messages: list[dict] = []

    def _initial_tokens(self) -> list[int]:
        return self.engine.vocabulary.prompt_start + self._special(self.initial)

    def _special(self, text: str) -> list[int]:
        return self.engine.tokenize(text, add_special=False, parse_special=True) if text else []

    def _plain(self, text: str) -> list[int]:
        return self.engine.tokenize(text, add_special=False, parse_special=False)

    @property
    def system(self) -> str | None:
        return self.initial or None

    def add_user(self, text: str) -> None:
        self._turns.append(len(self.tokens))
        self.tokens += self._special(self.in_prefix)
        self.tokens += self._plain(text)
        self.tokens += self._special(self.in_suffix)
        self._reply_start = len(self.tokens)
        self.messages.append({"role": "user", "content": text})

    def prompt_tokens(self) -> list[int]:
        if self._reply_start is None:
            self._reply_start = len(self.tokens)
        return list(self.tokens)

    def add_reply(self, text: str, token_ids: list[int], finish: Finish) -> None:
        # Keep the end-of-generation token in the stream, as llama-cli does, so the next in_prefix
        # follows a closed turn.
        self.tokens += token_ids + ([finish.eog_token] if finish.eog_token is not None else [])
        self.messages.append({"role": "assistant", "content": text})

    def undo_user(self) -> None:
        if self._turns and self.messages and self.messages[-1]["role"] == "user":
            del self.tokens[self._turns.pop():]
            self.messages.pop()
            self._reply_start = None

    def drop_reply(self) -> bool:
        if self._reply_start is None or not self.messages or self.messages[-1]["role"] != "assistant":
            return False
        del self.tokens[self._reply_start:]
        self.messages.pop()
        return True

    def drop_oldest_turn(self) -> bool:
        if len(self._turns) < 2:
            return False
        cut, end = self._turns[0], self._turns[1]
        n = end - cut
        del self.tokens[cut:end]
        self._turns = [t - n for t in self._turns[1:]]
        if self._reply_start is not None:
            self._reply_start -= n
        del self.messages[:2]
        return True

    def clear(self) -> None:
        self.tokens = list(self._start)
        self._turns.clear()
        self._reply_start = None
        self.messages.clear()

    def set_system(self, text: str | None) -> None:
        self.initial = text or ""
        self._start = self._initial_tokens()
        self.clear()

    def transcript(self) -> dict:
        return {"mode": "raw", "initial": self.initial, "in_prefix": self.in_prefix, "in_suffix": self.in_suffix,
                "messages": list(self.messages)}

    def load(self, data: dict) -> None:
        self.set_system(data.get("initial", self.initial))
        messages = data.get("messages", [])
        for m in messages:
            if m["role"] == "user":
                self.add_user(m["content"])
            else:
                self.tokens += self._plain(m["content"])
                self.messages.append({"role": "assistant", "content": m["content"]})
