"""`gptforge serve`: the continuous-batching engine (rows of different lengths decode as each would alone), stop
strings and whole characters, and the OpenAI-compatible server driven by the official `openai` client: chat and
completions, streamed and not, n > 1, stop, max_tokens / max_completion_tokens, finish reasons, usage, the same
text as `gptforge sample` for the same seed, the API key, and a bounded load/fault test on 127.0.0.1."""

import asyncio
import functools
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import test_chat
from gptforge.chat_template import add_chat_template, render_conversation
from gptforge.checkpoint import model_state, write_checkpoint
from gptforge.config import RunConfig
from gptforge.sample import generate, sample_checkpoint
from gptforge.serve.engine import Engine, Event, Request, Sequence
from gptforge.tokenizer import CharTokenizer

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?"


# test_chat's tiny chat model, with room for the server tests' longer prompts
tiny_model = functools.partial(test_chat.tiny_model, block_size=96)


def save_run(path, model, tok):
    write_checkpoint(path, model_state(model), RunConfig(model=model.config), tok, state={"step": 1})
    return path


# ----------------------------------------------------------------------------------------------
# The engine, without HTTP


def run_engine(engine, reqs, timeout=60):
    """Submit every (prompt, kwargs) at once; each choice's emitted text and last event."""
    out, done = {}, threading.Event()
    lock = threading.Lock()

    def emitter(r):
        def emit(ev: Event):
            with lock:
                text, _ = out.get((r, ev.index), ("", None))
                out[(r, ev.index)] = (text + ev.text, ev)
                if sum(1 for v in out.values() if v[1].finish_reason) == total:
                    done.set()
        return emit

    total = sum(kw.get("n", 1) for _, kw in reqs)
    for r, (prompt, kw) in enumerate(reqs):
        engine.submit(Request(prompt, emit=emitter(r), **kw))
    assert done.wait(timeout)
    return out


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_rows_of_different_lengths_decode_as_each_would_alone(pos):
    """The batch cache writes each row at its own position and masks the shorter rows' tails: greedy text for
    prompts of 3, 11 and 30 tokens decoded together is each prompt's text from sample.generate alone."""
    tok = CharTokenizer(CHARS, eot=False)  # no end-of-text: every row runs to its own length
    kw = {} if pos == "learned" else dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    model = tiny_model(tok, 3, **kw)
    engine = Engine(model, tok, torch.device("cpu"), torch.float32, max_seqs=4, prefill_chunk=8).start()
    try:
        prompts = [tok.encode(t) for t in ("abc", "hello there", "a much longer prompt than the others")]
        out = run_engine(engine, [(p, dict(max_tokens=20 + 5 * i, temperature=0.0)) for i, p in enumerate(prompts)])
    finally:
        engine.close()
    for r, p in enumerate(prompts):
        ref = generate(model, torch.tensor([p]), 20 + 5 * r, 0.0)[0, len(p):].tolist()
        text, last = out[(r, 0)]
        assert text == tok.decode(ref) and len(ref) == 20 + 5 * r
        assert last.finish_reason == "length" and last.completion_tokens == len(ref)
    assert engine.active == 0  # every finished row left the batch


def test_a_cancelled_request_leaves_the_batch_at_the_next_step():
    tok = CharTokenizer(CHARS, eot=False)
    engine = Engine(tiny_model(tok), tok, torch.device("cpu"), torch.float32, max_seqs=4).start()
    try:
        got = []
        req = Request(tok.encode("abc"), max_tokens=90, emit=got.append, temperature=1.0, seed=1)
        engine.submit(req)
        deadline = time.time() + 10
        while engine.active == 0 and time.time() < deadline:
            time.sleep(0.005)
        assert engine.active == 1
        req.cancel()
        time.sleep(0.3)
        assert engine.active == 0 and len(got) < 90 and not any(e.finish_reason for e in got)
    finally:
        engine.close()


