"""The chat page served at `GET /`, driven in headless Chromium against a real server and the real default
model. Screenshots land in artifacts/screenshots/<test name>.png."""

from __future__ import annotations

import json
import re
import time

import pytest

from .conftest import API_KEY, PHONE, browser_missing, metric, open_page, screenshot, wait_for_metric

pytestmark = [pytest.mark.browser, pytest.mark.skipif(browser_missing() is not None,
                                                     reason=browser_missing() or "")]

ANSWER = "[data-testid=assistant-message] [data-testid=message-content]"
STATS_TEXT = re.compile(r"^(\d+) tokens? · \d+\.\d tok/s · prompt (\d+)$")
INJECTION_REGEX = (r'<script>window\.pwned=1</script> \*\*bold\*\* '
                   r'<img src=x onerror="window\.pwned=2">')
MODEL_NAME = "SmolLM2-135M-Instruct"


def open_chat(page, base_url: str) -> None:
    """Loads the page and waits for the model list."""
    page.goto(base_url + "/")
    page.wait_for_function("document.querySelector('[data-testid=model-select]').options.length > 0")


def set_setting(page, testid: str, value: str) -> None:
    field = page.get_by_test_id(testid)
    field.fill(value)
    field.dispatch_event("change")


def send(page, text: str) -> None:
    page.get_by_test_id("message-input").fill(text)
    page.get_by_test_id("message-input").press("Enter")


def wait_idle(page, timeout_s: float = 60) -> None:
    """Waits until no answer is streaming (Send is back)."""
    page.get_by_test_id("send-button").wait_for(state="visible", timeout=timeout_s * 1000)


def last_answer(page):
    return page.get_by_test_id("assistant-message").last


def test_streamed_answer_with_token_stats(page, page_server):
    open_chat(page, page_server)
    set_setting(page, "max-tokens", "24")
    prompt_before = metric(page_server, "nitro:prompt_tokens_total")
    generated_before = metric(page_server, "nitro:generation_tokens_total")
    send(page, "Tell me three facts about the Moon.")
    page.get_by_test_id("stop-button").wait_for(state="visible")
    assert page.get_by_test_id("send-button").is_hidden()

    seen: list[str] = []
    deadline = time.monotonic() + 60
    while page.get_by_test_id("stop-button").is_visible() and time.monotonic() < deadline:
        text = page.locator(ANSWER).last.inner_text()
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        time.sleep(0.03)
    wait_idle(page)
    final = page.locator(ANSWER).last.inner_text()
    assert final.strip(), "no answer"
    assert len(seen) >= 2, f"the answer did not grow while streaming: {seen}"
    assert len(seen[0]) < len(final)
    assert page.get_by_test_id("user-message").inner_text() == "Tell me three facts about the Moon."

    stats = last_answer(page).get_by_test_id("message-stats")
    match = STATS_TEXT.match(stats.inner_text())
    assert match, stats.inner_text()
    completion, prompt = int(match.group(1)), int(match.group(2))
    assert 0 < completion <= 24
    assert stats.get_attribute("data-completion-tokens") == str(completion)
    # The counts are the server's own: its metrics moved by exactly this request's tokens.
    assert wait_for_metric(page_server, "nitro:generation_tokens_total", generated_before + completion) \
        == generated_before + completion
    assert metric(page_server, "nitro:prompt_tokens_total") == prompt_before + prompt
    assert float(stats.get_attribute("data-tokens-per-second")) > 0


