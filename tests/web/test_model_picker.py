"""The page on a server with several models: a picker lists them, and a reply comes from the one picked."""

from __future__ import annotations

from tests.server.conftest import metric
from tests.server.test_several_models import Loads, several
from tests.web.conftest import ChatPage


def test_the_picker_sends_the_chosen_model(chat_page: ChatPage, model_path, qwen_path, artifacts):
    loads = Loads()
    with several([loads.entry("smol", model_path), loads.entry("qwen", qwen_path)]) as url:
        page = chat_page.open(url).page
        page.wait_for_selector("#model-field:not([hidden])")
        options = page.locator("#model-picker option")
        assert options.all_inner_texts() == ["smol", "qwen (not loaded)"]
        assert page.locator("#model-picker").input_value() == "smol"
        page.locator("#model-picker").select_option("qwen")
        assert page.locator("#title").inner_text() == "qwen"
        chat_page.set_number("temperature", 0)
        chat_page.set_number("max-tokens", 12)
        chat_page.type_and_send("Say hello.")
        chat_page.wait_idle()
        assert chat_page.last_reply_text().strip()
        assert metric(url, "ggufchat_generated_tokens_total", 'model="qwen"') > 0
        assert metric(url, "ggufchat_generated_tokens_total", 'model="smol"') == 0
        # After the reply the list is read again: qwen is loaded now.
        page.wait_for_function("document.querySelector('#model-picker option[value=qwen]').textContent === 'qwen'")
        page.screenshot(path=str(artifacts / "model-picker.png"))
        # The choice is kept in this browser: a reload offers qwen again.
        page.reload()
        page.wait_for_selector("#model-field:not([hidden])")
        assert page.locator("#model-picker").input_value() == "qwen"
