"""The chat page (`GET /`) in real headless Chromium against a real server on 127.0.0.1 over tiny trained models:
the trained answer streams in, the picker switches between the base and its adapters, a follow-up carries the
conversation, Stop ends the generation on the server, and the API key gates the page's calls and the report."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import browser, page  # noqa: F401  (fixtures)
from glmtune_inference.webui import STATIC_DIR
from prometheus_client.parser import text_string_to_metric_families

QUESTION = "你好"
KEY = "sekrit-key"
LONG = 1500  # max tokens of the generation the Stop test interrupts (the untrained base never says EOS)


@pytest.fixture(scope="module")
def adapters_server(exports: Any, served: Any, server_factory: Any) -> Iterator[Any]:
    """The untrained tiny base as "glm" plus a LoRA adapter ("lora") and a p-tuning v2 prefix ("ptv2")."""
    models = served(exports.get("base", "v2"), {"lora": exports.get("adapter", "v2"),
                                                 "ptv2": exports.get("prefix", "v2")}, name="glm")
    with server_factory(models, max_tokens_limit=LONG, default_max_tokens=64) as running:
        yield running


@pytest.fixture(scope="module")
def keyed_server(exports: Any, served: Any, server_factory: Any,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The LoRA adapter behind an API key, with a training report to serve."""
    report = tmp_path_factory.mktemp("served-report") / "report.html"
    report.write_text("<!doctype html><title>report</title><h1>Training report: lora-v2</h1>", encoding="utf-8")
    models = served(exports.get("base", "v2"), {"lora": exports.get("adapter", "v2")}, name="glm")
    with server_factory(models, api_key=KEY, report_path=report) as running:
        yield running


def open_chat(shots: Any, url: str) -> Any:
    shots.page.goto(url + "/")
    shots.page.wait_for_selector("body[data-ready=true]")
    return shots.page


def set_value(browser_page: Any, selector: str, value: str) -> None:
    """Set an input (a range slider too) as a user would, firing its input event."""
    browser_page.locator(selector).evaluate(
        "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change')); }", value)


def ask(browser_page: Any, text: str) -> Any:
    """Type `text`, press Enter and wait for the reply to finish; returns the reply's list item."""
    before = browser_page.locator(".message.assistant").count()
    browser_page.fill("#prompt", text)
    browser_page.press("#prompt", "Enter")
    reply = browser_page.locator(".message.assistant").nth(before)
    reply.and_(browser_page.locator("[data-finish]")).wait_for()
    return reply


def watch_reply_text(browser_page: Any) -> None:
    """Record every text the newest reply shows as it changes (window.seen), to see it stream in."""
    browser_page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const last = [...document.querySelectorAll('.message.assistant .content')].pop();
            if (last && last.textContent !== window.seen[window.seen.length - 1]) window.seen.push(last.textContent);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@pytest.mark.slow
def test_the_trained_answer_streams_into_the_page(page: Any, adapters_server: Any, exports: Any) -> None:  # noqa: F811
    p = open_chat(page, adapters_server.url)
    assert p.locator("#api-key").is_hidden()  # this server takes no key: the page does not ask for one
    p.select_option("#model", "lora")
    set_value(p, "#temperature", "0")
    watch_reply_text(p)
    reply = ask(p, QUESTION)
    page.shot("lora-answer")
    expected = exports.reference[("adapter", "v2")][QUESTION]
    assert reply.locator(".content").inner_text() == expected
    assert reply.get_attribute("data-finish") == "stop"
    assert reply.locator(".role").inner_text() == "lora"
    seen = p.evaluate("window.seen")
    assert seen[-1] == expected and all(expected.startswith(text) for text in seen), seen
    assert not page.errors


@pytest.mark.slow
def test_the_picker_offers_the_base_and_its_adapters_and_switching_changes_who_answers(
        page: Any, adapters_server: Any, exports: Any) -> None:  # noqa: F811
    p = open_chat(page, adapters_server.url)
    assert p.locator("#model option").all_inner_texts() == ["glm", "lora", "ptv2"]
    set_value(p, "#temperature", "0")
    p.select_option("#model", "lora")
    assert ask(p, QUESTION).locator(".content").inner_text() == exports.reference[("adapter", "v2")][QUESTION]
    p.click("#new-chat")  # the prefix was trained on single-turn prompts
    p.select_option("#model", "ptv2")
    reply = ask(p, QUESTION)
    page.shot("ptv2-answer")
    assert reply.locator(".role").inner_text() == "ptv2"
    assert reply.locator(".content").inner_text() == exports.reference[("prefix", "v2")][QUESTION]


@pytest.mark.slow
def test_a_follow_up_sends_the_conversation_so_far_with_the_settings(page: Any, adapters_server: Any) -> None:  # noqa: F811
    p = open_chat(page, adapters_server.url)
    bodies: list[dict] = []
    p.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    p.select_option("#model", "lora")
    set_value(p, "#temperature", "0")
    set_value(p, "#top-p", "0.5")
    p.fill("#max-tokens", "20")
    p.fill("#system", "Answer briefly.")
    first = ask(p, QUESTION).locator(".content").inner_text()
    ask(p, "再说一次")
    page.shot("follow-up")
    assert bodies[1]["messages"] == [{"role": "system", "content": "Answer briefly."},
                                     {"role": "user", "content": QUESTION}, {"role": "assistant", "content": first},
                                     {"role": "user", "content": "再说一次"}]
    assert {k: bodies[1][k] for k in ("model", "stream", "temperature", "top_p", "max_tokens")} == {
        "model": "lora", "stream": True, "temperature": 0, "top_p": 0.5, "max_tokens": 20}
    p.click("#new-chat")
    assert p.locator(".message").count() == 0
    ask(p, QUESTION)
    assert [m["role"] for m in bodies[2]["messages"]] == ["system", "user"]