def test_stop_aborts_the_request_on_the_server(page, page_server):
    open_chat(page, page_server)
    set_setting(page, "max-tokens", "1500")
    aborted = metric(page_server, "nitro:request_success_total", finished_reason="abort")
    send(page, "Write a very long story, at least 2000 words, about a dragon who learns to bake bread.")
    page.wait_for_function(f"(document.querySelector('{ANSWER}')?.innerText || '').length > 30", timeout=60_000)
    page.get_by_test_id("stop-button").click()
    wait_idle(page, 10)

    assert wait_for_metric(page_server, "nitro:request_success_total", aborted + 1,
                           finished_reason="abort", model_name=MODEL_NAME) == aborted + 1
    answer = last_answer(page)
    assert answer.get_by_test_id("message-stopped").is_visible()
    partial = answer.get_by_test_id("message-content").inner_text()
    assert len(partial) > 30
    assert re.match(r"^~\d+ tokens", answer.get_by_test_id("message-stats").inner_text())
    time.sleep(0.5)
    assert answer.get_by_test_id("message-content").inner_text() == partial, "the answer grew after Stop"
    assert page.get_by_test_id("stop-button").is_hidden()

    # The page is usable for the next message, which sees the partial answer as history.
    set_setting(page, "max-tokens", "12")
    send(page, "Thanks! Now say hi.")
    page.wait_for_function("document.querySelectorAll('[data-testid=assistant-message]').length === 2")
    wait_idle(page)
    assert last_answer(page).get_by_test_id("message-stats").inner_text()
    assert last_answer(page).get_by_test_id("message-stopped").count() == 0


def test_server_error_is_shown(page, page_server):
    open_chat(page, page_server)
    set_setting(page, "max-tokens", "100000")  # beyond --max-model-len: the server answers 400
    send(page, "Hello")
    error = page.get_by_test_id("error-message")
    error.wait_for()
    wait_idle(page, 10)
    assert "token" in error.inner_text().lower(), error.inner_text()
    assert page.get_by_test_id("assistant-message").count() == 0, "the empty answer was not removed"
    assert page.get_by_test_id("message-input").is_editable()


def test_model_output_with_html_renders_as_text(page, page_server):
    def force_output(route):
        body = json.loads(route.request.post_data)
        body["guided_regex"] = INJECTION_REGEX
        route.continue_(post_data=json.dumps(body))

    page.route("**/v1/chat/completions", force_output)
    open_chat(page, page_server)
    set_setting(page, "max-tokens", "80")
    send(page, "Show me some HTML.")
    wait_idle(page)

    answer = last_answer(page)
    text = answer.get_by_test_id("message-content").inner_text()
    assert "<script>window.pwned=1</script>" in text
    assert '<img src=x onerror="window.pwned=2">' in text
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert answer.locator("script, img, iframe, [onerror]").count() == 0
    assert answer.locator("strong").inner_text() == "bold"
    # The stored copy of the conversation is as inert after a reload.
    page.reload()
    page.get_by_test_id("assistant-message").wait_for()
    assert "<script>window.pwned=1</script>" in last_answer(page).inner_text()
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert last_answer(page).locator("script, img").count() == 0


def test_markdown_renderer(page, page_server):
    page.goto(page_server + "/")
    result = page.evaluate("""async () => {
        const { renderMarkdown } = await import('/static/markdown.js');
        const box = document.createElement('div');
        box.appendChild(renderMarkdown([
            '# Title', '', 'Some *italic*, **bold**, `<b>code</b>` and a [site](https://example.org/a?b=1).',
            '[bad](javascript:alert(1)) and [data](data:text/html,hi) and snake_case_name.',
            '', '- one', '- two', '', '1. first', '2. second', '',
            '```python', 'print("<script>")', '```', '', '<iframe src="x"></iframe>',
        ].join('\\n')));
        return {
            h1: box.querySelector('h1')?.textContent,
            em: box.querySelector('em')?.textContent,
            strong: box.querySelector('strong')?.textContent,
            inlineCode: box.querySelector('p code')?.textContent,
            links: [...box.querySelectorAll('a')].map(a => [a.textContent, a.href, a.target, a.rel]),
            bullets: [...box.querySelectorAll('ul li')].map(li => li.textContent),
            ordered: [...box.querySelectorAll('ol li')].map(li => li.textContent),
            lang: box.querySelector('.code-lang')?.textContent,
            code: box.querySelector('pre code')?.textContent,
            copy: box.querySelector('[data-testid=copy-code]')?.textContent,
            elements: [...box.querySelectorAll('*')].map(e => e.tagName.toLowerCase()),
            text: box.textContent,
        };
    }""")
    assert result["h1"] == "Title"
    assert result["em"] == "italic" and result["strong"] == "bold"
    assert result["inlineCode"] == "<b>code</b>"
    assert result["links"] == [["site", "https://example.org/a?b=1", "_blank", "noopener noreferrer"]]
    assert "[bad](javascript:alert(1))" in result["text"] and "snake_case_name" in result["text"]
    assert result["bullets"] == ["one", "two"] and result["ordered"] == ["first", "second"]
    assert result["lang"] == "python" and result["code"] == 'print("<script>")' and result["copy"] == "Copy"
    assert '<iframe src="x"></iframe>' in result["text"]
    assert not {"script", "iframe", "b", "img"} & set(result["elements"])


