"""The chat page in a real browser: Debian's headless Chromium, driven by Playwright, against `minillama serve`
with SmolLM2 (its real chat template). Types a question, watches the answer grow, presses Stop, checks that
the server cancelled the request; asks again and checks the conversation went with it; saves a screenshot
(to $MINILLAMA_SCREENSHOT too, when set: the README's picture). Under CI=true a missing browser fails."""

import json
import os
import shutil
import time

import pytest

from test_serve import live

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_or_skip() -> str:
    path = shutil.which("chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        message = "needs Debian's chromium (apt-get install chromium) and the playwright package"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def wait_until(condition, timeout=120.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_chat_page_streams_stops_and_keeps_the_conversation(tmp_path):
    executable = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    from minillama.checkpoint import load_model_and_tokenizer
    from minillama.serve.app import ServeConfig
    from minillama.infer.engine import Engine
    from minillama.serve.app import create_app

    engine = Engine(*load_model_and_tokenizer("smollm2"), kv_cache_mb=256).start()
    sent = []  # the bodies the page posted
    with live(create_app(ServeConfig(), "smollm2", engine)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.method == "POST" else None)
        page.goto(url)
        page.wait_for_selector("#status.ready")
        assert page.inner_text("#model") == "smollm2"
        page.fill("#system", "You are a friendly assistant.")
        page.eval_on_selector("#temperature", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
        page.fill("#max-tokens", "400")

        page.fill("#prompt", "Write a long story about a dragon who learns to bake bread.")
        page.keyboard.press("Enter")
        answer = page.locator(".message.assistant").last
        page.wait_for_function("document.querySelectorAll('.message.assistant')[0].textContent.length > 10")
        seen = len(answer.text_content())
        page.wait_for_function(f"document.querySelectorAll('.message.assistant')[0].textContent.length > {seen}")
        page.click("#stop")
        page.wait_for_selector(".message.assistant .note")
        assert answer.locator(".note").text_content() == "(stopped)"
        wait_until(lambda: engine.stats["cancelled"] == 1 and engine.gauges()["running"] == 0)
        stopped = answer.text_content()
        time.sleep(0.5)
        assert answer.text_content() == stopped  # nothing more arrives
        assert engine.stats["generation_tokens"] < 400

        page.fill("#max-tokens", "24")
        page.fill("#prompt", "What is the capital of France?")
        page.click("#send")
        page.wait_for_selector("#send:not([disabled])")
        page.wait_for_function("!document.querySelector('.message.assistant.streaming')")
        assert "Paris" in page.locator(".message.assistant").last.text_content()
        assert "tok/s" in page.inner_text("#speed")
        roles = [m["role"] for m in sent[-1]["messages"]]
        assert roles == ["system", "user", "assistant", "user"] and sent[-1]["temperature"] == 0
        assert sent[-1]["messages"][2]["content"] == stopped.removesuffix("(stopped)")

        shot = tmp_path / "chat.png"
        page.screenshot(path=str(shot))
        if os.environ.get("MINILLAMA_SCREENSHOT"):
            shutil.copy(shot, os.environ["MINILLAMA_SCREENSHOT"])
        assert shot.stat().st_size > 10_000
        browser.close()
    engine.stop()
    assert engine.stats["finished"] == 1 and len(engine.pool.free) == engine.pool.n_blocks
