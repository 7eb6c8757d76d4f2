"""The chat page in headless Chromium: type a message, watch the answer stream in, continue the
conversation, start a new chat. Chromium is driven over the DevTools protocol on a pipe
(--remote-debugging-pipe: JSON messages separated by NUL bytes on fds 3 and 4), so nothing but
Chromium itself is needed."""

import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time

import pytest
from helpers.server_harness import shared

BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium (CI installs it: apt-get install chromium)")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
]


class DevTools:
    """A minimal DevTools-protocol client: commands out, responses and events back."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="mlx_mixtral_chromium_")
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()
        # Chromium reads fd 3 and writes fd 4; bash (dash takes single-digit fds only) moves our pipe ends
        # there (fds >= 10, so the moves cannot clobber each other).
        r, w = fcntl.fcntl(to_browser, fcntl.F_DUPFD, 10), fcntl.fcntl(from_browser, fcntl.F_DUPFD, 10)
        for fd in (to_browser, from_browser):
            os.close(fd)
        self.proc = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$0" "$@" 3<&{r} 4>&{w} {r}<&- {w}>&-',
                BROWSER,
                *FLAGS,
                f"--user-data-dir={self.profile}",
                "about:blank",
            ],
            pass_fds=(r, w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(r)
        os.close(w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline - time.monotonic())
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def _read(self, timeout: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._in], [], [], max(timeout, 0))
            if not ready:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._in, self._out):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    def __init__(self, tools: DevTools, url: str):
        self.tools = tools
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Network.enable")
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.tools.send(method, params, self.session)

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    def type_and_send(self, text: str):
        self.eval("document.getElementById('input').focus()")
        self.send("Input.insertText", {"text": text})
        for kind in ("keyDown", "keyUp"):
            self.send(
                "Input.dispatchKeyEvent",
                {
                    "type": kind,
                    "key": "Enter",
                    "code": "Enter",
                    "windowsVirtualKeyCode": 13,
                    "text": "\r" if kind == "keyDown" else "",
                },
            )

    def answer(self) -> str:
        """Wait for the newest assistant answer to finish streaming; return its text."""
        self.wait_for(
            "document.body.dataset.state === 'idle' && "
            "document.querySelectorAll('.message.assistant.streaming').length === 0"
        )
        return self.eval("[...document.querySelectorAll('.message.assistant')].pop().textContent")

    def usage(self) -> tuple[int, int]:
        status = self.wait_for("document.getElementById('status').textContent")
        prompt, cached = re.match(r"(\d+) prompt tokens \((\d+) from cache\)", status).groups()
        return int(prompt), int(cached)


# Records every text the newest assistant bubble shows, so the test can see the answer grow.
WATCH = """
window.seen = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll('.message.assistant');
  if (answers.length) window.seen.push(answers[answers.length - 1].textContent);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def page():
    server = shared("server")
    tools = DevTools()
    try:
        page = Page(tools, server.url + "/")
        page.wait_for("document.readyState === 'complete' && document.getElementById('model').textContent")
        # Greedy answers, so they can be compared with transformers'.
        page.eval(
            "document.getElementById('temperature').value = '0'; "
            "document.getElementById('max-tokens').value = '16'; true"
        )
        page.url = server.url
        yield page
    finally:
        tools.close()


def test_chat_page_streams_an_answer(page):
    ref = shared("reference")
    page.eval(WATCH + "true")
    page.type_and_send("Hello from the browser")
    answer = page.answer()
    user = page.eval("[...document.querySelectorAll('.message.user')].pop().textContent")
    assert user == "Hello from the browser"
    conversation = [{"role": "user", "content": "Hello from the browser"}]
    assert answer == ref.greedy(ref.chat_ids(conversation), 16)[1]
    # The text grew piece by piece while the answer streamed.
    seen = [t for t in dict.fromkeys(page.eval("window.seen")) if t]
    assert len(seen) >= 3 and seen[-1] == answer
    assert all(answer.startswith(t) for t in seen)
    assert page.usage()[0] == len(ref.chat_ids(conversation))