def byte_sequence(stop=(), max_tokens=100):
    """A Sequence over a byte-level 'tokenizer' (one token per UTF-8 byte), as GPT-2's BPE can split characters."""
    events = []
    req = Request([0], max_tokens=max_tokens, emit=events.append, stop=tuple(stop), stop_ids=frozenset({0}))
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    return Sequence(req, 0, decode, 256, torch.device("cpu")), events


def test_multibyte_characters_arrive_whole_and_stop_strings_never_appear():
    seq, events = byte_sequence()
    for b in "héllo ✓!".encode():
        seq.take(b)
    seq.take(0)  # the stop id
    assert all("\ufffd" not in e.text for e in events)
    assert "".join(e.text for e in events) == "héllo ✓!" and events[-1].finish_reason == "stop"
    assert events[-1].completion_tokens == len("héllo ✓!".encode()) + 1  # the end token counts

    seq, events = byte_sequence(stop=["END", "✓"])
    for b in "abEN".encode():
        assert not seq.take(b)
    assert "".join(e.text for e in events) == "ab"  # "EN" may begin "END": held back
    for b in "Xc ✓ more".encode():
        if seq.take(b):
            break
    assert "".join(e.text for e in events) == "abENXc " and events[-1].finish_reason == "stop"


# ----------------------------------------------------------------------------------------------
# A live server, in this process


class LiveServer:
    def __init__(self, run, **kw):
        import uvicorn

        from gptforge.serve import _bind, build_server

        self.app, self.engine = build_server(run, device="cpu", **kw)
        sock = _bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.01)
        assert self.server.started

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                             timeout=60, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    chat_tok = add_chat_template(CharTokenizer(CHARS, eot=True))
    base_tok = CharTokenizer(CHARS, eot=True)
    return {"chat": save_run(d / "chat", tiny_model(chat_tok, 1), chat_tok), "chat_tok": chat_tok,
            "base": save_run(d / "base", tiny_model(base_tok, 2), base_tok), "base_tok": base_tok}


@pytest.fixture(scope="module")
def chat_server(runs):
    s = LiveServer(runs["chat"])
    yield s
    s.close()


@pytest.fixture(scope="module")
def base_server(runs):
    s = LiveServer(runs["base"])
    yield s
    s.close()


USER = [{"role": "user", "content": "hello there"}]


def ending_seed(client, **kw) -> int:
    """A seed whose reply (4 characters or more) ends by itself within 40 tokens: a random model needs a few tries."""
    for seed in range(60):
        r = client.chat.completions.create(model="m", messages=USER, seed=seed, max_tokens=40, **kw)
        if r.choices[0].finish_reason == "stop" and len(r.choices[0].message.content) >= 4:
            return seed
    raise AssertionError("no seed ends its reply")


