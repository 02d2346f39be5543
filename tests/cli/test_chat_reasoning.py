"""A reasoning model's thinking in `ggufchat chat`: apart from the answer, dimmed, on stderr with -p,
hidden with --hide-thinking, raw with --reasoning-format none, and never kept in the conversation.

End to end with the embedded SmolLM2 and a ChatML template whose generation prompt opens <think> (as
DeepSeek-R1's and Qwen3's do): given an example in the system prompt, greedy SmolLM2 writes a line of
"thinking", then </think>, then the answer. The rendering seam itself (</think> split across deltas,
colour on and off) runs on a scripted stream.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from ggufchat.chat.conversation import RawConversation, TemplateConversation
from ggufchat.chat.repl import ChatConfig, one_shot, output_format, run_repl
from ggufchat.engine import Delta, Finish
from ggufchat.engine.types import Usage
from tests.conftest import run_cli

THINK_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n<think>\\n' }}{%- endif -%}"
)
EXAMPLE = ("Answer like this example.\nQ: What is 1+1?\nA: <think>\nOne plus one is two.\n</think>\n"
           "The answer is 2.")
QUESTION = "What is 2+2?"
# What greedy SmolLM2-135M writes after the prompt's "<think>\n" (checked below with --reasoning-format none).
THOUGHT = "Two plus two is four."
ANSWER = "The answer is 4."
DIM = "\x1b[2m"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("templates") / "think.jinja"
    path.write_text(THINK_TEMPLATE, encoding="utf-8")
    return path


def _chat(template: Path, *args: str, input: str | None = None, env: dict | None = None):
    return run_cli("chat", "--chat-template-file", str(template), "--system", EXAMPLE, "--temp", "0", "-n", "40",
                   *args, input=input, env=env)


def plain(text: str) -> str:
    """`text` without its colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# ------------------------------------------------------------------ end to end, the real model

def test_raw_format_prints_the_text_tags_and_all(template: Path):
    result = _chat(template, "-p", QUESTION, "--reasoning-format", "none")
    assert result.returncode == 0, result.stderr
    # The opening tag was the prompt's; the model wrote the rest, </think> included.
    assert result.stdout == f"{THOUGHT}\n</think>\n{ANSWER}\n"
    assert "[thinking]" not in result.stdout + result.stderr


def test_one_shot_prints_only_the_answer_on_stdout(template: Path):
    result = _chat(template, "-p", QUESTION)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{ANSWER}\n"
    # NO_COLOR (run_cli sets it): the thinking stands between plain marker lines, then a blank line.
    assert f"[thinking]\n{THOUGHT}\n[/thinking]\n\n" in result.stderr
    assert "</think>" not in result.stdout + result.stderr


def test_one_shot_thinking_is_dimmed_with_colour(template: Path):
    result = _chat(template, "-p", QUESTION, "--color", env={"NO_COLOR": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{ANSWER}\n"  # the answer is never dimmed
    # Each streamed piece is dimmed on its own (a stopped reply never leaves the terminal dim).
    assert DIM in result.stderr
    assert f"\n{THOUGHT}\n\n" in "\n" + plain(result.stderr)
    assert "[thinking]" not in result.stderr


def test_hide_thinking(template: Path):
    result = _chat(template, "-p", QUESTION, "--hide-thinking")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{ANSWER}\n"
    assert THOUGHT not in result.stderr and "[thinking]" not in result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("[thought for ")]
    assert len(notes) == 1 and notes[0].endswith(" tokens]"), result.stderr
    assert int(notes[0].split()[2]) >= 5  # "Two plus two is four.\n</think>" is several tokens


def test_interactive_shows_the_thinking_and_keeps_only_the_answer(template: Path, tmp_path: Path):
    saved = tmp_path / "chat.json"
    result = _chat(template, "-i", input=f"{QUESTION}\n/save {saved}\n")
    assert result.returncode == 0, result.stderr
    # In the REPL both go to stdout: thinking, blank line, answer.
    assert f"[thinking]\n{THOUGHT}\n[/thinking]\n\n{ANSWER}\n" in result.stdout
    messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert messages == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]


def test_reasoning_format_takes_deepseek_or_none():
    result = run_cli("chat", "-p", "hi", "--reasoning-format", "bogus")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr


def test_a_template_without_think_is_not_split():
    # The embedded model's own template knows no <think>: the reply is printed as it comes, as always.
    plain = run_cli("chat", "-p", "Say <think>hi</think>", "-n", "16", "--temp", "0")
    raw = run_cli("chat", "-p", "Say <think>hi</think>", "-n", "16", "--temp", "0", "--reasoning-format", "none")
    assert plain.returncode == 0 and raw.returncode == 0, plain.stderr + raw.stderr
    assert plain.stdout == raw.stdout and "[thinking]" not in plain.stderr


# ------------------------------------------------------------------ the rendering seam, on a scripted stream

class FakeStream:
    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.finish: Finish | None = None

    def __iter__(self):
        for i, text in enumerate(self.pieces):
            yield Delta(text, [i])
        self.finish = Finish("stop", Usage(completion_tokens=len(self.pieces)))
        yield self.finish

    def cancel(self) -> None:
        pass


class FakeEngine:
    """Just the facade calls the chat makes: a template with <think>, a rendered prompt, and a reply
    scripted as deltas."""

    def __init__(self, pieces: list[str], prompt_end: str = "<|im_start|>assistant\n<think>\n") -> None:
        self.template = SimpleNamespace(source=THINK_TEMPLATE)
        self.pieces = pieces
        self.prompt_end = prompt_end
        self.prompts: list[list[dict]] = []

    def render_chat(self, messages: list[dict]) -> str:
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + self.prompt_end

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        self.prompts.append([dict(m) for m in messages])
        return [1, 2, 3]

    def submit(self, request) -> FakeStream:
        return FakeStream(self.pieces)


