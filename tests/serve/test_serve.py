"""`gptforge serve`: the continuous-batching engine (rows of different lengths decode as each would alone), stop
strings and whole characters, and the OpenAI-compatible server driven by the official `openai` client: chat and
completions, streamed and not, n > 1, stop, max_tokens / max_completion_tokens, finish reasons, usage, the same
text as `gptforge sample` for the same seed, the API key, and a bounded load/fault test on 127.0.0.1; a request that
fails in the engine fails alone; what a client may send (seeds, characters, numbers) and how long it may take to
send it; the memory a batch needs, refused before it is allocated."""

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

from gptforge.chat_template import add_chat_template, render_conversation
from gptforge.infer.engine import generate
from gptforge.infer.sample import sample_checkpoint
from gptforge.errors import UserError
from gptforge.infer.engine import KVCache
from gptforge.serve.batcher import Batcher, Event, Sequence
from tiny import LiveServer, request, save_run, tiny_chat_model
from gptforge.tokenizer import CharTokenizer

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?"


# the tiny chat model (tests/tiny.py), with room for the server tests' longer prompts
tiny_model = functools.partial(tiny_chat_model, block_size=96)


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
        engine.submit(request(prompt, emit=emitter(r), **kw))
    assert done.wait(timeout)
    return out


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_rows_of_different_lengths_decode_as_each_would_alone(pos):
    """The batch cache writes each row at its own position and masks the shorter rows' tails: greedy text for
    prompts of 3, 11 and 30 tokens decoded together is each prompt's text from sample.generate alone."""
    tok = CharTokenizer(CHARS, eot=False)  # no end-of-text: every row runs to its own length
    kw = {} if pos == "learned" else dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    model = tiny_model(tok, 3, **kw)
    engine = Batcher(model, tok, torch.device("cpu"), torch.float32, max_seqs=4, prefill_chunk=8).start()
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
    engine = Batcher(tiny_model(tok), tok, torch.device("cpu"), torch.float32, max_seqs=4).start()
    try:
        got = []
        req = request(tok.encode("abc"), max_tokens=90, emit=got.append, temperature=1.0, seed=1)
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


def test_a_batch_that_cannot_fit_is_refused_before_it_is_allocated(monkeypatch):
    """The engine estimates its batch (the KV cache of --max-seqs rows and a step's buffers) and refuses it in
    one line when the free memory is smaller; the estimate is what the cache really takes."""
    import gptforge.device

    tok = CharTokenizer(CHARS, eot=False)
    model = tiny_model(tok)
    engine = Batcher(model, tok, torch.device("cpu"), torch.float32, max_seqs=3)
    cache = engine._cache
    assert cache.k.nbytes + cache.v.nbytes == KVCache.nbytes(3, model.config, cache.k.element_size())
    monkeypatch.setattr(gptforge.device, "available_memory", lambda device: 1 << 20)
    with pytest.raises(UserError, match=r"a batch of 64 sequences \(--max-seqs\) needs about .*lower --max-seqs"):
        Batcher(model, tok, torch.device("cpu"), torch.float32, max_seqs=64)
    Batcher(model, tok, torch.device("cpu"), torch.float32, max_seqs=1)  # one row fits in 1 MiB


def test_serve_limits_are_bounded_in_one_line(runs, capsys):
    from gptforge.cli import main

    for flags, said in [(["--max-seqs", "100000000"], "--max-seqs must be in [1, 1024], got 100000000"),
                        (["--max-queue", "0"], "--max-queue must be in [1, 16384], got 0"),
                        (["--read-timeout", "0"], "--read-timeout must be in [0.1, 3600], got 0.0"),
                        (["--max-connections", "0"], "--max-connections must be in [1, 65536], got 0")]:
        assert main(["serve", str(runs["base"]), "--port", "0", *flags]) == 2
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and said in err


POISON = 666  # the seed of the request that fails in the engine tests below


def poison(where, engine, tok, monkeypatch):
    """Make the request with seed POISON (prompt "z...") raise inside the engine at `where`."""
    import gptforge.serve.batcher as engine_module

    if where == "sequence":  # building its choices (seeding their generators)
        class Failing(engine_module.Sequence):
            def __init__(self, req, *args, **kw):
                if req.params.seed == POISON:
                    raise RuntimeError("boom")
                super().__init__(req, *args, **kw)
        monkeypatch.setattr(engine_module, "Sequence", Failing)
    elif where == "prefill":  # the forward of its prompt
        real, z = engine.model, tok.encode("z")[0]

        def model(idx, **kw):
            if kw.get("kv_cache") is engine._scratch and int(idx[0, 0]) == z:
                raise RuntimeError("boom")
            return real(idx, **kw)
        engine.model = model
    else:  # drawing its rows' tokens in a decode step, a few tokens in, from a batch shared with the others
        real_rows = engine_module.sample_rows

        def sample_rows(logits, params, generators, vocab_size):
            if any(s.req.params.seed == POISON and len(s.ids) >= 3 for s in engine._rows if s.generator in generators):
                raise RuntimeError("boom")
            return real_rows(logits, params, generators, vocab_size)
        monkeypatch.setattr(engine_module, "sample_rows", sample_rows)


