"""The web chat page of `gptforge serve` (gptforge/serve/static/) in a real headless Chromium: it learns the
model from /v1/models, streams chat replies and completions over SSE as they arrive, stops a reply mid-stream
(the server sees the connection close), keeps a turn that got no reply out of the conversation, fits Max tokens
to a small context, sends the API key and the settings, keeps model output as text, shows the served step and
the context length, draws the training run's loss curve from /v1/run and follows it as the server switches
checkpoints (and hides it where the server has no run), and works on every screen: the layout at 1280 and 390
px (checked screenshots), keyboard-only use with a visible focus ring, and WCAG AA colour contrast measured in
the browser.

The browser tests run against a stub server written here (the OpenAI streaming format, with delays we
control), so they test the page alone; one more test drives the real server with a tiny chat model.
Chromium is Debian's `chromium` + `chromium-driver` (browser downloads are not possible here; .ci/run
installs them); without them the browser tests fail, they do not skip.
"""

import io
import json
import shutil
import socket
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import pytest

from gptforge.chat_template import add_chat_template, render_conversation
from gptforge.tokenizer import CharTokenizer

STATIC = Path(str(resources.files("gptforge") / "serve" / "static"))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
API_KEY = "sekrit"
HELLO = ["Hel", "lo ", "<b>not bold</b>", " w", "örld", " and", " more", " ✓"]  # "ö" is also split mid-byte
LONG = [f"word{i} " for i in range(400)]
ONCE = ["Once", " upon", " a", " time"]
CONTEXT = 256  # the stub model's max_model_len


def run_answer(step, training_step, follow=False, which="latest", curve=True) -> dict:
    """What GET /v1/run answers: train loss every 50 steps from 4.2 at step 0 down to 1.9 at step 450 (and on,
    for a longer run), val loss at 200 and 400 (and 600); curve=False: a served model that is no run directory."""
    train = [[s, round(4.2 - 2.3 * s / 450, 4)] for s in range(0, training_step + 1, 50)]
    val = [[s, v] for s, v in ((200, 2.9), (400, 2.1), (600, 1.8)) if s <= training_step]
    return {"model": "stub-model", "step": step, "which": which, "follow": follow, "training_step": training_step,
            "curve": {"train": train, "val": val} if curve else None}


# a served checkpoint at step 400 that is no run directory: the header has a step to show, the panel nothing
PLAIN_RUN = run_answer(400, 400, curve=False) | {"training_step": None}


# ----------------------------------------------------------------------------------------------
# The page's files (no browser)


def test_page_files_ship_in_the_package_and_fetch_nothing_from_the_internet():
    assert {p.name for p in STATIC.iterdir()} >= {"index.html", "app.js", "style.css"}
    for f in STATIC.iterdir():
        # the SVG namespace (app.js draws the loss chart with createElementNS) is a name, never fetched
        text = f.read_text(encoding="utf-8").replace('"http://www.w3.org/2000/svg"', "")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    assert 'src="app.js"' in html and 'href="style.css"' in html  # relative: served from wherever / is
    assert "innerHTML" not in (STATIC / "app.js").read_text(encoding="utf-8")  # model text never becomes HTML


# ----------------------------------------------------------------------------------------------
# A stub server in OpenAI's streaming format


class Stub:
    """Serves the static page and streams fixed replies; records what the page sent."""

    def __init__(self):
        self.requests: list[dict] = []
        self.gets: list[str] = []  # the paths of the GETs the page made
        self.disconnects = 0
        self.run: dict | None = PLAIN_RUN  # GET /v1/run's answer; None: a server without the route (404)
        self.health_step: int | None = None  # a "step" in GET /health, when set
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def last(self, path: str) -> dict:
        return [r for r in self.requests if r["path"] == path][-1]

    def _handler(stub):  # `stub`, not `self`: inside Handler, `self` is the request handler
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = urllib.parse.urlsplit(self.path).path  # the page may be opened as /?poll=200
                stub.gets.append(path)
                if path == "/health":
                    health = {"status": "ok", "model": "stub-model", "running": 0}
                    return self._json(200, health | ({"step": stub.health_step} if stub.health_step else {}))
                if path == "/v1/run":
                    run = stub.run  # read once: a test may swap it between polls
                    if run is None:
                        return self._json(404, {"error": {"message": "no such route"}})
                    if self._authorized():
                        self._json(200, run)
                    return
                if path == "/v1/models":
                    if self._authorized():
                        self._json(200, {"object": "list", "data": [
                            {"id": "stub-model", "object": "model", "max_model_len": CONTEXT}]})
                    return
                name = "index.html" if path == "/" else path.lstrip("/")
                if name not in {"index.html", "app.js", "style.css"}:
                    return self._json(404, {"error": {"message": "not found"}})
                kind = {"html": "text/html", "js": "text/javascript", "css": "text/css"}[name.rsplit(".", 1)[1]]
                self._send(200, kind + "; charset=utf-8", (STATIC / name).read_bytes())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                if not self._authorized():
                    return
                if self.path == "/v1/chat/completions":
                    last = body["messages"][-1]["content"]
                    if "fail" in last:  # what a 400 (or a 429) looks like to the page
                        return self._json(400, {"error": {"message": "the stub refuses this turn", "param": None,
                                                          "type": "invalid_request_error", "code": None}})
                    pause = 3.0 if "slow" in last else 0.0  # time to press Stop before the first token
                    self._stream("chat.completion.chunk", LONG if "long" in last else HELLO, chat=True, pause=pause)
                elif self.path == "/v1/completions":
                    self._stream("text_completion", ONCE, chat=False)

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {API_KEY}":
                    return True
                self._json(401, {"error": {"message": "invalid API key", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}})
                return False

            def _stream(self, kind: str, pieces: list[str], chat: bool, pause: float = 0.0):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                try:
                    self.wfile.flush()
                    time.sleep(pause)
                    for i, piece in enumerate(pieces):
                        choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                        choice["finish_reason"] = "stop" if i == len(pieces) - 1 else None
                        chunk = json.dumps({"object": kind, "choices": [choice]}, ensure_ascii=False)
                        event = f"data: {chunk}\n\n".encode()
                        if "ö" in piece:  # a read that ends inside a character and inside an event
                            cut = event.index("ö".encode()) + 1
                            self.wfile.write(event[:cut])
                            time.sleep(0.05)
                            event = event[cut:]
                        self.wfile.write(event)
                        time.sleep(0.12 if pieces is not LONG else 0.03)
                    self.wfile.write(b"data: [DONE]\n\n")
                except (BrokenPipeError, ConnectionResetError):
                    stub.disconnects += 1

            def _json(self, code: int, obj: dict):
                self._send(code, "application/json", json.dumps(obj).encode())

            def _send(self, code: int, kind: str, data: bytes):
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


