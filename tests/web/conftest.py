"""The web chat page in a real browser: Debian's chromium, headless, driven by playwright (which is
told where the browser is: `playwright install` downloads are neither needed nor used).

No chromium means failed tests with the reason, never silently skipped ones."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for  # noqa: F401 (the web tests import it from here)
from tests.server.conftest import serve

CHROMIUM = Path(os.environ.get("GGUFCHAT_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "web"


# Package scope: playwright's sync API keeps an event loop running in the main thread while it is open,
# which would break asyncio.run() in any test that happens to run after the web tests.
@pytest.fixture(scope="package")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the web tests need the playwright package: `make install` (dev extras) or "
                    "`.venv/bin/pip install playwright`", pytrace=False)
    if not CHROMIUM.exists():
        pytest.fail(f"the web tests need Chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run does it), "
                    "or point GGUFCHAT_CHROMIUM at another Chromium", pytrace=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="package")
def web_url(engine) -> Iterator[str]:
    """A server without API key for the page tests."""
    with serve(engine) as url:
        yield url


@pytest.fixture
def url(web_url: str, fresh) -> str:
    return web_url


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


class ChatPage:
    """The chat page in one browser tab, with what a person does on it."""

    def __init__(self, page) -> None:
        self.page = page
        self.console: list[str] = []
        self.errors: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, url: str) -> ChatPage:
        self.page.goto(url + "/")
        self.page.wait_for_function("window.ggufchat !== undefined")
        return self

    def set_number(self, which: str, value: float) -> None:
        """Type into the number box beside a slider ('max-tokens' or 'temperature')."""
        box = self.page.locator(f"#{which}-value")
        box.fill(str(value))
        box.dispatch_event("change")
        assert float(self.page.locator(f"#{which}").input_value()) == value

    def type_and_send(self, text: str) -> None:
        self.page.locator("#input").fill(text)
        self.page.locator("#input").press("Enter")

    def busy(self) -> bool:
        return self.page.locator("#stop").is_visible()

    def wait_idle(self, timeout: float = 120) -> None:
        self.page.wait_for_selector("#send:not([hidden])", timeout=timeout * 1000)

    def replies(self):
        return self.page.locator(".msg.assistant .bubble")

    def last_reply_text(self) -> str:
        replies = self.replies()
        return replies.last.inner_text() if replies.count() else ""

    def history(self) -> list[dict]:
        return self.page.evaluate("window.ggufchat.state.messages")

    def csp_violations(self) -> list[str]:
        return [m for m in self.console if "Content Security Policy" in m]


@pytest.fixture
def chat_page(browser) -> Iterator[ChatPage]:
    context = browser.new_context(viewport={"width": 1200, "height": 820})
    chat = ChatPage(context.new_page())
    yield chat
    context.close()
    # Every test also checks that the page ran clean: no script error, nothing blocked by the CSP.
    assert not chat.errors, chat.errors
    assert not chat.csp_violations(), chat.csp_violations()