@pytest.mark.parametrize("where", ["sequence", "prefill", "sample"])
def test_a_request_that_fails_in_the_engine_fails_alone(where, monkeypatch):
    """One request raising while it starts or while its rows are drawn ends with an error on each of its choices;
    the request decoding beside it runs to the end with the text it gets alone, and the engine serves on."""
    tok = CharTokenizer(CHARS, eot=False)
    engine = Batcher(tiny_model(tok), tok, torch.device("cpu"), torch.float32, max_seqs=4).start()
    good = (tok.encode("abc"), dict(max_tokens=60, temperature=1.0, seed=1))
    try:
        alone = run_engine(engine, [good], timeout=20)[(0, 0)][0]
        poison(where, engine, tok, monkeypatch)
        out = run_engine(engine, [good, (tok.encode("zz top"), dict(max_tokens=60, n=2, seed=POISON))], timeout=20)
        assert out[(0, 0)][0] == alone and out[(0, 0)][1].finish_reason == "length"
        assert [out[(1, i)][1].finish_reason for i in range(2)] == ["error", "error"]
        assert run_engine(engine, [good], timeout=20)[(0, 0)][0] == alone  # still serving
        assert engine.active == 0
    finally:
        engine.close()


def byte_sequence(stop=(), max_tokens=100):
    """A Sequence over a byte-level 'tokenizer' (one token per UTF-8 byte), as GPT-2's BPE can split characters."""
    events = []
    req = request([0], max_tokens=max_tokens, emit=events.append, stop=tuple(stop), stop_ids=frozenset({0}))
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
        r = h.post("/v1/chat/completions", content=json.dumps({"messages": USER}))  # no Content-Type
        assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]
        assert h.get("/v1/nothing").status_code == 404 and h.get("/v1/nothing").json()["error"]["type"]
        assert h.get("/v1/chat/completions").status_code == 405
        assert h.post("/v1/chat/completions", content=b"x" * (2 << 20)).status_code == 400
        ok = h.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "frobnicate": 1})
        assert ok.status_code == 200  # unknown fields are ignored
        assert h.get("/health").json()["status"] == "ok"
    # a prompt that fills the context names the field that holds it
    for server, path, body, param in [(chat_server, "/v1/chat/completions",
                                       {"messages": [{"role": "user", "content": "a" * 500}]}, "messages"),
                                      (base_server, "/v1/completions", {"prompt": "a" * 500}, "prompt")]:
        e = httpx.post(server.url + path, json=body, timeout=30).json()["error"]
        assert (e["code"], e["param"]) == ("context_length_exceeded", param)


@pytest.mark.integration
def test_text_a_model_cannot_take_is_a_400_that_names_it(base_server, chat_server):
    """A character a char vocabulary lacks is the client's 400 naming it (there is no unknown token), in a
    prompt or a message; so is a lone surrogate, which is no character at all; NaN and Infinity (JSON literals
    Python accepts) are not finite numbers."""
    def post(server, path, raw):
        return httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=30)

    named = [("café", "'é' (U+00E9)"), ("a\x00b", "U+0000"), ("hi 😀", "U+1F600"), (["café"], "U+00E9")]
    for prompt, shown in named:
        r = post(base_server, "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 3}).encode())
        e = r.json()["error"]
        assert r.status_code == 400 and (e["param"], e["code"]) == ("prompt", "unknown_character"), r.text
        assert shown in e["message"] and "vocabulary" in e["message"]
    r = post(chat_server, "/v1/chat/completions",
             json.dumps({"messages": [{"role": "user", "content": "café"}]}).encode())
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_character"
    assert "message 1" in r.json()["error"]["message"] and "U+00E9" in r.json()["error"]["message"]
    surrogate = json.dumps("ab\ud800")  # '"ab\\ud800"': what a JSON client sends for half a pair
    for server, path, raw in [(base_server, "/v1/completions", f'{{"prompt": {surrogate}}}'),
                              (base_server, "/v1/completions", f'{{"prompt": "ab", "stop": [{surrogate}]}}'),
                              (chat_server, "/v1/chat/completions",
                               f'{{"messages": [{{"role": "user", "content": {surrogate}}}]}}')]:
        r = post(server, path, raw.encode())
        assert r.status_code == 400 and "U+D800" in r.json()["error"]["message"], r.text
    for field in ("temperature", "top_p"):
        for value in ("NaN", "Infinity", "-Infinity"):
            r = post(base_server, "/v1/completions", f'{{"prompt": "ab", "{field}": {value}}}'.encode())
            assert r.status_code == 400 and r.json()["error"]["param"] == field
            assert r.json()["error"]["message"] == f"{field}: Input should be a finite number"
    assert post(base_server, "/v1/completions", b'{"prompt": "ab", "max_tokens": 2}').status_code == 200


@pytest.mark.integration
def test_head_is_answered_like_get_without_a_body(chat_server):
    with httpx.Client(base_url=chat_server.url, timeout=30) as h:
        for path in ("/", "/health", "/app.js", "/v1/models"):
            get, head = h.get(path), h.head(path)
            assert head.status_code == get.status_code == 200 and head.content == b""
            assert head.headers["content-type"] == get.headers["content-type"]


@pytest.mark.integration
def test_out_of_range_seeds_are_400s_and_fail_no_one_else(base_server):
    """A seed torch cannot take (or whose n choices' seeds, seed + i, run past the range) is the client's 400;
    a stream decoding meanwhile ends normally with its usual text; the range's ends are served."""
    body = {"prompt": "hello", "max_tokens": 80, "temperature": 0}
    bad = [(2**64, 1), (10**30, 1), (2**64 - 1, 2), (-2**63 - 1, 1)]

    async def stream(h):
        text, lines = "", []
        async with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
                lines.append(line)
        return text, [x for x in lines if x][-1]

    async def refused(h, seed, n):
        r = await h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "seed": seed, "n": n})
        return r.status_code, r.json()["error"]["param"]

    async def main():
        async with httpx.AsyncClient(base_url=base_server.url, timeout=15) as h:
            alone = (await h.post("/v1/completions", json=body)).json()["choices"][0]["text"]
            got = await asyncio.gather(stream(h), *(refused(h, seed, n) for seed, n in bad))
            ends = [(await h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "seed": seed, "n": n}))
                    .status_code for seed, n in ((2**64 - 1, 1), (2**64 - 2, 2), (-2**63, 1))]
            return alone, got[0], got[1:], ends

    alone, (text, last), statuses, ends = asyncio.run(main())
    assert statuses == [(400, "seed")] * len(bad)
    assert last == "data: [DONE]" and text == alone
    assert ends == [200, 200, 200]


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