# ----------------------------------------------------------------------------------------------
# The browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: install Debian's packages with "
                    "`apt-get install -y chromium chromium-driver` (as root; .ci/run does this)", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[dev]'", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-proxy-server", "--disable-dev-shm-usage", "--window-size=1200,800",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def stub():
    s = Stub()
    yield s
    s.close()


def wait_for(predicate, timeout=10.0, what="the page"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def by_id(driver, id_):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, id_)


def replies(driver) -> list[str]:
    from selenium.webdriver.common.by import By
    return [e.get_property("textContent") for e in driver.find_elements(By.CSS_SELECTOR, ".message.assistant .text")]


def watch_reply(driver, n: int, until) -> list[str]:
    """Every distinct text reply number `n` showed while streaming, until `until(text)` holds."""
    seen: list[str] = []
    def step():
        texts = replies(driver)
        text = texts[n] if len(texts) > n else ""
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        return text and until(text)
    wait_for(step, 20, "the streamed reply")
    return seen


def uncaught_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if "Uncaught" in e["message"]]


def open_page(driver, url: str, api_key: str | None, query: str = ""):
    driver.get(url + "/" + query)
    if api_key is not None:
        from selenium.webdriver.common.keys import Keys
        key = by_id(driver, "api-key")
        key.clear()
        key.send_keys(api_key + Keys.TAB)  # the change event stores it and asks /v1/models again


# ----------------------------------------------------------------------------------------------
# The page against the stub


@pytest.mark.integration
def test_the_key_is_asked_for_stored_and_sent(browser, stub):
    browser.get(stub.url + "/")
    browser.execute_script("localStorage.clear()")
    asked = len(stub.gets)
    browser.refresh()
    # without the key the page says what the server said instead of a model name
    wait_for(lambda: by_id(browser, "status").text == "invalid API key", what="the 401 message")
    assert by_id(browser, "model").text == "not connected"
    # /v1/run answers 401 too: no run, no step
    wait_for(lambda: "/v1/run" in stub.gets[asked:], what="the page to ask for the run")
    time.sleep(0.2)
    assert not by_id(browser, "run-panel").is_displayed() and by_id(browser, "model-step").text == ""
    open_page(browser, stub.url, API_KEY)
    wait_for(lambda: by_id(browser, "model").text == "stub-model", what="the model name")
    browser.refresh()  # the key survives a reload
    wait_for(lambda: by_id(browser, "model").text == "stub-model", what="the model name after a reload")
    assert by_id(browser, "api-key").get_property("value") == API_KEY


