"""`gptforge serve` run as a service: the prefix cache seen through the API (usage's cached_tokens), /metrics in
Prometheus' format with counters that match the requests sent, one access-log line per request, /health's
engine state, SIGTERM draining (the running stream finishes, new requests are refused, exit 0) and --follow
(a run's new checkpoint is served from the next request on, never mid-answer)."""

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from gptforge.chat_template import add_chat_template
from gptforge.config import RunConfig
from gptforge.infer.engine import generate
from gptforge.modelio.checkpoint import model_state, write_checkpoint
from gptforge.serve.batcher import Batcher, Event
from gptforge.serve.follow import RunCurve
from gptforge.tokenizer import CharTokenizer
from tiny import CHARS, LiveServer, request, save_run, tiny_chat_model

fastapi = pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    tok = add_chat_template(CharTokenizer(CHARS, eot=True))
    return save_run(tmp_path_factory.mktemp("svc") / "chat", tiny_chat_model(tok, 1, block_size=256), tok)


@pytest.fixture(scope="module")
def server(chat_run):
    s = LiveServer(chat_run, prefix_cache_mb=8)
    yield s
    s.close()


def metrics_of(url: str) -> dict:
    """{(name, labels as a sorted tuple): value} from /metrics, through prometheus-client's own parser."""
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in parser.text_string_to_metric_families(r.text) for s in fam.samples}


def test_a_later_turn_reports_the_tokens_it_reused(server):
    client = server.client()
    messages = [{"role": "user", "content": "hello there, this is a long first turn"}]
    first = client.chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "and a second one"}]
    second = client.chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == second.choices[0].message.content
    health = httpx.get(server.url + "/health").json()
    assert health["prefix_cache"]["entries"] >= 1 and 0 < health["prefix_cache"]["bytes"] <= 8 << 20