def test_chat_page_continues_the_conversation_and_starts_new_ones(page):
    ref = shared("reference")
    first = [{"role": "user", "content": "Hello from the browser"}, {"role": "assistant", "content": page.answer()}]
    page.type_and_send("And then?")
    second = first + [{"role": "user", "content": "And then?"}]
    assert page.answer() == ref.greedy(ref.chat_ids(second), 16)[1]
    prompt, cached = page.usage()
    assert prompt == len(ref.chat_ids(second))  # the page sent the whole conversation ...
    assert cached >= len(ref.chat_ids(first[:1]))  # ... and the server reused what it had computed

    page.eval("document.getElementById('new-chat').click(); true")
    assert page.eval("document.querySelectorAll('.message').length") == 0
    page.type_and_send("A fresh start")
    fresh = [{"role": "user", "content": "A fresh start"}]
    assert page.answer() == ref.greedy(ref.chat_ids(fresh), 16)[1]
    assert page.usage()[0] == len(ref.chat_ids(fresh))


def test_chat_page_loads_nothing_from_elsewhere(page):
    urls = [e["params"]["request"]["url"] for e in page.tools.events if e.get("method") == "Network.requestWillBeSent"]
    assert urls and all(u.startswith(page.url + "/") for u in urls), urls
    assert {page.url + "/static/chat.js", page.url + "/static/chat.css"} <= set(urls)


def test_new_chat_during_an_answer_leaves_it_behind(page):
    """ "New chat" while an answer streams: the next conversation starts empty, not with that answer."""
    ref = shared("reference")
    page.eval("document.getElementById('max-tokens').value = '2000'; true")  # no EOS comes that soon here
    page.type_and_send("Tell me a long story")
    page.wait_for("(document.querySelector('.message.assistant.streaming') || {}).textContent")
    page.eval("document.getElementById('new-chat').click(); document.getElementById('max-tokens').value = '16'; true")
    page.wait_for("document.body.dataset.state === 'idle'")
    page.type_and_send("A fresh start")
    fresh = [{"role": "user", "content": "A fresh start"}]
    assert page.answer() == ref.greedy(ref.chat_ids(fresh), 16)[1]
    assert page.usage()[0] == len(ref.chat_ids(fresh))


VISIBLE = """(() => {
  const el = document.querySelector(%r);
  const r = el.getBoundingClientRect();
  const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
  return r.top >= 0 && r.bottom <= window.innerHeight && (hit === el || el.contains(hit));
})()"""


def test_header_and_composer_stay_in_view_after_a_long_answer(page):
    """The conversation scrolls; New chat, Settings and the message box do not scroll away with it."""
    page.send(
        "Emulation.setDeviceMetricsOverride", {"width": 700, "height": 420, "deviceScaleFactor": 1, "mobile": False}
    )
    try:
        page.eval(
            "document.getElementById('new-chat').click(); document.getElementById('max-tokens').value = '300'; true"
        )
        page.type_and_send("Tell me a long story")
        page.answer()
        # The answer is taller than the window: something had to scroll.
        assert page.eval("document.getElementById('messages').scrollHeight > window.innerHeight")
        for selector in ("#new-chat", "#settings > summary", "#input", "#send"):
            assert page.eval(VISIBLE % selector), f"{selector} scrolled out of view"
        # The conversation scrolls inside its own pane, which follows the answer to its end.
        assert page.eval(
            "(() => { const m = document.getElementById('messages').getBoundingClientRect();"
            " const a = [...document.querySelectorAll('.message.assistant')].pop().getBoundingClientRect();"
            " return a.bottom > m.top && a.bottom <= m.bottom + 1; })()"
        )
    finally:
        page.send("Emulation.clearDeviceMetricsOverride")
        page.eval("document.getElementById('max-tokens').value = '16'; true")
