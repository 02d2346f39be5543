"""A reasoning model's thinking on the chat page: a collapsed <details> above the answer, plain text,
never sent back in the history.

Against a real server whose engine uses a ChatML template that opens <think> in its generation prompt:
with an example in the system prompt, greedy SmolLM2-135M writes a line of thinking, </think>, then the
answer, and the server sends the first as reasoning_content and the rest as content.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ggufchat.engine import Engine, LoadOptions
from tests.cli.test_chat_reasoning import ANSWER, EXAMPLE, QUESTION, THINK_TEMPLATE, THOUGHT
from tests.server.conftest import serve
from tests.web.conftest import ChatPage

# Every label the thinking block's summary shows, recorded as the page changes.
WATCH_SUMMARIES = """() => {
  window.summaries = [];
  new MutationObserver(() => {
    for (const s of document.querySelectorAll(".msg.assistant details.thinking summary")) {
      if (window.summaries[window.summaries.length - 1] !== s.textContent) window.summaries.push(s.textContent);
    }
  }).observe(document.getElementById("messages"), { childList: true, subtree: true, characterData: true });
}"""


@pytest.fixture(scope="module")
def think_url(model_path: Path, tmp_path_factory) -> Iterator[str]:
    template = tmp_path_factory.mktemp("templates") / "think.jinja"
    template.write_text(THINK_TEMPLATE, encoding="utf-8")
    with Engine(LoadOptions(model_path=model_path, n_seq_max=1, n_ctx=2048), chat_template_file=template) as engine:
        with serve(engine) as url:
            yield url


def test_thinking_shows_collapsed_above_the_answer(chat_page: ChatPage, think_url: str, artifacts: Path):
    chat = chat_page.open(think_url)
    sent: list[dict] = []
    chat.page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions")
                 else None)
    chat.page.locator("#system-prompt").fill(EXAMPLE)
    chat.set_number("temperature", 0)
    chat.set_number("max-tokens", 40)
    chat.page.evaluate(WATCH_SUMMARIES)
    chat.type_and_send(QUESTION)
    chat.wait_idle()

    row = chat.page.locator(".msg.assistant").last
    details = row.locator("details.thinking")
    assert details.count() == 1
    assert details.evaluate("d => d.open") is False  # collapsed
    assert details.locator(".thinking-text").text_content() == THOUGHT
    assert details.locator("summary").inner_text() == "Thought"
    assert chat.page.evaluate("window.summaries")[0] == "Thinking…"  # while it streamed
    # The answer is outside the block, in the bubble below it; the thinking is not in the bubble.
    assert chat.last_reply_text().strip() == ANSWER
    assert row.locator(".bubble details").count() == 0
    assert chat.page.locator(".msg.error").count() == 0
    assert "tokens" in row.locator(".meta").inner_text()
    assert row.evaluate("r => r.querySelector('details').compareDocumentPosition(r.querySelector('.bubble'))"
                        " & Node.DOCUMENT_POSITION_FOLLOWING") != 0
    chat.page.screenshot(path=str(artifacts / "reasoning-collapsed.png"))
    details.locator("summary").click()
    assert details.evaluate("d => d.open") is True
    assert details.locator(".thinking-text").inner_text() == THOUGHT
    chat.page.screenshot(path=str(artifacts / "reasoning-open.png"))
    chat.page.emulate_media(color_scheme="dark")
    chat.page.screenshot(path=str(artifacts / "reasoning-dark.png"))

    # The history holds the answer alone, and so does the next request.
    history = chat.history()
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[1]["content"].strip() == ANSWER
    chat.type_and_send("And 3+3?")
    chat.wait_idle()
    assert len(sent) == 2
    assert [m["role"] for m in sent[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert sent[1]["messages"][2]["content"].strip() == ANSWER
    assert THOUGHT not in json.dumps(sent[1]["messages"][2:])
    assert chat.page.locator(".msg.error").count() == 0


def _sse(*deltas: dict) -> str:
    chunks = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def test_thinking_is_text_never_html(chat_page: ChatPage, web_url: str, artifacts: Path):
    chat = chat_page.open(web_url)
    hostile = '<img src=x onerror="window.pwned = 1"> & <b>not bold</b>'
    chat.page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"},
        body=_sse({"role": "assistant"}, {"reasoning_content": "\nFirst "}, {"reasoning_content": hostile + "\n"},
                  {"content": "**Answer**"})))
    chat.type_and_send("Hi")
    chat.wait_idle()
    details = chat.page.locator(".msg.assistant details.thinking")
    details.locator("summary").click()
    assert details.locator(".thinking-text").inner_text() == "First " + hostile
    assert details.locator("img, b").count() == 0
    assert chat.page.evaluate("window.pwned") is None
    # The answer is Markdown, as before.
    assert chat.replies().last.locator("strong").inner_text() == "Answer"
    assert chat.history()[1] == {"role": "assistant", "content": "**Answer**"}
    chat.page.screenshot(path=str(artifacts / "reasoning-text.png"))


def test_a_reply_that_is_all_thinking(chat_page: ChatPage, think_url: str, artifacts: Path):
    # Without the example SmolLM2 never writes </think>: the whole reply is thinking, cut at max tokens.
    chat = chat_page.open(think_url)
    chat.set_number("temperature", 0)
    chat.set_number("max-tokens", 200)
    chat.type_and_send("Tell me a long story about a dragon.")
    summary = chat.page.locator(".msg.assistant details.thinking summary")
    summary.wait_for(timeout=60_000)
    if chat.busy():
        assert summary.inner_text() == "Thinking…"
        chat.page.screenshot(path=str(artifacts / "reasoning-streaming.png"))
    chat.wait_idle()
    row = chat.page.locator(".msg.assistant").last
    assert summary.inner_text() == "Thought"
    assert len(row.locator(".thinking-text").text_content()) > 100
    assert row.locator(".bubble").is_hidden()
    assert "cut at max tokens" in row.locator(".meta").inner_text()
    # The turn happened: it stays, with an empty answer (the thinking is not sent back).
    assert chat.history() == [{"role": "user", "content": "Tell me a long story about a dragon."},
                              {"role": "assistant", "content": ""}]
    assert chat.page.locator(".msg.error").count() == 0
