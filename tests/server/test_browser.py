"""The chat page in headless Chromium (Debian's chromium, driven by Playwright): type a message,
see the answer stream in, Markdown rendered, API key field."""

from __future__ import annotations

import shutil
import tempfile
import threading

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert shutil.which("chromium"), "Debian's chromium is needed (apt-get install chromium; .ci/run does)"
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=ARGS,
                                                   headless=True)
        yield ctx
        ctx.close()


def test_chat_page_streams_an_answer(browser, url, engine, monkeypatch):
    # space the tokens out a little so the page visibly receives several chunks
    gate = threading.Event()

    def paced_decode(n_tokens):  # runs before every real llama_decode of the engine
        gate.wait(0.02)

    monkeypatch.setattr(engine.context, "decode_hook", paced_decode)
    page = browser.new_page()
    page.goto(url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    page.fill("#maxTokens", "24")
    page.fill("#system", "You are a helpful assistant.")
    # greedy, so the answer (and how many pieces it arrives in) does not depend on chance
    page.evaluate("""() => { const t = document.getElementById('temperature'); t.value = '0';
                            t.dispatchEvent(new Event('input')); }""")
    page.evaluate("""() => {
        window.__updates = 0;
        new MutationObserver(() => { window.__updates++; })
          .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#prompt", "你好，请介绍一下自己")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-finish]", timeout=120_000)
    assert page.get_attribute(".msg.assistant", "data-finish") in ("stop", "length")
    assert page.inner_text(".msg.user .content") == "你好，请介绍一下自己"
    assert page.evaluate("window.__updates") > 3  # the answer arrived in several pieces
    meta = page.inner_text(".msg.assistant .meta")
    assert "finish:" in meta and "tokens" in meta
    # second turn: the history goes with it
    page.fill("#prompt", "再说一遍")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-finish]').length == 2",
                           timeout=120_000)
    assert page.locator(".msg.user").count() == 2
    page.close()


def test_markdown_renderer(browser, url):
    page = browser.new_page()
    page.goto(url + "/")
    html = page.evaluate("""() => renderMarkdown(
        '# Title\\n\\nSome **bold** and `code` <script>x</script>\\n\\n- a\\n- b\\n\\n```py\\nprint(1<2)\\n```\\n' +
        '[ok](https://example.com) [bad](javascript:alert(1))\\n\\n| a | b |\\n|---|---|\\n| 1 | 2 |')""")
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<ul><li>a</li><li>b</li></ul>" in html
    assert '<pre><code class="language-py">print(1&lt;2)</code></pre>' in html
    assert 'href="https://example.com"' in html and "javascript:" not in html.split("[bad]")[0]
    assert "<table>" in html and "<td>2</td>" in html
    page.close()


def test_chat_page_with_api_key(browser, tiny_gguf_path):
    from cllama_deploy.server.settings import Settings
    from tests.server import builders_server as bs

    eng = bs.load_engine(tiny_gguf_path, model_id="keyed", n_ctx=256)
    srv = bs.make_server(Settings(api_keys=["secret-key"]), eng)
    try:
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.wait_for_function("document.getElementById('status').textContent.includes('API key')")
        page.fill("#apiKey", "secret-key")
        page.dispatch_event("#apiKey", "change")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        page.fill("#maxTokens", "5")
        page.fill("#prompt", "hello")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-finish]", timeout=120_000)
        assert page.get_attribute(".msg.assistant", "data-finish") in ("stop", "length")
        page.close()
    finally:
        srv.stop()
        eng.close(5)
