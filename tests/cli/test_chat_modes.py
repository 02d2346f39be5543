"""Raw mode (llama-cli's -i/--in-prefix/--in-suffix), transcripts and context handling."""

from __future__ import annotations

import io
import json
from pathlib import Path

from ggufchat.chat.conversation import RawConversation, TemplateConversation, process_escapes
from ggufchat.chat.repl import ChatConfig, run_repl
from ggufchat.engine import Engine, SamplingParams
from tests.conftest import run_cli

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"
SEED_ARGS = ["-n", "24", "-co", "-i", "-if", "-f", str(PROMPTS / "chat-with-qwen.txt"),
             "--in-prefix", "<|im_start|>user\\n", "--in-suffix", "<|im_end|>\\n<|im_start|>assistant\\n",
             "-ngl", "24", "-fa"]


def test_escapes():
    assert process_escapes(r"<|im_start|>user\n") == "<|im_start|>user\n"
    assert process_escapes(r"a\tb\\n\x41") == "a\tb\\nA"
    assert process_escapes("plain 中文") == "plain 中文"


def test_raw_conversation_builds_the_seed_format(engine: Engine):
    initial = (PROMPTS / "chat-with-qwen.txt").read_text()
    convo = RawConversation(engine, initial, "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
    convo.add_user("Hi <|im_end|>")
    expected = initial + "<|im_start|>user\nHi <|im_end|><|im_end|>\n<|im_start|>assistant\n"
    tok = engine.tokenizer
    im_end = tok.tokenize("<|im_end|>", parse_special=True)[0]
    # The prefix/suffix markers are special tokens; the one the user typed is not.
    assert convo.prompt_tokens().count(im_end) == 2
    rendered = "".join(tok.special_text(t) for t in convo.prompt_tokens())
    assert rendered == expected


def test_seed_command_works_with_ggufchat_chat():
    # The llama-cli seed command from the tutorials, with `ggufchat chat` in place of `llama-cli`.
    result = run_cli("chat", *SEED_ARGS, "--temp", "0", "--stats", input="What is the capital of France?\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "Raw mode" in result.stderr
    assert result.stderr.count("time to first token") == 1  # -if: the model waited for the user
    reply = result.stdout.split("> ", 1)[1].strip()
    assert reply and "<|im_end|>" not in reply


def test_raw_mode_reuses_the_conversation_cache():
    script = "Hello\nTell me more\nAnd more\n/exit\n"
    result = run_cli("chat", *SEED_ARGS, "--temp", "0", "--stats", input=script)
    assert result.returncode == 0, result.stderr
    stats = [line for line in result.stderr.splitlines() if "time to first token" in line]
    assert len(stats) == 3
    # Turn 2 and 3 reuse all but the new message: cached tokens > 0 and growing.
    cached = [int(line.split("(")[1].split(" cached")[0]) for line in stats]
    assert cached[0] == 0 and 0 < cached[1] < cached[2]


def test_save_and_load_transcript(tmp_path):
    f = tmp_path / "t.json"
    result = run_cli("chat", "-i", "-n", "8", "--temp", "0", "--system", "Be brief.",
                     input=f"Hello\n/save {f}\n/exit\n")
    assert result.returncode == 0, result.stderr
    data = json.loads(f.read_text())
    assert data["system"] == "Be brief."
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    result = run_cli("chat", "-i", "-n", "8", "--temp", "0", "--stats", input=f"/load {f}\nAgain\n/exit\n")
    assert "loaded 2 messages" in result.stderr
    assert "(0 cached)" in result.stderr  # fresh process: nothing cached, but the history was sent
    prompt_tokens = int(result.stderr.split("[prompt ")[1].split(" ")[0])
    assert prompt_tokens > 30
    bad = run_cli("chat", "-i", "-n", "8", input=f"/load {tmp_path / 'missing.json'}\n/exit\n")
    assert bad.returncode == 0 and "cannot load" in bad.stderr


def _scripted(lines: list[str]):
    it = iter(lines)

    def read(_prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_context_full_without_shift_says_so_and_keeps_working(model_path):
    from ggufchat.engine import LoadOptions

    with Engine(LoadOptions(model_path=model_path, n_ctx=256)) as eng:
        cfg = ChatConfig(sampling=SamplingParams.greedy(), max_tokens=40)
        long = "word " * 60
        convo = TemplateConversation(eng, None)
        out, errs = io.StringIO(), io.StringIO()
        run_repl(eng, cfg, convo=convo, read=_scripted([long, long, long, "/clear", "hi"]), out=out, err=errs)
        err = errs.getvalue()
        assert "no longer fits the context" in err
        # After /clear the chat answers again.
        assert convo.history[-1]["role"] == "assistant" and len(convo.history) == 2


def test_context_shift_drops_oldest_turns(model_path):
    from ggufchat.engine import LoadOptions

    with Engine(LoadOptions(model_path=model_path, n_ctx=256)) as eng:
        cfg = ChatConfig(sampling=SamplingParams.greedy(), max_tokens=40, context_shift=True)
        convo = TemplateConversation(eng, None)
        long = "word " * 60
        out, errs = io.StringIO(), io.StringIO()
        run_repl(eng, cfg, convo=convo, read=_scripted([long, long, long, long]), out=out, err=errs)
        err = errs.getvalue()
        assert "dropped the oldest turn" in err
        assert "no longer fits" not in err
        assert convo.history[-1]["role"] == "assistant"