@pytest.mark.integration
def test_chat_with_the_openai_client(chat_server, runs):
    c = chat_server.client()
    models = c.models.list()
    assert [m.id for m in models.data] == ["chat"]
    prompt_len = len(render_conversation(runs["chat_tok"], USER, for_generation=True)[0])

    r = c.chat.completions.create(model="chat", messages=USER, max_tokens=7, temperature=1.0, seed=5)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens == prompt_len
    assert r.usage.total_tokens == prompt_len + r.usage.completion_tokens

    seed = ending_seed(c)
    r = c.chat.completions.create(model="chat", messages=USER, seed=seed, max_tokens=40)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(runs["chat_tok"].encode(text)) + 1  # the reply and its end-of-turn
    # max_completion_tokens cuts the same reply short, with finish_reason length
    short = c.chat.completions.create(model="chat", messages=USER, seed=seed, max_completion_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert text.startswith(short.choices[0].message.content) and len(short.choices[0].message.content) == 2

    # streamed: the same text, one id, the role first, finish_reason on the last choice chunk, then usage
    chunks = list(c.chat.completions.create(model="chat", messages=USER, seed=seed, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True}))
    assert {ch.id for ch in chunks} == {r.id for r in chunks[:1]} and len({ch.created for ch in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [ch for ch in chunks if ch.choices]
    assert "".join(ch.choices[0].delta.content or "" for ch in body) == text
    assert body[-1].choices[0].finish_reason == "stop" and all(ch.choices[0].finish_reason is None for ch in body[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    # a stop string: the text up to it, never the string itself
    if len(text) >= 3:
        cut = text[2:4]
        s = c.chat.completions.create(model="chat", messages=USER, seed=seed, max_tokens=40, stop=[cut, "zzzz"])
        assert s.choices[0].message.content == text[:text.index(cut)] and s.choices[0].finish_reason == "stop"


@pytest.mark.integration
def test_n_choices_and_seeds(chat_server):
    c = chat_server.client()
    r = c.chat.completions.create(model="chat", messages=USER, n=3, max_tokens=12, seed=11, temperature=1.0)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    again = c.chat.completions.create(model="chat", messages=USER, n=3, max_tokens=12, seed=11, temperature=1.0)
    assert [ch.message.content for ch in r.choices] == [ch.message.content for ch in again.choices]
    assert len({ch.message.content for ch in r.choices}) > 1  # each choice has its own generator
    one = c.chat.completions.create(model="chat", messages=USER, max_tokens=12, seed=11, temperature=1.0)
    assert one.choices[0].message.content == r.choices[0].message.content
    stream = list(c.chat.completions.create(model="chat", messages=USER, n=3, max_tokens=12, seed=11, stream=True))
    for i in range(3):
        parts = [ch.choices[0].delta.content or "" for ch in stream if ch.choices and ch.choices[0].index == i]
        assert "".join(parts) == r.choices[i].message.content


@pytest.mark.integration
def test_completions_give_the_text_of_gptforge_sample(base_server, runs):
    """One engine underneath: the server's completion for a seed is `gptforge sample`'s text for that seed."""
    c = base_server.client()
    for prompt, seed, settings in [("hello", 7, dict(temperature=0.9, top_k=10)), ("the cat sat", 3, dict(top_p=0.8))]:
        ref = sample_checkpoint(runs["base"], prompt, max_new_tokens=30, seed=seed, device="cpu",
                                top_k=settings.get("top_k"), top_p=settings.get("top_p"),
                                temperature=settings.get("temperature", 1.0))[0]
        extra = {"top_k": settings["top_k"]} if "top_k" in settings else {}
        r = c.completions.create(model="base", prompt=prompt, max_tokens=30, seed=seed, extra_body=extra,
                                 temperature=settings.get("temperature", 1.0), top_p=settings.get("top_p", 1.0))
        assert prompt + r.choices[0].text == ref
        streamed = c.completions.create(model="base", prompt=prompt, max_tokens=30, seed=seed, extra_body=extra,
                                        temperature=settings.get("temperature", 1.0),
                                        top_p=settings.get("top_p", 1.0), stream=True, echo=True)
        assert "".join(ch.choices[0].text for ch in streamed) == ref  # echo: the prompt first
    r = c.completions.create(model="base", prompt="abc", max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text.startswith("abc") and r.usage.prompt_tokens == 3
    assert r.choices[0].finish_reason == "stop" or r.usage.completion_tokens == 5


@pytest.mark.integration
def test_errors_are_openai_shaped(chat_server, base_server):
    c = chat_server.client()
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        base_server.client().chat.completions.create(model="base", messages=USER)
    for bad in [dict(messages=[{"role": "wizard", "content": "hi"}]), dict(messages=USER, max_tokens=-3),
                dict(messages=USER, max_tokens=10**9), dict(messages=[{"role": "user", "content": "a" * 500}]),
                dict(messages=USER, temperature=-1), dict(messages=USER, n=0), dict(messages=[])]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="chat", **bad)
        assert e.value.status_code == 400 and set(e.value.body) >= {"message", "type", "param", "code"}
    with httpx.Client(base_url=chat_server.url) as h:
        r = h.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        assert h.get("/v1/nothing").status_code == 404 and h.get("/v1/nothing").json()["error"]["type"]
        assert h.get("/v1/chat/completions").status_code == 405
        assert h.post("/v1/chat/completions", content=b"x" * (2 << 20)).status_code == 400
        ok = h.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "frobnicate": 1})
        assert ok.status_code == 200  # unknown fields are ignored
        assert h.get("/health").json()["status"] == "ok"


@pytest.mark.integration
def test_the_api_key_guards_every_v1_route(runs):
    s = LiveServer(runs["chat"], api_key="sekrit")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        with httpx.Client(base_url=s.url) as h:
            for r in (h.get("/v1/models"), h.post("/v1/completions", json={"prompt": "a"}),
                      h.post("/v1/chat/completions", json={"messages": USER})):
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert h.get("/health").status_code == 200
        assert s.client(api_key="sekrit").models.list().data[0].id == "chat"
    finally:
        s.close()


@pytest.mark.integration
def test_load_and_faults(chat_server):
    """16 concurrent streaming clients, a third of them disconnecting mid-stream, alongside bad requests: every
    good request completes as it would alone, every bad one gets a 400, /health answers fast, nothing leaks."""
    url, c = chat_server.url, chat_server.client()
    seeds = list(range(16))
    alone = {s: c.chat.completions.create(model="chat", messages=USER, seed=s, max_tokens=24, temperature=1.0)
             .choices[0].message.content for s in seeds[::3]}
    bad_bodies = [b"{oops", json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(),
                  json.dumps({"messages": USER, "max_tokens": 10**12}).encode(),
                  json.dumps({"messages": USER, "max_tokens": -1}).encode(),
                  json.dumps({"messages": [{"role": "user", "content": "z" * 400}]}).encode(),
                  json.dumps({"messages": "hello"}).encode()]

    async def good(h, seed):
        body = {"messages": USER, "seed": seed, "max_tokens": 24, "temperature": 1.0, "stream": True}
        text, leave = "", seed % 3 == 1
        async with h.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0].get("delta", {})
                text += delta.get("content") or ""
                if leave and text:
                    return None  # closing the stream disconnects mid-reply
        return text

    async def bad(h, body):
        r = await h.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        return r.status_code

    async def health(h):
        times = []
        for _ in range(10):
            t = time.perf_counter()
            assert (await h.get("/health")).status_code == 200
            times.append(time.perf_counter() - t)
            await asyncio.sleep(0.02)
        return times

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as h:
            return await asyncio.gather(asyncio.gather(*(good(h, s) for s in seeds)),
                                        asyncio.gather(*(bad(h, b) for b in bad_bodies)), health(h))

    texts, statuses, health_times = asyncio.run(main())
    assert statuses == [400] * len(bad_bodies)
    for s, text in zip(seeds, texts):
        if s % 3 == 1:
            assert text is None
        elif s in alone:
            assert text == alone[s]  # batched with 15 others, the same reply as alone
        else:
            assert isinstance(text, str)
    assert sorted(health_times)[len(health_times) // 2] < 0.5  # answered between steps, not after the batch
    deadline = time.time() + 5
    while chat_server.engine.active and time.time() < deadline:
        time.sleep(0.05)
    assert chat_server.engine.active == 0  # disconnected clients' rows were freed
    assert c.chat.completions.create(model="chat", messages=USER, max_tokens=3).choices  # still serving


@pytest.mark.integration  # the real command in a subprocess
def test_gptforge_serve_command(runs, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", "serve", str(runs["base"]), "--port", str(port),
                             "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert f"http://127.0.0.1:{port}/" in line
        deadline = time.time() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.1)
        assert r.json()["status"] == "ok"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "ab", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["object"] == "text_completion"
        # a second server on the same port: one clear line, exit 2
        busy = subprocess.run([sys.executable, "-m", "gptforge", "serve", str(runs["base"]), "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
        assert busy.returncode == 2 and busy.stderr.strip().count("\n") == 0 and "in use" in busy.stderr
    finally:
        proc.terminate()
        proc.wait(20)