# "</think>" arrives in three deltas; the blank space around the thinking is not printed.
SPLIT = ["Let me", " think.\n</", "thi", "nk>\n\nThe answer", " is 4."]


def _repl(engine, cfg: ChatConfig, messages: list[str]) -> tuple[str, str, TemplateConversation]:
    out, err = io.StringIO(), io.StringIO()
    convo = TemplateConversation(engine, None)
    script = iter(messages)

    def read(prompt: str) -> str:
        try:
            return next(script)
        except StopIteration:
            raise EOFError from None

    run_repl(engine, cfg, convo=convo, read=read, out=out, err=err)
    return out.getvalue(), err.getvalue(), convo


def test_closing_tag_split_across_deltas():
    engine = FakeEngine(SPLIT)
    out, err, convo = _repl(engine, ChatConfig(), ["What is 2+2?", "And 3+3?"])
    reply = "[thinking]\nLet me think.\n[/thinking]\n\nThe answer is 4.\n"
    assert out == reply * 2 + "\n"
    assert err == ""
    # The second turn's prompt holds the first answer alone.
    assert engine.prompts[1][1] == {"role": "assistant", "content": "The answer is 4."}
    assert convo.history[-1] == {"role": "assistant", "content": "The answer is 4."}


def test_every_split_of_the_reply_prints_the_same():
    text = "".join(SPLIT)
    whole, _, _ = _repl(FakeEngine([text]), ChatConfig(color=True), ["q"])
    assert whole == f"{DIM}Let me think.\x1b[0m\n\nThe answer is 4.\n\n"  # dim thinking, blank line, answer
    for pieces in (list(text), [text[:7], text[7:]], SPLIT):
        out, _, convo = _repl(FakeEngine(pieces), ChatConfig(color=True), ["q"])
        assert plain(out) == plain(whole), pieces
        assert DIM in out and "The answer" not in out.split("\n\n")[0]
        assert convo.history[-1]["content"] == "The answer is 4."


def test_model_that_opens_its_own_think_tag():
    # The prompt does not open <think>; the model writes both tags.
    engine = FakeEngine(["<thi", "nk>\nHmm.", "</think>", "Yes."], prompt_end="<|im_start|>assistant\n")
    out, _, convo = _repl(engine, ChatConfig(), ["q"])
    assert out == "[thinking]\nHmm.\n[/thinking]\n\nYes.\n\n"
    assert convo.history[-1]["content"] == "Yes."


def test_one_shot_and_hide_on_the_scripted_stream():
    out, err = io.StringIO(), io.StringIO()
    one_shot(FakeEngine(SPLIT), "q", ChatConfig(), out=out, err=err)
    assert out.getvalue() == "The answer is 4.\n"
    assert err.getvalue() == "[thinking]\nLet me think.\n[/thinking]\n\n"

    out, err = io.StringIO(), io.StringIO()
    one_shot(FakeEngine(SPLIT), "q", ChatConfig(hide_thinking=True), out=out, err=err)
    assert out.getvalue() == "The answer is 4.\n"
    assert err.getvalue() == "[thought for 4 tokens]\n"  # the deltas before the answer began

    out, err = io.StringIO(), io.StringIO()
    one_shot(FakeEngine(SPLIT), "q", ChatConfig(reasoning_format="none"), out=out, err=err)
    assert out.getvalue() == "".join(SPLIT) + "\n" and err.getvalue() == ""


def test_thinking_cut_short_closes_its_block():
    out, err = io.StringIO(), io.StringIO()
    one_shot(FakeEngine(["Still ", "thinking\n"]), "q", ChatConfig(), out=out, err=err)
    assert out.getvalue() == ""
    assert err.getvalue() == "[thinking]\nStill thinking\n[/thinking]\n"


class InterruptedStream(FakeStream):
    """Ctrl-C arrives before delta `at`; what the engine made meanwhile is still drained."""

    def __init__(self, pieces: list[str], at: int) -> None:
        super().__init__(pieces)
        self.at = at
        self.i = 0
        self.cancelled = False

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == self.at and not self.cancelled:
            raise KeyboardInterrupt
        if self.i == len(self.pieces):
            if self.finish is None:
                self.finish = Finish("cancelled", Usage(completion_tokens=self.i))
                return self.finish
            raise StopIteration
        self.i += 1
        return Delta(self.pieces[self.i - 1], [self.i])

    def cancel(self) -> None:
        self.cancelled = True


def test_ctrl_c_while_thinking_closes_the_block():
    engine = FakeEngine([])
    engine.submit = lambda request: InterruptedStream(["Let me", " think", " more", "</think>Ans"], at=2)
    out, err, convo = _repl(engine, ChatConfig(), ["q"])
    # What came after Ctrl-C is not printed, but the block is closed so the next prompt starts clean.
    assert out == "[thinking]\nLet me think\n[/thinking]\n\n\n"
    assert "[stopped]" in err
    assert convo.history[-1] == {"role": "assistant", "content": "Ans"}  # the answer so far, as without thinking


def test_raw_mode_is_never_split():
    engine = FakeEngine(SPLIT)
    engine.vocabulary = SimpleNamespace(prompt_start=[])
    engine.tokenize = lambda text, **_: [ord(c) for c in text]
    convo = RawConversation(engine, "", "", "")
    assert output_format(engine, convo, ChatConfig()) is None
    assert output_format(engine, TemplateConversation(engine, None), ChatConfig(reasoning_format="none")) is None
