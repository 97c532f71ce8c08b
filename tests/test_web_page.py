"""The chat page at `/` in a real browser: headless Chromium from Debian driven by Selenium (the driver's path
given, so Selenium Manager downloads nothing), against a `talis serve` subprocess of the embedded model.

Skips, saying why, where Chromium, its driver or Selenium is absent (.ci/run installs them).
"""

from __future__ import annotations

import os
import re
import shutil
import time

import httpx
import pytest

from tests.serve_process import talis_serve

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
KEY = "page-key-3"
WAIT_S = 60

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
pytestmark = pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
                                reason=f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                                       "apt-get install chromium chromium-driver")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with talis_serve("--api-key", KEY, log_path=tmp_path_factory.mktemp("serve") / "log") as address:
        yield address


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    offline = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a browser or driver online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()
    if offline is None:
        os.environ.pop("SE_OFFLINE", None)
    else:
        os.environ["SE_OFFLINE"] = offline


def wait_for(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def page_text(browser, selector: str) -> list[str]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map((e) => e.textContent)", selector)


def set_field(browser, element_id: str, value: str) -> None:
    browser.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                           "e.dispatchEvent(new Event('change'));", element_id, value)


def send(browser, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def watch_replies(browser) -> None:
    """Record the length of the newest reply each time the page changes it (window.replyLengths)."""
    browser.execute_script("""
        window.replyLengths = [];
        new MutationObserver(() => {
          const replies = document.querySelectorAll('.message.assistant');
          if (replies.length) window.replyLengths.push(replies[replies.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});""")


def api_reply(url: str, messages: list, max_tokens: int) -> dict:
    """The server's non-streamed answer to the same greedy request."""
    response = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=WAIT_S,
                          json={"messages": messages, "temperature": 0, "max_tokens": max_tokens})
    assert response.status_code == 200, response.text
    return response.json()


def metric(url: str, name: str) -> float:
    """One sample of the server's /metrics (Prometheus text)."""
    for line in httpx.get(f"{url}/metrics", timeout=WAIT_S).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"/metrics has no {name}")


def test_the_page_streams_a_reply_with_its_stats_line(url, browser):
    browser.get(url + "/")
    assert browser.title == "talis chat"

    # no key yet: the server's 401 becomes a message that says what to do, and the message goes back in the box
    send(browser, "In the beginning")
    error = wait_for(lambda: page_text(browser, "#error")[0], "the 401 message")
    assert error.startswith("The server needs an API key (missing API key")
    assert browser.execute_script("return document.getElementById('prompt').value") == "In the beginning"
    assert page_text(browser, ".message") == []

    set_field(browser, "api-key", KEY)
    assert browser.execute_script("return localStorage.getItem('talis.apiKey')") == KEY
    assert wait_for(lambda: page_text(browser, "#model")[0], "the model's name") == "talis-default"
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", "40")
    set_field(browser, "prompt", "")
    watch_replies(browser)
    send(browser, "In the beginning")
    stats = wait_for(lambda: page_text(browser, ".stats"), "the stats line")[0]

    expected = api_reply(url, [{"role": "user", "content": "In the beginning"}], 40)
    reply = page_text(browser, ".message.assistant")[0]
    assert reply == expected["choices"][0]["message"]["content"]
    lengths = browser.execute_script("return window.replyLengths")
    growing = sorted(set(length for length in lengths if length))
    assert len(growing) >= 3 and growing[-1] == len(reply), lengths  # the text grew as it streamed
    tokens = expected["usage"]["completion_tokens"]
    assert re.fullmatch(rf"prompt \d+ tok( \(\+\d+ cached\))? \| reply {tokens} tok, \d+\.\d tok/s \| "
                        r"first token \d+ ms", stats), stats
    assert page_text(browser, "#error") == [""]


def test_the_stop_button_ends_a_reply_early_and_errors_show_the_servers_message(url, browser):
    browser.get(url + "/")  # a new chat; the key stays in localStorage
    assert browser.execute_script("return document.getElementById('api-key').value") == KEY
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", "400")
    generated_before = metric(url, "talis_completion_tokens_total")
    send(browser, "And God said")
    wait_for(lambda: len(page_text(browser, ".message.assistant")[0]) > 0, "the reply's first words")
    browser.execute_script("document.getElementById('stop').click()")
    wait_for(lambda: page_text(browser, ".note"), "the stopped note")
    stopped = page_text(browser, ".message.assistant")[0]
    # the server cancels the row: the batch empties before a whole reply could have been generated
    wait_for(lambda: metric(url, "talis_running_requests") == 0, "the server to cancel the request", timeout=10)
    generated = metric(url, "talis_completion_tokens_total") - generated_before
    assert page_text(browser, ".message.assistant")[0] == stopped  # nothing more arrives
    assert page_text(browser, ".stats:not(.note)") == []
    full = api_reply(url, [{"role": "user", "content": "And God said"}], 400)
    assert full["choices"][0]["message"]["content"].startswith(stopped)
    assert len(stopped) < len(full["choices"][0]["message"]["content"])
    assert generated < full["usage"]["completion_tokens"]

    set_field(browser, "temperature", "-1")
    send(browser, "Hello")
    error = wait_for(lambda: page_text(browser, "#error")[0], "the 400 message")
    assert error.startswith("temperature = -1.0 is out of range: allowed >= 0"), error


def test_clear_during_a_reply_starts_a_new_chat_with_nothing_of_the_old_one(url, browser):
    """Clear while a reply streams: the aborted reply is not kept (no note, no orphan assistant turn), so the next
    message is answered as the first of a new conversation."""
    browser.get(url + "/")
    set_field(browser, "api-key", KEY)
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", "400")
    send(browser, "And God said")
    wait_for(lambda: "".join(page_text(browser, ".message.assistant")), "the reply's first words")
    browser.execute_script("document.getElementById('clear').click()")
    wait_for(lambda: browser.execute_script("return !document.getElementById('send').disabled"), "the page to settle")
    assert page_text(browser, "#messages > *") == []
    set_field(browser, "max-tokens", "20")
    send(browser, "In the beginning")
    wait_for(lambda: page_text(browser, ".stats"), "the stats line")
    expected = api_reply(url, [{"role": "user", "content": "In the beginning"}], 20)
    assert page_text(browser, ".message") == ["In the beginning", expected["choices"][0]["message"]["content"]]
    assert page_text(browser, ".note") == [] and page_text(browser, "#error") == [""]