@pytest.mark.slow
def test_stop_ends_the_generation_on_the_server(page: Any, adapters_server: Any) -> None:  # noqa: F811
    url = adapters_server.url
    cancelled = metric(url, "glmtune_generations_total", model="glm", reason="cancelled")
    tokens = metric(url, "glmtune_completion_tokens_total", model="glm")
    p = open_chat(page, url)
    p.select_option("#model", "glm")
    set_value(p, "#temperature", "0")
    p.fill("#max-tokens", str(LONG))
    p.fill("#prompt", QUESTION)
    p.press("#prompt", "Enter")
    streaming = p.locator(".message.assistant.streaming .content")
    p.wait_for_function("() => document.querySelector('.message.assistant .content').textContent.length > 0")
    assert streaming.count() == 1 and p.locator("#stop").is_enabled()  # text shows while the answer is running
    page.shot("streaming")
    p.click("#stop")
    reply = p.locator(".message.assistant")
    p.wait_for_selector(".message.assistant[data-finish]")
    page.shot("stopped")
    assert reply.get_attribute("data-finish") == "stopped"
    assert p.locator("#send").is_enabled() and p.locator("#stop").is_disabled()
    deadline = time.monotonic() + 20
    while metric(url, "glmtune_generations_total", model="glm", reason="cancelled") < cancelled + 1:
        assert time.monotonic() < deadline, "the server did not cancel the generation the page stopped"
        time.sleep(0.1)
    assert metric(url, "glmtune_running_requests") == 0
    generated = metric(url, "glmtune_completion_tokens_total", model="glm") - tokens
    assert 0 < generated < LONG


@pytest.mark.slow
def test_a_keyed_server_asks_for_the_key_and_serves_the_report_with_it(page: Any, keyed_server: Any) -> None:  # noqa: F811
    p = open_chat(page, keyed_server.url)
    assert p.locator("#api-key").is_visible()
    assert p.locator("#model option").count() == 0
    assert "API key" in p.locator("#status").inner_text()
    p.fill("#api-key", KEY)
    p.locator("#api-key").dispatch_event("change")
    p.wait_for_selector("#model option[value=lora]", state="attached")
    p.select_option("#model", "lora")
    set_value(p, "#temperature", "0")
    assert ask(p, QUESTION).get_attribute("data-finish") == "stop"
    page.shot("keyed")
    with p.expect_popup() as popup:
        p.click("#report-link")
    report = popup.value
    report.wait_for_load_state()
    assert report.locator("h1").inner_text() == "Training report: lora-v2"


@pytest.mark.slow
def test_a_wrong_key_shows_the_servers_message(page: Any, keyed_server: Any) -> None:  # noqa: F811
    p = open_chat(page, keyed_server.url)
    p.evaluate("sessionStorage.setItem('glmtune.apiKey', 'wrong')")
    p.reload()
    p.wait_for_selector("body[data-ready=true]")
    page.shot("wrong-key")
    assert p.locator("#model option").count() == 0
    assert p.locator("#status").inner_text() == ("The server refused the API key: missing or wrong API key "
                                                 "(Authorization: Bearer ...)")


class _Links(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.links: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "link", "img"):  # what the page loads (not where its links lead)
            self.links += [str(v) for k, v in attrs if k in ("src", "href") and not str(v).startswith("data:")]


def test_the_page_loads_nothing_from_outside_the_server(adapters_server: Any) -> None:
    for asset in STATIC_DIR.iterdir():
        assert not re.search(r"https?://", asset.read_text(encoding="utf-8")), asset
    page_html = httpx.get(adapters_server.url + "/", timeout=10)
    assert page_html.status_code == 200 and page_html.headers["content-type"].startswith("text/html")
    for link in _Links(page_html.text).links:
        assert httpx.get(f"{adapters_server.url}/{link}", timeout=10).status_code == 200, link
    assert httpx.get(adapters_server.url + "/ui/../server.py", timeout=10).status_code == 404
    assert httpx.get(adapters_server.url + "/ui/webui.py", timeout=10).status_code == 404


def test_report_is_a_clear_404_when_the_server_has_none(adapters_server: Any) -> None:
    answer = httpx.get(adapters_server.url + "/report", timeout=10)
    assert answer.status_code == 404
    assert "no training report" in answer.json()["error"]["message"]
    assert httpx.get(adapters_server.url + "/ui/config", timeout=10).json()["report"] is False


def test_report_needs_the_key_on_a_keyed_server(keyed_server: Any) -> None:
    assert httpx.get(keyed_server.url + "/report", timeout=10).status_code == 401
    answer = httpx.get(keyed_server.url + "/report", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert answer.status_code == 200 and "Training report: lora-v2" in answer.text
    config = httpx.get(keyed_server.url + "/ui/config", timeout=10).json()
    assert config == {"api_key_required": True, "report": True, "default_max_tokens": 512,
                      "max_tokens_limit": 2048}


def test_a_missing_report_file_is_named_in_the_404(exports: Any, served: Any, server_factory: Any,
                                                    tmp_path: Path) -> None:
    models = served(exports.get("base", "v2"), name="glm")
    with server_factory(models, report_path=tmp_path / "gone.html") as running:
        answer = httpx.get(running.url + "/report", timeout=10)
    assert answer.status_code == 404 and str(tmp_path / "gone.html") in answer.json()["error"]["message"]
