"""The web chat page of `gptforge serve` (gptforge/serve/static/) in a real headless Chromium: it learns the
model from /v1/models, streams chat replies and completions over SSE as they arrive, stops a reply mid-stream
(the server sees the connection close), keeps a turn that got no reply out of the conversation, fits Max tokens
to a small context, sends the API key and the settings, keeps model output as text, and looks like a page (a
checked screenshot).

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
import urllib.request
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


# ----------------------------------------------------------------------------------------------
# The page's files (no browser)


def test_page_files_ship_in_the_package_and_fetch_nothing_from_the_internet():
    assert {p.name for p in STATIC.iterdir()} >= {"index.html", "app.js", "style.css"}
    for f in STATIC.iterdir():
        text = f.read_text(encoding="utf-8")
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
        self.disconnects = 0
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
                if self.path == "/v1/models":
                    if self._authorized():
                        self._json(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})
                    return
                name = "index.html" if self.path == "/" else self.path.lstrip("/")
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


def open_page(driver, url: str, api_key: str | None):
    driver.get(url + "/")
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
    browser.refresh()
    # without the key the page says what the server said instead of a model name
    wait_for(lambda: by_id(browser, "status").text == "invalid API key", what="the 401 message")
    assert by_id(browser, "model").text == "not connected"
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


@pytest.mark.integration
def test_screenshot_shows_the_page(browser, stub, tmp_path):
    from PIL import Image

    open_page(browser, stub.url, API_KEY)
    wait_for(lambda: by_id(browser, "model").text == "stub-model", what="the model name")
    by_id(browser, "new-chat").click()
    by_id(browser, "input").send_keys("hello there\n")
    watch_reply(browser, 0, lambda t: t == "".join(HELLO))
    wait_for(lambda: by_id(browser, "send").is_enabled(), what="send to come back")
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, ratio = browser.execute_script(
        "return [window.innerWidth, window.innerHeight, window.devicePixelRatio]")
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.size == (round(width * ratio), round(height * ratio))
    colors = image.getcolors(maxcolors=image.width * image.height)
    assert len(colors) > 50  # anti-aliased text, not a blank or single-colour page
    pixels = {rgb for _, rgb in colors}
    assert (0x2F, 0x6F, 0xDF) in pixels  # the accent of the Send button: the style sheet loaded
    assert (0xE6, 0xEF, 0xFF) in pixels  # the user's message bubble is on screen
    print(f"screenshot: {shot}")


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
