"""The chat page driven as a person uses it, in headless Chromium, against a real server and model."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import requests

from tests.server.conftest import metric, post, serve
from tests.web.conftest import ChatPage, wait_for

CJK = re.compile(r"[\u4e00-\u9fff]")


def test_reply_streams_in_and_renders_markdown(chat_page: ChatPage, url: str, artifacts: Path):
    chat = chat_page.open(url)
    chat.set_number("temperature", 0)
    chat.type_and_send("Write a Python function that adds two numbers.")
    lengths = []
    while True:  # sample the reply as it grows, until the page says it is done
        busy = chat.busy()
        lengths.append(len(chat.last_reply_text()))
        if not busy:
            break
        time.sleep(0.03)
    chat.wait_idle()
    growing = sorted(set(n for n in lengths if n))
    # Seen at several sizes on the way, not only complete at the end.
    # (Not strictly growing: "```python" is text until its line ends, then becomes a code block.)
    assert len(growing) >= 3 and growing[0] < growing[-1] / 2, lengths

    reply = chat.replies().last
    code = reply.locator("pre > code.language-python")
    assert code.count() >= 1 and "def " in code.first.inner_text()
    assert "```" not in reply.inner_text()
    history = chat.history()
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[1]["content"].startswith("```python\n")
    meta = chat.page.locator(".msg.assistant .meta").last.inner_text()
    assert re.search(r"\d+ tokens · [\d.]+ tok/s", meta), meta

    chat.page.screenshot(path=str(artifacts / "chat.png"))
    chat.page.emulate_media(color_scheme="dark")
    chat.page.screenshot(path=str(artifacts / "chat-dark.png"))

    # Copy puts the reply's Markdown source on the clipboard.
    chat.page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    chat.page.locator(".msg.assistant .meta .copy").last.click()
    assert chat.page.evaluate("navigator.clipboard.readText()") == history[1]["content"]

    chat.page.set_viewport_size({"width": 390, "height": 780})
    chat.page.wait_for_timeout(300)  # the sidebar slides away
    assert chat.page.locator("#sidebar").bounding_box()["x"] < 0
    chat.page.screenshot(path=str(artifacts / "chat-mobile.png"))
    chat.page.locator("#menu").click()
    chat.page.wait_for_timeout(300)  # the sidebar slides in
    assert chat.page.locator("#sidebar").bounding_box()["x"] >= 0
    chat.page.screenshot(path=str(artifacts / "chat-mobile-settings.png"))


def test_stop_cancels_the_sequence_on_the_server(chat_page: ChatPage, url: str, engine, artifacts: Path):
    chat = chat_page.open(url)
    chat.set_number("max-tokens", 1500)
    before = metric(url, "ggufchat_sequences_cancelled_total", 'why="disconnect"')
    chat.type_and_send("Write a very long story about a dragon who learns to read.")
    assert wait_for(lambda: len(chat.last_reply_text()) > 40, timeout=60)
    assert chat.busy() and engine.scheduler.active_count == 1
    chat.page.screenshot(path=str(artifacts / "chat-streaming.png"))
    chat.page.locator("#stop").click()

    # Aborting the fetch closed the connection; the server cancelled the sequence at its next step.
    assert wait_for(lambda: engine.scheduler.active_count == 0, timeout=5)
    assert wait_for(lambda: metric(url, "ggufchat_sequences_cancelled_total", 'why="disconnect"') == before + 1)
    chat.wait_idle(timeout=5)
    stopped_at = chat.last_reply_text()
    time.sleep(0.5)
    assert chat.last_reply_text() == stopped_at  # nothing more arrives
    assert "stopped" in chat.page.locator(".msg.assistant .meta").last.inner_text()
    history = chat.history()
    # The part that arrived stays in the conversation (far from 1500 tokens).
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert 0 < len(history[1]["content"]) < 3000
    # The page is ready for the next message.
    assert chat.page.locator("#send").is_visible() and not chat.busy()


def test_history_system_prompt_and_new_chat(chat_page: ChatPage, url: str):
    chat = chat_page.open(url)
    sent: list[dict] = []
    chat.page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions")
                 else None)
    chat.page.locator("#system-prompt").fill("You are a terse assistant.")
    chat.set_number("max-tokens", 24)
    chat.set_number("temperature", 0)

    chat.type_and_send("My name is Zorblax.")
    chat.wait_idle()
    chat.type_and_send("What is my name?")
    chat.wait_idle()
    assert len(sent) == 2
    body = sent[1]
    assert body["stream"] is True and body["max_tokens"] == 24 and body["temperature"] == 0
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][0]["content"] == "You are a terse assistant."
    assert body["messages"][2]["content"] == chat.history()[1]["content"]
    assert chat.page.locator(".msg.user").count() == 2 and chat.replies().count() == 2

    chat.page.locator("#new-chat").click()
    assert chat.page.locator(".msg").count() == 0 and chat.history() == []
    assert chat.page.locator("#empty").is_visible()
    chat.type_and_send("Hello")
    chat.wait_idle()
    assert [m["role"] for m in sent[2]["messages"]] == ["system", "user"]
    # Settings survive a reload (localStorage); the conversation is the tab's.
    chat.page.reload()
    chat.page.wait_for_function("window.ggufchat !== undefined")
    assert chat.page.locator("#system-prompt").input_value() == "You are a terse assistant."
    assert chat.page.locator("#max-tokens").input_value() == "24"


def test_chinese_round_trip(chat_page: ChatPage, url: str, artifacts: Path):
    message = "Translate to Chinese: 你好，世界"
    chat = chat_page.open(url)
    chat.set_number("temperature", 0)
    chat.type_and_send(message)
    chat.wait_idle()
    assert chat.page.locator(".msg.user .bubble").last.inner_text() == message
    shown = chat.last_reply_text()
    raw = chat.history()[1]["content"]
    assert "\ufffd" not in shown and "\ufffd" not in raw
    assert len(CJK.findall(shown)) >= 4, shown
    chat.page.screenshot(path=str(artifacts / "chat-chinese.png"))
    # The same characters as the API gives a client that decodes the whole body at once.
    api = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": message}],
                                             "temperature": 0, "max_tokens": 512})
    assert api.json()["choices"][0]["message"]["content"] == raw


def test_sse_decoding_survives_characters_split_across_reads(chat_page: ChatPage, web_url: str):
    chat = chat_page.open(web_url)
    # Feed the parser one byte per read: every multi-byte character arrives in pieces.
    events = chat.page.evaluate("""async () => {
      const text = 'data: {"t":"你好，世界 😀"}\\r\\n\\r\\ndata: {"t":"é"}\\n\\n: comment\\n\\ndata: [DONE]\\n\\n';
      const bytes = new TextEncoder().encode(text);
      let i = 0;
      const body = new ReadableStream({ pull(c) { i < bytes.length ? c.enqueue(bytes.slice(i, ++i)) : c.close(); } });
      const out = [];
      for await (const data of window.ggufchat.serverSentEvents(body)) out.push(data);
      return out;
    }""")
    assert events == ['{"t":"你好，世界 😀"}', '{"t":"é"}', "[DONE]"]


def test_server_errors_are_shown(chat_page: ChatPage, url: str):
    too_long = " ".join(["word"] * 3000)  # more than a sequence's 2048-token context (the page trims)
    expected = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": too_long}]})
    assert expected.status_code == 400
    chat = chat_page.open(url)
    chat.type_and_send(too_long)
    error = chat.page.locator(".msg.error")
    error.wait_for(timeout=30_000)
    assert error.inner_text() == expected.json()["error"]["message"]
    # The turn did not happen: out of the history, and the text is back in the box to edit.
    assert chat.history() == [] and chat.page.locator(".msg.user").count() == 0
    assert chat.page.locator("#input").input_value() == too_long


def test_api_key_asked_once_kept_and_asked_again_on_401(chat_page: ChatPage, engine, artifacts: Path):
    with serve(engine, api_keys=["webkey"]) as url:
        chat = chat_page
        page = chat.page
        chat.open(url)  # the page and its script load without the key
        dialog = page.locator("#key-dialog")
        dialog.wait_for(state="visible")
        assert page.locator("#key-reason").inner_text() == "This server needs an API key."
        # The stylesheet loaded too (a page without CSS would show the sidebar as plain flow).
        assert page.evaluate("getComputedStyle(document.querySelector('.app')).display") == "flex"
        page.screenshot(path=str(artifacts / "api-key.png"))

        page.locator("#key-input").fill("wrong")
        page.locator("#key-input").press("Enter")
        wait_for(lambda: "refused" in page.locator("#key-reason").inner_text())
        assert page.locator("#key-reason").inner_text() == "The server refused this key: invalid API key"
        page.locator("#key-input").fill("webkey")
        page.locator("#key-input").press("Enter")
        dialog.wait_for(state="hidden")
        assert page.evaluate("localStorage.getItem('ggufchat.apiKey')") == "webkey"

        chat.set_number("max-tokens", 8)
        chat.type_and_send("Hello")
        chat.wait_idle()
        assert chat.last_reply_text()

        # A reload keeps the key: no question.
        page.reload()
        page.wait_for_function("window.ggufchat !== undefined")
        page.wait_for_timeout(500)
        assert not dialog.is_visible()

        # The key changed on the server side (here: the page's key went stale): asked again, and the
        # message goes through once the right key is given.
        page.evaluate("window.ggufchat.state.key = 'stale'")
        chat.type_and_send("Hi again")
        dialog.wait_for(state="visible")
        assert "refused" in page.locator("#key-reason").inner_text()
        page.locator("#key-input").fill("webkey")
        page.locator("#key-input").press("Enter")
        chat.wait_idle()
        assert chat.replies().count() == 1 and chat.last_reply_text()
        assert [m["role"] for m in chat.history()] == ["user", "assistant"]

        # Cancelling the question shows the server's message.
        page.evaluate("window.ggufchat.state.key = ''")
        chat.type_and_send("No key")
        dialog.wait_for(state="visible")
        page.locator("#key-cancel").click()
        page.locator(".msg.error").wait_for()
        assert page.locator(".msg.error").inner_text() == \
            "this server needs an API key: send `Authorization: Bearer KEY`"
        assert requests.get(url + "/health", timeout=10).status_code == 200
