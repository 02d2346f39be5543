"""The page's Markdown renderer (markdown.js), run in the browser on known sources."""

from __future__ import annotations

import pytest

from tests.web.conftest import ChatPage

RENDER = """(source) => {
  const box = document.createElement("div");
  box.innerHTML = window.ggufchat.renderMarkdown(source);
  return box;
}"""


@pytest.fixture
def md(chat_page: ChatPage, web_url: str):
    chat_page.open(web_url)
    page = chat_page.page

    def render(source: str):
        """The rendered fragment as a JS handle (a detached <div>)."""
        return page.evaluate_handle(RENDER, source)

    return render


def q(handle, selector: str) -> list[str]:
    """outerHTML of each match inside the rendered fragment."""
    return handle.evaluate("(box, s) => [...box.querySelectorAll(s)].map(e => e.outerHTML)", selector)


def html(handle) -> str:
    return handle.evaluate("box => box.innerHTML")


def text(handle) -> str:
    return handle.evaluate("box => box.textContent")


@pytest.mark.parametrize("attack", [
    "<script>window.pwned = 1</script>",
    "<img src=x onerror=\"window.pwned = 1\">",
    "\"><svg onload=alert(1)>",
    "<iframe src=\"javascript:alert(1)\"></iframe>",
    "**<b onmouseover=alert(1)>bold</b>**",
    "`<script>` and ```\n<script>alert(1)</script>\n```",
    "[click](javascript:alert(1)) [data](data:text/html,<script>alert(1)</script>)",
    "[x](https://a.example/\"onmouseover=\"alert(1)) https://b.example/?q=\"><img src=x>",
    "| <img src=x> | b |\n| --- | --- |\n| <script>1</script> | c |",
    "# <style>body{display:none}</style>\n- <a href='javascript:x'>y</a>",
])
def test_html_in_the_source_stays_text(md, attack: str):
    box = md(attack)
    assert not q(box, "script, img, svg, iframe, style, b, object, embed"), html(box)
    events = box.evaluate("box => [...box.querySelectorAll('*')].flatMap(e => [...e.attributes])"
                          ".map(a => a.name).filter(n => n.startsWith('on'))")
    assert events == [], html(box)
    hrefs = box.evaluate("box => [...box.querySelectorAll('a')].map(a => a.getAttribute('href'))")
    assert all(h.startswith(("http://", "https://")) for h in hrefs), hrefs
    # Whatever was typed is still there, as text.
    for word in ("script", "img", "onmouseover", "javascript"):
        if word in attack:
            assert word in text(box)


def test_fenced_code_blocks(md):
    box = md("Here:\n\n```python\ndef f(a, b):\n    return a * b  # **not bold**\n```\n\nDone.")
    assert q(box, "pre > code.language-python") == [
        '<code class="language-python">def f(a, b):\n    return a * b  # **not bold**</code>']
    assert [p.strip() for p in box.evaluate("b => [...b.querySelectorAll('p')].map(p => p.textContent)")] == \
        ["Here:", "Done."]
    # A fence still open (the reply is streaming) is code up to the end.
    box = md("```js\nconst a = 1;\nconst b")
    assert q(box, "pre code") == ['<code class="language-js">const a = 1;\nconst b</code>']
    # A fence inside a list item, indented.
    box = md("1. Install:\n   ```bash\n   pip install x\n   ```\n2. Run it")
    assert q(box, "ol > li > pre > code") == ['<code class="language-bash">pip install x</code>']
    assert len(q(box, "ol > li")) == 2


def test_inline_markup(md):
    box = md("Use `a < b` and **bold**, *italic*, _also_, ~~gone~~; snake_case_name stays; 2 * 3 * 4 too.")
    assert q(box, "code") == ["<code>a &lt; b</code>"]
    assert q(box, "strong") == ["<strong>bold</strong>"]
    assert q(box, "em") == ["<em>italic</em>", "<em>also</em>"]
    assert q(box, "del") == ["<del>gone</del>"]
    assert "snake_case_name" in text(box) and "2 * 3 * 4" in text(box)


def test_links_http_only(md):
    box = md("See [the docs](https://example.com/a_b_c?x=1&y=2) or http://example.org/x. Not [this](ftp://x).")
    links = box.evaluate("b => [...b.querySelectorAll('a')].map(a => [a.getAttribute('href'), a.textContent, a.rel])")
    assert links == [["https://example.com/a_b_c?x=1&y=2", "the docs", "noopener noreferrer"],
                     ["http://example.org/x", "http://example.org/x", "noopener noreferrer"]]
    assert "[this](ftp://x)" in text(box)


def test_headings_lists_quotes_tables(md):
    box = md("# Title\n## Sub ##\n\nIntro line\nsecond line\n\n- one\n- two\n  - nested\n- three\n\n"
             "3. c\n4. d\n\n> quoted\n\n---\n\n| a | b |\n|:--|--:|\n| 1 | 2 |\n")
    assert q(box, "h1") == ["<h1>Title</h1>"] and q(box, "h2") == ["<h2>Sub</h2>"]
    assert q(box, "p")[0] == "<p>Intro line<br>second line</p>"
    assert box.evaluate("b => [...b.querySelectorAll(':scope > ul > li')].map(li => li.firstChild.textContent)") == \
        ["one", "two", "three"]
    assert q(box, "ul ul li") == ["<li>nested</li>"]
    assert q(box, "ol")[0].startswith('<ol start="3"><li>c</li>')
    assert q(box, "blockquote p") == ["<p>quoted</p>"]
    assert len(q(box, "hr")) == 1
    assert q(box, "th") == ['<th class="align-left">a</th>', '<th class="align-right">b</th>']
    assert q(box, "td") == ['<td class="align-left">1</td>', '<td class="align-right">2</td>']


def test_chinese_text(md):
    box = md("## 标题\n\n**你好**，世界！`代码`\n\n- 第一\n- 第二")
    assert q(box, "h2") == ["<h2>标题</h2>"]
    assert q(box, "strong") == ["<strong>你好</strong>"]
    assert "，世界！" in text(box) and q(box, "li") == ["<li>第一</li>", "<li>第二</li>"]