@pytest.mark.integration
def test_a_reply_streams_in_as_text_and_the_conversation_carries_on(browser, stub):
    open_page(browser, stub.url, API_KEY)
    wait_for(lambda: by_id(browser, "model").text == "stub-model", what="the model name")
    by_id(browser, "new-chat").click()
    by_id(browser, "system").clear()
    by_id(browser, "system").send_keys("be brief")
    for field, value in (("temperature", "0.5"), ("top-p", "0.9"), ("max-tokens", "40")):
        by_id(browser, field).clear()
        by_id(browser, field).send_keys(value)
    by_id(browser, "input").send_keys("hello there")
    by_id(browser, "send").click()

    full = "".join(HELLO)
    seen = watch_reply(browser, 0, lambda t: t == full)
    assert len(seen) >= 4, seen  # it grew piece by piece, not all at the end
    assert all(b.startswith(a) and b != a for a, b in zip(seen, seen[1:])), seen
    from selenium.webdriver.common.by import By
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages b")  # the model's "<b>" stayed text
    wait_for(lambda: by_id(browser, "send").is_enabled(), what="send to come back")
    assert not by_id(browser, "stop").is_enabled()

    sent = stub.last("/v1/chat/completions")
    assert sent["auth"] == f"Bearer {API_KEY}"
    assert sent["body"]["stream"] is True and sent["body"]["model"] == "stub-model"
    assert (sent["body"]["temperature"], sent["body"]["top_p"], sent["body"]["max_tokens"]) == (0.5, 0.9, 40)
    assert sent["body"]["messages"] == [{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": "hello there"}]

    by_id(browser, "input").send_keys("and then?\n")  # Enter sends
    watch_reply(browser, 1, lambda t: t == full)
    assert stub.last("/v1/chat/completions")["body"]["messages"][1:] == [
        {"role": "user", "content": "hello there"}, {"role": "assistant", "content": full},
        {"role": "user", "content": "and then?"}]

    by_id(browser, "new-chat").click()
    assert replies(browser) == []
    assert not uncaught_errors(browser)


@pytest.mark.integration
def test_stop_ends_a_long_reply_and_closes_the_stream(browser, stub):
    open_page(browser, stub.url, API_KEY)
    by_id(browser, "new-chat").click()
    disconnects = stub.disconnects
    by_id(browser, "input").send_keys("write something long\n")
    watch_reply(browser, 0, lambda t: len(t) > 40)
    assert by_id(browser, "stop").is_enabled()
    by_id(browser, "stop").click()
    wait_for(lambda: by_id(browser, "status").text == "stopped", what="the stopped status")
    stopped = replies(browser)[0]
    time.sleep(0.5)  # 15 more pieces would have arrived by now
    assert replies(browser)[0] == stopped and len(stopped) < len("".join(LONG)) // 2
    assert by_id(browser, "send").is_enabled()
    wait_for(lambda: stub.disconnects > disconnects, 5, "the server to see the stream closed")

    # the part that arrived stays in the conversation
    by_id(browser, "input").send_keys("thanks\n")
    watch_reply(browser, 1, lambda t: t == "".join(HELLO))
    assert stub.last("/v1/chat/completions")["body"]["messages"][-2] == {"role": "assistant", "content": stopped}


@pytest.mark.integration
def test_a_turn_without_a_reply_leaves_the_conversation(browser, stub):
    """A turn the server refuses, and one stopped before its first token, stay on the page (dimmed, the error
    shown) but out of the conversation: the next turn is sent without them and is answered."""
    from selenium.webdriver.common.by import By

    open_page(browser, stub.url, API_KEY)
    wait_for(lambda: by_id(browser, "model").text == "stub-model", what="the model name")
    by_id(browser, "new-chat").click()
    by_id(browser, "input").send_keys("please fail\n")
    wait_for(lambda: replies(browser) == ["the stub refuses this turn"], what="the error in the reply's place")
    wait_for(lambda: by_id(browser, "send").is_enabled(), what="send to come back")
    by_id(browser, "input").send_keys("a slow start\n")
    wait_for(lambda: by_id(browser, "stop").is_enabled(), what="stop to be offered")
    by_id(browser, "stop").click()
    wait_for(lambda: by_id(browser, "status").text == "stopped", what="the stopped status")
    assert replies(browser) == ["the stub refuses this turn"]  # the empty reply left, the error stays
    by_id(browser, "input").send_keys("hello there\n")
    wait_for(lambda: replies(browser)[-1:] == ["".join(HELLO)], 20, "the next reply")
    assert stub.last("/v1/chat/completions")["body"]["messages"] == [{"role": "user", "content": "hello there"}]
    dimmed = browser.find_elements(By.CSS_SELECTOR, ".message.user.unanswered .text")
    assert [e.get_property("textContent") for e in dimmed] == ["please fail", "a slow start"]
    assert not uncaught_errors(browser)


@pytest.mark.integration
def test_the_completion_box_streams_a_base_model_continuation(browser, stub):
    open_page(browser, stub.url, API_KEY)
    by_id(browser, "tab-complete").click()
    assert not by_id(browser, "chat-view").is_displayed()
    by_id(browser, "prompt").send_keys("A story:")
    by_id(browser, "complete").click()
    seen: list[str] = []
    def step():
        text = by_id(browser, "completion").get_property("textContent")
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        return text == "".join(ONCE)
    wait_for(step, what="the streamed completion")
    assert len(seen) >= 3, seen
    body = stub.last("/v1/completions")["body"]
    assert body["prompt"] == "A story:" and body["stream"] is True
    by_id(browser, "tab-chat").click()


# ----------------------------------------------------------------------------------------------
# Every screen: the layout at 1280 and 390 px, keyboard-only use, colour contrast


@contextmanager
def viewport(driver, width: int, height: int):
    """The page `width` CSS px wide (headless Chromium's viewport is the window's width; its height is a
    little less than the window's), back to the module's 1200 x 800 afterwards."""
    driver.set_window_size(width, height)
    try:
        wait_for(lambda: driver.execute_script("return innerWidth") == width, 5, f"a {width} px wide viewport")
        yield
    finally:
        driver.set_window_size(1200, 800)


def rect(driver, id_) -> dict:
    return driver.execute_script("const r = document.getElementById(arguments[0]).getBoundingClientRect();"
                                 "return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width}",
                                 id_)


def screenshot(driver, path: Path):
    """The page as a PIL image, saved at `path`, checked to be a PNG of the viewport's size."""
    from PIL import Image

    assert driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, ratio = driver.execute_script("return [innerWidth, innerHeight, devicePixelRatio]")
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.size == (round(width * ratio), round(height * ratio))
    return image, ratio


def share(image, colour, box) -> float:
    """The share of the pixels in `box` (left, top, right, bottom) that are exactly `colour`."""
    region = image.crop(box)
    return sum(n for n, c in region.getcolors(region.width * region.height) if c == colour) / (region.width * region.height)


def bbox_of(image, colour):
    """The bounding box of the pixels of exactly `colour`, or None."""
    from PIL import ImageChops

    r, g, b = (band.point(lambda v, c=c: 255 if v == c else 0) for band, c in zip(image.split(), colour))
    return ImageChops.multiply(ImageChops.multiply(r, g), b).getbbox()


BG, PANEL, ACCENT, USER = (0xF6, 0xF7, 0xF9), (0xFF, 0xFF, 0xFF), (0x2F, 0x6F, 0xDF), (0xE6, 0xEF, 0xFF)


def chat_once(driver, text="hello there"):
    by_id(driver, "input").send_keys(text + "\n")
    n = len(driver.find_elements("css selector", ".message.user")) - 1
    watch_reply(driver, n, lambda t: t == "".join(HELLO))
    wait_for(lambda: by_id(driver, "send").is_enabled(), what="send to come back")


@pytest.mark.integration
def test_the_layout_at_1280_and_390_px(browser, stub, tmp_path, monkeypatch):
    """Wide: the settings column (with the run's chart) beside the conversation. Narrow: the settings fold away
    behind a toggle, the conversation takes the width, nothing overflows sideways. Both checked on the
    elements' boxes and on a screenshot (the pixels of the settings column, the user's bubble, the accent)."""
    monkeypatch.setattr(stub, "run", run_answer(400, 450))
    with viewport(browser, 1280, 800):
        open_page(browser, stub.url, API_KEY)
        wait_for(lambda: by_id(browser, "run-panel").is_displayed(), what="the run panel")
        chat_once(browser)
        aside, messages = rect(browser, "settings"), rect(browser, "messages")
        assert by_id(browser, "settings").is_displayed() and not by_id(browser, "settings-toggle").is_displayed()
        assert aside["left"] == 0 and aside["right"] <= messages["left"] and aside["width"] >= 200
        assert browser.execute_script("return document.scrollingElement.scrollWidth <= innerWidth")
        wide, ratio = screenshot(browser, tmp_path / "page-1280.png")
        assert len(wide.getcolors(wide.width * wide.height)) > 50  # anti-aliased text, not a blank page
        top = round(rect(browser, "settings")["top"] * ratio)
        # a white column down the left: the settings panel, to the left of the conversation's grey
        assert share(wide, PANEL, (0, top + 1, round(aside["right"] * ratio) - 2, wide.height)) > 0.6
        assert share(wide, BG, (round(messages["left"] * ratio), top + 1, wide.width, wide.height)) > 0.3
        bubble = bbox_of(wide, USER)  # the user's message, on the right of the conversation
        assert bubble and bubble[0] >= messages["left"] * ratio and bubble[2] <= wide.width
        assert bbox_of(wide, ACCENT)  # the Send button: the style sheet loaded

    with viewport(browser, 390, 844):
        width = browser.execute_script("return innerWidth")
        messages = rect(browser, "messages")
        assert messages["width"] >= 0.8 * width, (messages, width)
        assert not by_id(browser, "settings").is_displayed() and not by_id(browser, "api-key").is_displayed()
        toggle = by_id(browser, "settings-toggle")
        assert toggle.is_displayed() and toggle.get_attribute("aria-expanded") == "false"
        assert all(by_id(browser, i).is_displayed() for i in ("model", "model-step", "model-context", "tab-chat"))
        assert browser.execute_script("return document.scrollingElement.scrollWidth <= innerWidth")
        narrow, ratio = screenshot(browser, tmp_path / "page-390.png")
        assert narrow.width < wide.width
        top = round(messages["top"] * ratio)
        # no white settings column any more: the left edge below the header is the page's grey
        assert share(narrow, BG, (0, top, round(12 * ratio), narrow.height)) > 0.9
        bubble = bbox_of(narrow, USER)
        assert bubble and bubble[2] > 0.8 * narrow.width  # the bubble sits at the right edge of the full width
        assert bbox_of(narrow, ACCENT)

        toggle.click()  # the settings open above the conversation, still within the width
        assert toggle.get_attribute("aria-expanded") == "true"
        wait_for(lambda: by_id(browser, "api-key").is_displayed(), what="the settings to open")
        assert by_id(browser, "run-panel").is_displayed()
        assert rect(browser, "settings")["width"] >= 0.9 * width
        # the open settings scroll within their own box: the page still fits the screen both ways
        assert browser.execute_script("const d = document.scrollingElement;"
                                      "return d.scrollWidth <= innerWidth && d.scrollHeight <= innerHeight")
        assert by_id(browser, "input").is_displayed() and rect(browser, "input")["bottom"] <= 844
        screenshot(browser, tmp_path / "page-390-settings.png")
        toggle.click()
        assert not by_id(browser, "settings").is_displayed()
    print(f"screenshots: {tmp_path}")


def tab_through(driver, presses: int, back: bool = False) -> list[dict]:
    """Press Tab (or Shift+Tab) `presses` times; what had focus after each press, and its focus ring."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    seen = []
    for _ in range(presses):
        chain = ActionChains(driver)
        if back:
            chain.key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
        else:
            chain.send_keys(Keys.TAB).perform()
        seen.append(driver.execute_script(COLOUR_JS + "return focusRing(document.activeElement)"))
    return seen


def press(driver, *keys):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*keys).perform()


def assert_ring(focus: dict):
    """A focus ring anyone can see: an outline (or a box-shadow) at least 2 px wide, 3:1 against the
    background around the element (WCAG's non-text contrast)."""
    assert focus["visible"], focus
    assert (focus["style"] != "none" and focus["width"] >= 2) or focus["shadow"] != "none", focus
    assert focus["contrast"] >= 3, focus


@pytest.mark.integration
def test_the_page_works_from_the_keyboard_alone(browser, stub):
    """Tab visits the tabs, the settings, the message box and its buttons in reading order, each with a
    visible focus ring; Enter sends, Escape stops a reply; the arrow keys switch tabs; on a narrow screen the
    settings toggle opens them from the keyboard."""
    from selenium.webdriver.common.keys import Keys

    open_page(browser, stub.url, API_KEY)  # stores the key, so the fresh loads below are connected
    browser.get(stub.url + "/")
    wait_for(lambda: by_id(browser, "model").text == "stub-model", what="the model name")
    order = ["tab-chat", "api-key", "system", "temperature", "top-p", "max-tokens", "input", "send", "new-chat"]
    seen = tab_through(browser, len(order))
    assert [f["id"] for f in seen] == order  # Stop is disabled: no stop on the way
    for focus in seen:
        assert_ring(focus)

    # back to the message box; Enter sends, and the reply streams in
    assert [f["id"] for f in tab_through(browser, 2, back=True)] == ["send", "input"]
    press(browser, "hello there", Keys.ENTER)
    watch_reply(browser, 0, lambda t: t == "".join(HELLO))
    wait_for(lambda: by_id(browser, "send").is_enabled(), what="send to come back")
    assert browser.execute_script("return document.activeElement.id") == "input"  # ready for the next turn
    press(browser, "write something long", Keys.ENTER)
    watch_reply(browser, 1, lambda t: len(t) > 20)
    press(browser, Keys.ESCAPE)
    wait_for(lambda: by_id(browser, "status").text == "stopped", what="Escape to stop the reply")

    # the tabs: the arrow keys select and focus the other one; it is the one Tab stop of the tab list
    browser.get(stub.url + "/")
    wait_for(lambda: by_id(browser, "model").text == "stub-model", what="the model name")
    assert tab_through(browser, 1)[0]["id"] == "tab-chat"
    press(browser, Keys.ARROW_RIGHT)
    complete = by_id(browser, "tab-complete")
    assert browser.execute_script("return document.activeElement.id") == "tab-complete"
    assert complete.get_attribute("aria-selected") == "true" and by_id(browser, "tab-chat").get_attribute("aria-selected") == "false"
    assert by_id(browser, "complete-view").is_displayed() and not by_id(browser, "chat-view").is_displayed()
    seen = tab_through(browser, 6)
    assert [f["id"] for f in seen] == ["api-key", "system", "temperature", "top-p", "max-tokens", "prompt"]
    press(browser, "A story:")
    seen = tab_through(browser, 1)
    assert seen[0]["id"] == "complete"
    assert_ring(seen[0])
    press(browser, Keys.ENTER)  # a focused button runs on Enter
    wait_for(lambda: by_id(browser, "completion").get_property("textContent") == "".join(ONCE), what="the completion")
    tab_through(browser, 7, back=True)
    assert browser.execute_script("return document.activeElement.id") == "tab-complete"
    press(browser, Keys.HOME)
    assert by_id(browser, "chat-view").is_displayed() and by_id(browser, "tab-chat").get_attribute("aria-selected") == "true"

    # narrow: the toggle is the next stop after the tabs, and Enter opens the settings right behind it
    with viewport(browser, 390, 844):
        browser.get(stub.url + "/")
        wait_for(lambda: by_id(browser, "model").text == "stub-model", what="the model name")
        seen = tab_through(browser, 5)
        assert [f["id"] for f in seen] == ["tab-chat", "settings-toggle", "input", "send", "new-chat"]
        for focus in seen:
            assert_ring(focus)
        tab_through(browser, 3, back=True)
        press(browser, Keys.ENTER)
        assert by_id(browser, "settings-toggle").get_attribute("aria-expanded") == "true"
        assert [f["id"] for f in tab_through(browser, 2)] == ["api-key", "system"]
    assert not uncaught_errors(browser)


# The WCAG 2 contrast ratio, computed in the browser on the colours it actually paints. A text's background is
# found by walking up its ancestors to the first opaque background colour (compositing any translucent ones on
# the way); a text's own alpha and any opacity above it are blended in, so a faded text fails as it should.
COLOUR_JS = r"""
function rgba(c) {
  const m = /rgba?\(([^)]+)\)/.exec(c || "");
  if (!m) return null;
  const p = m[1].split(/[\s,\/]+/).filter(Boolean).map(Number);
  return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
}
function over(top, under) { return [0, 1, 2].map((i) => top[i] * top[3] + under[i] * (1 - top[3])).concat([1]); }
function backgroundOf(el) {
  const layers = [];
  for (let e = el; e; e = e.parentElement) {
    const c = rgba(getComputedStyle(e).backgroundColor);
    if (c && c[3] > 0) { layers.push(c); if (c[3] >= 1) break; }
  }
  return layers.reverse().reduce((under, c) => over(c, under), [255, 255, 255, 1]);
}
function luminance(c) {
  const [r, g, b] = c.slice(0, 3).map((v) => { v /= 255; return v <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}
function contrast(a, b) {
  const [hi, lo] = [luminance(a), luminance(b)].sort((x, y) => y - x);
  return (hi + 0.05) / (lo + 0.05);
}
function opacityOf(el) {
  let o = 1;
  for (let e = el; e; e = e.parentElement) o *= parseFloat(getComputedStyle(e).opacity);
  return o;
}
function textContrast(el, colour) {
  const bg = backgroundOf(el), fg = rgba(colour);
  fg[3] *= opacityOf(el);
  return { contrast: contrast(over(fg, bg), bg), fg: colour, bg: "rgb(" + bg.slice(0, 3).join(", ") + ")" };
}
function focusRing(el) {
  const cs = getComputedStyle(el);
  const ring = rgba(cs.outlineColor) || [0, 0, 0, 0];
  return { id: el.id || el.tagName, visible: el.matches(":focus-visible"), style: cs.outlineStyle,
           width: parseFloat(cs.outlineWidth) || 0, shadow: cs.boxShadow,
           contrast: contrast(over(ring, backgroundOf(el.parentElement)), backgroundOf(el.parentElement)) };
}
"""

# Every visible text: elements with text of their own (SVG text: its fill is its colour), the values and
# placeholders of the fields. Disabled controls are exempt in WCAG: they are held to 3:1 (legible), not 4.5.
CONTRAST_JS = COLOUR_JS + r"""
const found = [];
const name = (el) => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") +
  (el.getAttribute("class") ? "." + el.getAttribute("class").trim().split(/\s+/).join(".") : "");
const seen = (el) => el.checkVisibility({ visibilityProperty: true, opacityProperty: false }) && el.getClientRects().length;
for (const el of document.body.querySelectorAll("*")) {
  if (!seen(el) || el.closest("script, style")) continue;
  const disabled = !!el.closest(":disabled");
  const own = [...el.childNodes].some((n) => n.nodeType === Node.TEXT_NODE && n.textContent.trim());
  const cs = getComputedStyle(el);
  if (own) found.push({ what: name(el), text: el.textContent.trim().slice(0, 40), disabled,
                        ...textContrast(el, el instanceof SVGElement ? cs.fill : cs.color) });
  if (el.matches("input, textarea")) {
    if (el.value) found.push({ what: name(el) + " value", text: el.value.slice(0, 40), disabled, ...textContrast(el, cs.color) });
    else if (el.placeholder) found.push({ what: name(el) + "::placeholder", text: el.placeholder.slice(0, 40), disabled,
                                          ...textContrast(el, getComputedStyle(el, "::placeholder").color) });
  }
}
return found;
"""


def low_contrast(driver) -> tuple[list[dict], set[str]]:
    found = driver.execute_script(CONTRAST_JS)
    bad = [f for f in found if f["contrast"] < (3 if f["disabled"] else 4.5)]
    return bad, {f["what"] for f in found}


@pytest.mark.integration
def test_every_text_passes_wcag_aa_contrast(browser, stub, monkeypatch):
    """Every visible text, measured in the browser against the background it sits on, is at least 4.5:1 (WCAG
    AA for normal text), at 1280 and 390 px: the muted labels, placeholders, the role labels, the status line,
    an error, an unanswered turn, the run panel's chart labels, the completion view (and disabled buttons are
    still 3:1)."""
    monkeypatch.setattr(stub, "run", run_answer(400, 450))
    open_page(browser, stub.url, API_KEY)
    wait_for(lambda: by_id(browser, "run-panel").is_displayed(), what="the run panel")
    by_id(browser, "new-chat").click()
    by_id(browser, "input").send_keys("please fail\n")  # an error in the reply's place, the turn unanswered
    wait_for(lambda: replies(browser) == ["the stub refuses this turn"], what="the error")
    wait_for(lambda: by_id(browser, "send").is_enabled(), what="send to come back")
    chat_once(browser)
    browser.execute_script("document.getElementById('status').textContent = 'now serving step 600'")
    for width, height in ((1280, 800), (390, 844)):
        with viewport(browser, width, height):
            if width < 700:
                by_id(browser, "settings-toggle").click()  # folded settings are not on screen: open them
            bad, checked = low_contrast(browser)
            assert not bad, (width, bad)
            assert {"p#status", "span.role", "div.text", "label", "p#run-text", "text.chart-label", "p.legend",
                    "span#model", "span#model-step", "textarea#input::placeholder", "button#stop"} <= checked, checked
            by_id(browser, "tab-complete").click()
            bad, checked = low_contrast(browser)
            assert not bad, (width, bad)
            assert {"textarea#prompt::placeholder", "button#complete.primary"} <= checked, checked
            by_id(browser, "tab-chat").click()
    # the error, and the unanswered turn (once faded to 0.55 opacity, about 2.6:1), measured one by one
    for selector in (".message.error .text", ".message.unanswered .text", ".message.unanswered .role"):
        ratio = browser.execute_script(COLOUR_JS + """
            const el = document.querySelector(arguments[0]);
            return textContrast(el, getComputedStyle(el).color).contrast""", selector)
        assert ratio >= 4.5, (selector, ratio)


# ----------------------------------------------------------------------------------------------
# What the page says about the model and its training run


@pytest.mark.integration
def test_the_header_shows_the_step_and_the_context_length(browser, stub):
    open_page(browser, stub.url, API_KEY)
    wait_for(lambda: by_id(browser, "model-step").text == "step 400", what="the served step")
    assert by_id(browser, "model").text == "stub-model"
    assert by_id(browser, "model-context").text == f"context {CONTEXT} tokens"
    assert f"context: {CONTEXT} tokens" in by_id(browser, "max-tokens").get_attribute("placeholder")
    assert not by_id(browser, "run-panel").is_displayed()  # a step, but no curve: no panel


def chart(driver) -> dict:
    """The loss chart's parts: the train line's and the val points' x, y, the served step's line, its name."""
    return driver.execute_script("""
        const svg = document.querySelector('#run-chart svg');
        if (!svg) return null;
        const pts = (sel) => { const l = svg.querySelector(sel);
          return l ? l.getAttribute('points').split(' ').map((p) => p.split(',').map(Number)) : []; };
        const served = svg.querySelector('.chart-served');
        return { role: svg.getAttribute('role'), label: svg.getAttribute('aria-label'),
                 train: pts('.chart-train'), val: pts('.chart-val'),
                 valPoints: svg.querySelectorAll('.chart-val-point').length,
                 served: served ? Number(served.getAttribute('x1')) : null,
                 labels: [...svg.querySelectorAll('text')].map((t) => t.textContent),
                 box: svg.getBoundingClientRect().width };
    """)


@pytest.mark.integration
def test_the_run_panel_draws_the_loss_curve_and_follows_the_run(browser, stub, monkeypatch):
    """/v1/run's curve becomes a line chart with the served step marked; while the server follows the run the
    page polls it (every 200 ms here, ?poll=200), and a new served step updates the header, the chart and the
    status line, while the conversation stays."""
    first = run_answer(400, 450, follow=True)
    monkeypatch.setattr(stub, "run", first)
    open_page(browser, stub.url, API_KEY, "?poll=200")
    wait_for(lambda: by_id(browser, "run-panel").is_displayed(), what="the run panel")
    assert by_id(browser, "run-text").text.startswith("serving step 400 of 450 (latest)")
    assert by_id(browser, "model-step").text == "step 400"
    drawn = chart(browser)
    train, val = first["curve"]["train"], first["curve"]["val"]
    assert drawn["role"] == "img" and drawn["box"] > 150
    assert drawn["label"] == "train loss from 4.2 at step 0 to 1.9 at step 450; val loss 2.1 at step 400; serving step 400"
    assert len(drawn["train"]) == len(train) and len(drawn["val"]) == drawn["valPoints"] == len(val)
    xs = [x for x, _ in drawn["train"]]
    ys = [y for _, y in drawn["train"]]
    assert xs == sorted(xs) and ys == sorted(ys)  # steps left to right, a falling loss drawn downward in SVG y
    assert drawn["served"] == xs[[s for s, _ in train].index(400)]  # the marker stands at step 400
    assert "0" in drawn["labels"] and "450" in drawn["labels"] and "4.2" in drawn["labels"]

    chat_once(browser)  # a conversation with the model at step 400
    polls = stub.gets.count("/v1/run")
    monkeypatch.setattr(stub, "run", run_answer(600, 650, follow=True))  # the run saved a newer checkpoint
    wait_for(lambda: by_id(browser, "model-step").text == "step 600", 5, "the header to follow the run")
    assert by_id(browser, "status").text == "now serving step 600"
    assert by_id(browser, "run-text").text.startswith("serving step 600 of 650 (latest)")
    drawn = chart(browser)
    assert len(drawn["train"]) == 14 and drawn["valPoints"] == 3 and drawn["served"] == drawn["train"][12][0]
    assert "serving step 600" in drawn["label"] and "at step 650" in drawn["label"]
    assert replies(browser) == ["".join(HELLO)]  # the conversation stayed
    assert stub.gets.count("/v1/run") > polls
    chat_once(browser, "and then?")  # and carries on, with the history it had
    assert [m["role"] for m in stub.last("/v1/chat/completions")["body"]["messages"]] == ["user", "assistant", "user"]
    assert not uncaught_errors(browser)


@pytest.mark.integration
def test_without_a_run_route_the_panel_stays_hidden_and_chat_works(browser, stub, monkeypatch):
    """An older server answers 404 at /v1/run: no panel, no errors, chat as before (and a step the server
    gives in /health still reaches the header)."""
    monkeypatch.setattr(stub, "run", None)
    monkeypatch.setattr(stub, "health_step", 300)
    asked = len(stub.gets)
    open_page(browser, stub.url, API_KEY, "?poll=200")
    wait_for(lambda: by_id(browser, "model-step").text == "step 300", what="the step from /health")
    assert "/v1/run" in stub.gets[asked:]
    assert by_id(browser, "model-context").text == f"context {CONTEXT} tokens"
    by_id(browser, "new-chat").click()
    chat_once(browser)
    time.sleep(0.5)
    assert not by_id(browser, "run-panel").is_displayed() and not browser.find_elements("css selector", "#run-chart svg")
    gets = stub.gets[asked:]
    assert gets.count("/v1/run") == gets.count("/v1/models")  # asked once per load (per API key), not polled
    assert not uncaught_errors(browser)


# ----------------------------------------------------------------------------------------------
# The page against the real server, on a tiny chat model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def real_server():
    """The server's app on a tiny random chat model, under uvicorn in a thread; yields (url, model, tokenizer)."""
    import torch
    import uvicorn

    from gptforge.serve.app import Limits, create_app
    from gptforge.serve.batcher import Batcher
    from tiny import CHARS, nonempty_seed
    from tiny import tiny_chat_model as tiny_model

    tok = add_chat_template(CharTokenizer(CHARS, eot=True))
    model = tiny_model(tok, nonempty_seed(tok))
    engine = Batcher(model, tok, torch.device("cpu"), torch.float32).start()
    app = create_app(engine, tok, "tiny-chat", Limits(context_length=model.config.block_size), api_key=API_KEY)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "the server to start")
        yield f"http://127.0.0.1:{port}", model, tok
    finally:
        server.should_exit = True
        thread.join(10)
        engine.close()


@pytest.mark.integration
def test_max_tokens_fits_a_small_context(browser, real_server):
    """On a model with a 64-token context the page's default asks for no more than the context holds, a Max
    tokens larger than the room a conversation leaves is fitted to it, and a conversation grown past the
    context drops its oldest exchanges: every turn is answered."""
    from selenium.webdriver.common.by import By

    url, model, tok = real_server
    assert model.config.block_size == 64
    open_page(browser, url, API_KEY)
    wait_for(lambda: by_id(browser, "model").text == "tiny-chat", what="the model name from /v1/models")
    statuses = []
    turns = [("hello there", None), ("and then?", "1000"), ("more", "60")] + [("tell me a story", None)] * 9
    for text, max_tokens in turns:
        if max_tokens:
            by_id(browser, "max-tokens").clear()
            by_id(browser, "max-tokens").send_keys(max_tokens)
        by_id(browser, "input").send_keys(text + "\n")
        wait_for(lambda: by_id(browser, "send").is_enabled() and by_id(browser, "status").text != "generating…",
                 20, "the turn to end")
        errors = browser.find_elements(By.CSS_SELECTOR, ".message.error .text")
        assert not errors, errors[0].get_property("textContent")
        statuses.append(by_id(browser, "status").text)
        if "dropped to fit the context" in statuses[-1]:
            break
    # the conversation outgrew the 64-token context: the oldest exchanges left it, and the turn was answered
    assert "dropped to fit the context" in statuses[-1], statuses
    assert "64" in by_id(browser, "max-tokens").get_attribute("placeholder")  # the page says what "auto" means


@pytest.mark.integration
def test_the_page_chats_with_the_real_server(browser, real_server):
    from tiny import fresh_greedy

    url, model, tok = real_server
    browser.get(url + "/")
    browser.execute_script("localStorage.clear()")
    open_page(browser, url, API_KEY)
    wait_for(lambda: by_id(browser, "model").text == "tiny-chat", what="the model name from /v1/models")
    for field, value in (("temperature", "0"), ("max-tokens", "8")):
        by_id(browser, field).clear()
        by_id(browser, field).send_keys(value)
    by_id(browser, "system").clear()
    by_id(browser, "input").send_keys("hello there\n")
    prompt = render_conversation(tok, [{"role": "user", "content": "hello there"}], for_generation=True)[0]
    expected = tok.decode(fresh_greedy(model, tok, prompt, 8))  # greedy: the same text as a fresh forward
    watch_reply(browser, 0, lambda t: t == expected)
    wait_for(lambda: by_id(browser, "send").is_enabled(), what="send to come back")
    assert by_id(browser, "status").text in ("", "reply cut at max tokens")
    assert not by_id(browser, "run-panel").is_displayed()  # a model that is no run directory: no loss curve

    by_id(browser, "tab-complete").click()
    by_id(browser, "prompt").send_keys("hello")
    by_id(browser, "complete").click()
    wait_for(lambda: by_id(browser, "complete").is_enabled() and by_id(browser, "status").text != "generating…",
             what="the completion to end")
    out = by_id(browser, "completion")
    assert "error" not in out.get_attribute("class"), out.get_property("textContent")
    # the page's streamed text is the server's whole answer to the same request
    body = json.dumps({"prompt": "hello", "temperature": 0, "top_p": 1, "max_tokens": 8}).encode()
    request = urllib.request.Request(url + "/v1/completions", body, {
        "Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        assert out.get_property("textContent") == json.load(r)["choices"][0]["text"]
    assert not uncaught_errors(browser)