def test_history_new_chat_and_system_prompt(page, page_server):
    requests: list[dict] = []

    def record(route):
        requests.append(json.loads(route.request.post_data))
        route.continue_()

    page.route("**/v1/chat/completions", record)
    open_chat(page, page_server)
    set_setting(page, "max-tokens", "12")
    send(page, "Remember the word banana.")
    wait_idle(page)
    first_answer = page.locator(ANSWER).last.inner_text()

    page.reload()
    page.get_by_test_id("user-message").wait_for()
    assert page.get_by_test_id("user-message").inner_text() == "Remember the word banana."
    assert page.locator(ANSWER).last.inner_text() == first_answer
    assert page.get_by_test_id("message-stats").count() == 1
    assert page.get_by_test_id("conversation-item").count() == 1
    assert page.get_by_test_id("chat-title").inner_text() == "Remember the word banana."

    page.get_by_test_id("new-chat").click()
    assert page.get_by_test_id("empty-state").is_visible()
    assert page.get_by_test_id("user-message").count() == 0
    assert page.get_by_test_id("conversation-item").count() == 2
    page.get_by_test_id("system-prompt").fill("You are a pirate.")
    assert page.get_by_test_id("max-tokens").input_value() == "12", "new chats keep the last settings"
    send(page, "Hello there")
    wait_idle(page)

    assert requests[0]["messages"] == [{"role": "user", "content": "Remember the word banana."}]
    assert requests[0]["max_tokens"] == 12 and requests[0]["model"] == MODEL_NAME
    assert requests[1]["messages"] == [{"role": "system", "content": "You are a pirate."},
                                       {"role": "user", "content": "Hello there"}]

    page.reload()
    page.get_by_test_id("user-message").wait_for()
    assert page.get_by_test_id("system-prompt").input_value() == "You are a pirate."
    page.get_by_test_id("conversation-item").filter(has_text="banana").get_by_role("button").first.click()
    assert page.get_by_test_id("user-message").inner_text() == "Remember the word banana."
    assert page.get_by_test_id("system-prompt").input_value() == ""

    page.get_by_test_id("conversation-item").filter(has_text="Hello there").get_by_test_id(
        "delete-conversation").click()
    assert page.get_by_test_id("conversation-item").count() == 1