def test_metrics_count_what_was_sent_and_the_access_log_has_a_line_each(server, caplog):
    before = metrics_of(server.url)
    client = server.client()
    prompt_tokens = completion_tokens = 0
    with caplog.at_level(logging.INFO, logger="gptforge.serve.access"):
        for i in range(3):
            r = client.completions.create(model="m", prompt="abc" * (i + 1), max_tokens=5, temperature=0)
            prompt_tokens += r.usage.prompt_tokens
            completion_tokens += r.usage.completion_tokens
        chunks = list(client.completions.create(model="m", prompt="hello", max_tokens=6, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        prompt_tokens += chunks[-1].usage.prompt_tokens
        completion_tokens += chunks[-1].usage.completion_tokens
        bad = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": -1})
        assert bad.status_code == 400
    after = metrics_of(server.url)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    ok = dict(method="POST", route="/v1/completions", status="200")
    assert grew("gptforge:http_requests_total", **ok) == 4
    assert grew("gptforge:http_requests_total", **{**ok, "status": "400"}) == 1
    assert grew("gptforge:prompt_tokens_total") == prompt_tokens
    assert grew("gptforge:generation_tokens_total") == completion_tokens
    assert sum(grew("gptforge:request_success_total", finished_reason=r) for r in ("stop", "length")) == 4
    assert grew("gptforge:time_to_first_token_seconds_count") == 4
    assert grew("gptforge:e2e_request_latency_seconds_count") == 4
    assert grew("gptforge:inter_token_latency_seconds_count") == completion_tokens - 4
    assert grew("gptforge:prefix_cache_queries_total") == prompt_tokens
    assert after[("gptforge:num_requests_running", ())] == 0 and after[("gptforge:num_requests_waiting", ())] == 0
    assert after[("gptforge:checkpoint_step", ())] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "gptforge.serve.access"]
    assert len(lines) == 5
    assert all(" POST /v1/completions 200 prompt=" in x and x.endswith(" ms") for x in lines[:4]), lines
    assert " POST /v1/completions 400 " in lines[4]
    assert f"completion={chunks[-1].usage.completion_tokens} " in lines[3]  # a stream's, counted at its end


def test_health_reports_the_engine(server):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["step"] == 1 and h["context_length"] == 256 and h["follow"] is False
    assert {"running", "waiting", "max_seqs", "max_queue", "prefix_cache"} <= set(h)
    assert httpx.get(server.url + "/v1/run").json()["curve"] is None  # a checkpoint dir, not a run: no curve


# ----------------------------------------------------------------------------------------------
# SIGTERM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration  # the real command in a subprocess
def test_sigterm_finishes_the_running_stream_refuses_new_requests_and_exits_0(tmp_path):
    tok = CharTokenizer(CHARS, eot=False)  # no end-of-text: the reply runs to max_tokens
    run = save_run(tmp_path / "long", tiny_chat_model(tok, 2, block_size=2048), tok)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", "serve", str(run), "--port", str(port), "--device",
                             "cpu", "--drain-timeout", "60", "--max-tokens", "2000"], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.1)
        pieces, done = [], []

        def stream():
            body = {"prompt": "ab", "max_tokens": 2000, "temperature": 0, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done.append(True)
                    elif line.startswith("data: "):
                        pieces.append(json.loads(line[6:])["choices"][0]["text"])
        t = threading.Thread(target=stream)
        t.start()
        while len(pieces) < 5:
            assert t.is_alive()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert len("".join(pieces)) < 2000, "the stream ended before the signal: make it longer"
        with pytest.raises(httpx.TransportError):  # the listening socket is closed: a new request is refused
            httpx.post(url + "/v1/completions", json={"prompt": "ab", "max_tokens": 2}, timeout=5)
        t.join(120)
        assert done and len("".join(pieces)) == 2000  # the running stream finished, every token of it
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert "SIGTERM" in err and "drained" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


# ----------------------------------------------------------------------------------------------
# --follow


def greedy_text(model, tok, prompt: str, n: int) -> str:
    ids = tok.encode(prompt)
    return tok.decode(generate(model, torch.tensor([ids]), n, 0.0)[0, len(ids):].tolist())


def save_step(run_dir, model, tok, step: int):
    write_checkpoint(run_dir / "latest", model_state(model), RunConfig(model=model.config), tok, state={"step": step})


def test_a_swap_waits_for_the_running_answer():
    """Batcher.swap asked mid-answer (from the answer's own first event): that answer ends on the old weights,
    the next request decodes on the new ones, and on_switch runs in between."""
    tok = CharTokenizer(CHARS, eot=False)
    old, new = tiny_chat_model(tok, 1, block_size=128), tiny_chat_model(tok, 2, block_size=128)
    engine = Batcher(old, tok, torch.device("cpu"), torch.float32, max_seqs=4, prefix_cache_bytes=1 << 20).start()
    order, texts = [], {}

    def run(name, on_first=None):
        got, finished = [], threading.Event()

        def emit(ev: Event):
            if on_first and not got:
                on_first()
            got.append(ev.text)
            if ev.finish_reason:
                order.append(name)
                finished.set()
        engine.submit(request(tok.encode("hello"), 60, emit, temperature=0.0))
        assert finished.wait(60)
        texts[name] = "".join(got)
    try:
        run("before", on_first=lambda: engine.swap(new, lambda: order.append("switched")))
        run("after")
    finally:
        engine.close()
    assert order == ["before", "switched", "after"]
    assert texts["before"] == greedy_text(old, tok, "hello", 60) != greedy_text(new, tok, "hello", 60)
    assert texts["after"] == greedy_text(new, tok, "hello", 60)
    assert len(engine.prefix) <= 1  # emptied at the switch: the old weights' keys are not the new ones'


def test_follow_serves_each_new_checkpoint_from_the_next_request(tmp_path):
    tok = CharTokenizer(CHARS, eot=False)
    old, new = tiny_chat_model(tok, 1, block_size=512), tiny_chat_model(tok, 2, block_size=512)
    run_dir = tmp_path / "run"
    save_step(run_dir, old, tok, 100)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 4.0 - s / 100}) + "\n" for s in range(0, 101, 10))
                       + json.dumps({"step": 100, "train_loss": 3.1, "val_loss": 3.2}) + "\n")
    before = sorted(p.name for p in run_dir.rglob("*"))
    s = LiveServer(run_dir, follow=True, follow_interval=0.05)
    try:
        info = httpx.get(s.url + "/v1/run").json()
        assert (info["step"], info["follow"], info["training_step"]) == (100, True, 100)
        assert info["curve"]["train"][-1] == [100, 3.0] and info["curve"]["val"] == [[100, 3.2]]
        body = {"prompt": "hello", "max_tokens": 400, "temperature": 0, "stream": True}
        text = []
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0]["text"])
                    if len(text) == 2:  # mid-answer: the trainer saves step 200
                        save_step(run_dir, new, tok, 200)
                        with open(metrics, "a") as f:
                            f.write(json.dumps({"step": 200, "loss": 2.0}) + "\n" + '{"step": 21')  # half a line
                        deadline = time.time() + 20
                        while s.built.follower.seen != 200:
                            assert time.time() < deadline
                            time.sleep(0.02)
        assert "".join(text) == greedy_text(old, tok, "hello", 400)  # the answer ended on the weights it began with
        deadline = time.time() + 20
        while httpx.get(s.url + "/health").json()["step"] != 200:  # the switch comes with the batch idle
            assert time.time() < deadline
            time.sleep(0.02)
        after = s.client().completions.create(model="m", prompt="hello", max_tokens=50, temperature=0)
        assert after.choices[0].text == greedy_text(new, tok, "hello", 50)
        info = httpx.get(s.url + "/v1/run").json()
        assert info["step"] == 200 and info["training_step"] == 200 and info["curve"]["train"][-1] == [200, 2.0]
    finally:
        s.close()
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # the server wrote nothing into the run