def client_sending(port: int, send: bytes) -> socket.socket:
    """A connection that sends `send` and then nothing."""
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(send)
    return c


def answer_until_closed(c: socket.socket, within: float) -> bytes:
    """Everything the server sends on `c` until it closes it; fails if it is still open after `within` s."""
    with c:
        c.settimeout(within)
        got = b""
        while chunk := c.recv(4096):
            got += chunk
        return got


def trickle_until_closed(c: socket.socket, within: float) -> bytes:
    """Send `c` on a byte every 0.2 s until the server closes it; what it answered. Fails after `within` s."""
    with c:
        c.settimeout(0.2)
        got, deadline = b"", time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                chunk = c.recv(4096)
                if not chunk:
                    return got
                got += chunk
            except socket.timeout:
                pass
            except OSError:  # reset: the server closed with our last bytes unread
                return got
            try:
                c.sendall(b"x")
            except OSError:
                return got
        raise AssertionError(f"the trickling client is still connected after {within} s")


def test_connections_send_replies_without_waiting_for_acks(base_server):
    """Every accepted connection has TCP_NODELAY: without it, each reply on a kept-alive connection waited ~40 ms
    for the client's delayed ACK of its head (24 requests/s instead of 1,000)."""
    with httpx.Client() as c:
        assert c.get(base_server.url + "/health").status_code == 200
        socks = [p.transport.get_extra_info("socket") for p in base_server.server.server_state.connections]
        assert socks and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in socks)


@pytest.mark.integration
def test_slow_clients_are_cut_off_but_slow_replies_are_not(runs, monkeypatch):
    """A connection that sends nothing, half a header line, or part of its body is answered 408 and closed after
    --read-timeout; a reply that streams for longer than that runs to its end, and the connection serves another
    request after it; beyond --max-connections a connection gets 503 and is closed."""
    s = LiveServer(runs["base"], server_kw=dict(read_timeout=1.5, timeout_keep_alive=1, max_connections=6))
    try:
        body_start = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{")
        slow = [client_sending(s.port, send) for send in (b"", b"GET /health HT", body_start)]
        for c in slow:
            got = answer_until_closed(c, within=1.5 + 5)
            assert got.startswith(b"HTTP/1.1 408 ") and b'"code": "request_timeout"' in got

        # a body over the size limit is refused before it is read; sent on a byte at a time, it is still cut off
        got = trickle_until_closed(client_sending(s.port, body_start.replace(b"100", b"2000000")), 1.5 + 6)
        assert got.startswith(b"HTTP/1.1 400 ") and b"request_too_large" in got

        real = s.engine.model

        def slow(*args, **kw):  # about 3 s for the reply below: twice the read timeout
            time.sleep(0.05)
            return real(*args, **kw)
        monkeypatch.setattr(s.engine, "model", slow)
        with httpx.Client(base_url=s.url, timeout=30) as h:
            body = {"prompt": "ab", "max_tokens": 60, "temperature": 0, "stream": True}
            with h.stream("POST", "/v1/completions", json=body) as r:
                lines = [line for line in r.iter_lines() if line]
            assert r.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) > 10
            monkeypatch.setattr(s.engine, "model", real)
            assert h.get("/health").status_code == 200  # the same kept-alive connection

        idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(6)]
        try:
            got = answer_until_closed(client_sending(s.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"), 5)
            assert got.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in got
        finally:
            for c in idle:
                c.close()
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
    finally:
        s.close()


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