def test_api_key_prompt(page, keyed_server):
    page.goto(keyed_server + "/")
    dialog = page.get_by_test_id("api-key-dialog")
    dialog.wait_for(state="visible")
    page.get_by_test_id("api-key-input").fill("wrong-key")
    page.get_by_test_id("api-key-save").click()
    error = page.get_by_test_id("api-key-error")
    error.wait_for(state="visible")
    assert "refused" in error.inner_text()
    assert dialog.is_visible()
    screenshot(page, "test_api_key_prompt_refused")

    page.get_by_test_id("api-key-input").fill(API_KEY)
    page.get_by_test_id("api-key-save").click()
    dialog.wait_for(state="hidden")
    assert page.evaluate("localStorage.getItem('nitro-chat.api-key')") == API_KEY
    page.wait_for_function("document.querySelector('[data-testid=model-select]').options.length > 0")
    assert page.get_by_test_id("model-select").input_value() == MODEL_NAME
    set_setting(page, "max-tokens", "12")
    send(page, "Hi!")
    wait_idle(page)
    assert STATS_TEXT.match(last_answer(page).get_by_test_id("message-stats").inner_text())

    # Forget the key: the next message gets a 401, the prompt comes back, and the message goes through.
    page.get_by_test_id("api-key-forget").click()
    assert page.evaluate("localStorage.getItem('nitro-chat.api-key')") is None
    send(page, "Hello again")
    dialog.wait_for(state="visible")
    page.get_by_test_id("api-key-input").fill(API_KEY)
    page.get_by_test_id("api-key-save").click()
    page.wait_for_function("document.querySelectorAll('[data-testid=message-stats]').length === 2")
    wait_idle(page)
    assert page.get_by_test_id("assistant-message").count() == 2
    assert page.get_by_test_id("error-message").count() == 0

    # A reload keeps the key: no prompt.
    page.reload()
    page.wait_for_function("document.querySelector('[data-testid=model-select]').options.length > 0")
    assert dialog.is_hidden()


def test_phone_layout(browser, request, page_server):
    context, page, errors = open_page(browser, request, viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        page.goto(page_server + "/")
        long_line = "x = '" + "a" * 300 + "'"
        state = {"currentId": "c1", "conversations": [{
            "id": "c1", "title": "Long content", "systemPrompt": "", "model": "", "temperature": 0.7,
            "maxTokens": 8, "updatedAt": 1, "messages": [
                {"role": "user", "content": "https://example.org/" + "b" * 200},
                {"role": "assistant", "content": f"```python\n{long_line}\n```\n\n" + "w" * 300,
                 "stats": {"completionTokens": 5, "promptTokens": 9, "tokensPerSecond": 12.5}},
            ]}]}
        page.evaluate("state => localStorage.setItem('nitro-chat.state.v1', JSON.stringify(state))", state)
        page.reload()
        page.wait_for_function("document.querySelector('[data-testid=model-select]').options.length > 0")
        page.get_by_test_id("assistant-message").wait_for()

        assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
        composer = page.get_by_test_id("composer").bounding_box()
        assert composer["x"] >= 0 and composer["x"] + composer["width"] <= PHONE["width"]
        assert composer["y"] >= 0 and composer["y"] + composer["height"] <= PHONE["height"]
        for testid in ("message-input", "send-button", "menu-button"):
            assert page.get_by_test_id(testid).is_visible(), testid
        assert page.get_by_test_id("sidebar").is_hidden()
        assert page.get_by_test_id("settings-panel").is_hidden()
        code = page.locator("pre").bounding_box()
        assert code["x"] + code["width"] <= PHONE["width"]

        page.get_by_test_id("menu-button").tap()
        page.get_by_test_id("new-chat").wait_for(state="visible")
        screenshot(page, "test_phone_layout_sidebar")
        page.get_by_test_id("conversation-item").first.get_by_role("button").first.tap()
        page.get_by_test_id("sidebar").wait_for(state="hidden")

        page.get_by_test_id("settings-button").tap()
        page.get_by_test_id("max-tokens").wait_for(state="visible")
        set_setting(page, "max-tokens", "8")
        page.get_by_test_id("backdrop").tap(position={"x": 20, "y": 400})
        page.get_by_test_id("settings-panel").wait_for(state="hidden")
        send(page, "Hi")
        page.wait_for_function("document.querySelectorAll('[data-testid=message-stats]').length === 2")
        assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
        screenshot(page, request.node.name)
        assert not errors, errors
    finally:
        context.close()