def test_follow_needs_a_run_directory(chat_run):
    from gptforge.errors import UserError

    with pytest.raises(UserError, match="--follow needs a run directory"):
        LiveServer(chat_run, follow=True)


def test_the_curve_reads_whole_lines_as_the_file_grows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo')
    curve = RunCurve(path)
    curve.refresh()
    assert curve.train == [(1, 5.0)]
    with open(path, "a") as f:  # the line completes; a resumed run then writes step 2 again
        f.write('ss": 4.0}\nnot json\n{"step": 2, "loss": 3.9}\n{"step": 2, "train_loss": 4, "val_loss": 4.5}\n')
    curve.refresh()
    assert curve.train == [(1, 5.0), (2, 3.9)] and curve.val == [(2, 4.5)] and curve.last_step == 2
    with open(path, "a") as f:
        f.write("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(3, 2000)))
    curve.refresh()
    snap = curve.snapshot()
    assert len(snap["train"]) <= 501 and snap["train"][0] == [1, 5.0] and snap["train"][-1] == [1999, 1.0]


def test_a_stream_merges_what_piled_up_into_fewer_chunks_with_the_same_text():
    from gptforge.serve.app import _merged

    evs = [Event(0, "a", completion_tokens=1), Event(0, "b", completion_tokens=2), Event(1, "x", completion_tokens=1),
           Event(1, "y", completion_tokens=2), Event(1, "z", finish_reason="length", completion_tokens=3),
           Event(0, "c", completion_tokens=3)]
    out = _merged(evs)
    assert [(e.index, e.text, e.finish_reason, e.completion_tokens) for e in out] == [
        (0, "ab", None, 2), (1, "xyz", "length", 3), (0, "c", None, 3)]
    with_lp = [Event(0, "a", logprobs=[object()]), Event(0, "b")]
    assert len(_merged(with_lp)) == 2  # log-probabilities stay one chunk per token
