"""Log-probabilities on the OpenAI routes, read by the official `openai` client: completions' `logprobs` with
`echo` and `max_tokens` 0 (the prompt scored, as lm-evaluation-harness asks), several prompts in one request,
chat's `logprobs`/`top_logprobs`, streamed and not. Every value equals log_softmax of one full forward over the
same tokens; scoring is one forward, not a decode loop; the tokenizer routes a token-id client needs; 400s."""

import functools

import httpx
import pytest
import torch

from gptforge.modelio.load import load
from gptforge.tokenizer import CharTokenizer, GPT2Tokenizer, add_chat_template
from tiny import CHARS, LiveServer, save_run, tiny_chat_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

PROMPT = "hello there, general kenobi"


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    tok = add_chat_template(CharTokenizer(CHARS, eot=True))
    return save_run(tmp_path_factory.mktemp("lp") / "char", tiny_chat_model(tok, 3, block_size=96), tok)


@pytest.fixture(scope="module")
def server(char_run):
    s = LiveServer(char_run)
    yield s
    s.close()


@functools.lru_cache(maxsize=4)
def _loaded(run: str):
    ck = load(run, "cpu")
    return ck.model.eval(), ck.tokenizer


def reference(run, ids) -> torch.Tensor:
    """(T, V) log_softmax of one full forward over ids, over the tokenizer's ids: row t - 1 predicts ids[t]."""
    model, tok = _loaded(str(run))
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    return torch.log_softmax(logits[:, :tok.vocab_size].float(), dim=-1)


def ids_of(tok, tokens: list[str]) -> list[int]:
    """The ids of a char vocabulary's token strings (a marker's is its name, which encode reads as text)."""
    index = {tok.piece(i).decode(): i for i in range(tok.vocab_size)}
    return [index[t] for t in tokens]


def check_against(ref: torch.Tensor, ids, token_logprobs, top_logprobs, n_top, first=1):
    """token_logprobs[j] is the logprob of ids[first + j]; its top_logprobs the n_top most likely (and it)."""
    for j, (lp, top) in enumerate(zip(token_logprobs, top_logprobs)):
        row = ref[first + j - 1]
        assert lp == pytest.approx(row[ids[first + j]].item(), abs=1e-5)
        best = row.topk(n_top)
        values = sorted(top.values(), reverse=True)
        assert values[:n_top] == pytest.approx(best.values.tolist(), abs=1e-5)
        assert len(top) in (n_top, n_top + 1) and lp in top.values()


def test_echo_with_max_tokens_0_scores_every_prompt_token(server, char_run):
    tok = _loaded(str(char_run))[1]
    r = server.client().completions.create(model="m", prompt=PROMPT, max_tokens=0, echo=True, logprobs=3)
    (c,) = r.choices
    ids = tok.encode(PROMPT)
    assert c.text == PROMPT and c.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert lp.tokens == list(PROMPT) and lp.text_offset == list(range(len(PROMPT)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    check_against(reference(char_run, ids), ids, lp.token_logprobs[1:], lp.top_logprobs[1:], 3)


def test_generated_tokens_have_the_raw_distributions_logprobs(server, char_run):
    """Sampled at temperature 1.7 with top_k 5, the logprobs are still the model's own (before the filters)."""
    tok = _loaded(str(char_run))[1]
    r = server.client().completions.create(model="m", prompt=PROMPT, max_tokens=20, logprobs=2,
                                           temperature=1.7, extra_body={"top_k": 5}, seed=4)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.tokens) >= 1
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]  # into the choice's text
    ids = tok.encode(PROMPT) + ids_of(tok, lp.tokens)
    n = len(tok.encode(PROMPT))
    check_against(reference(char_run, ids), ids, lp.token_logprobs, lp.top_logprobs, 2, first=n)


def test_lm_evals_request_several_token_id_prompts_in_one_forward(server, char_run):
    """lm-eval's loglikelihood request: token-id prompts, echo, logprobs 1, max_tokens 1, temperature 0. The
    prompts are scored together in one forward, and the one generated token comes from its last logits."""
    tok = _loaded(str(char_run))[1]
    prompts = [tok.encode(t) for t in ("the cat sat", "on the mat, quietly", "a")]
    calls = []
    hook = server.engine.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        r = server.client().completions.create(model="m", prompt=prompts, max_tokens=1, echo=True, logprobs=1,
                                               temperature=0)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c, ids in zip(r.choices, prompts):
        lp = c.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
        ref = reference(char_run, ids)
        check_against(ref, ids, lp.token_logprobs[1:len(ids)], lp.top_logprobs[1:len(ids)], 1)
        assert lp.token_logprobs[-1] == pytest.approx(ref[-1].max().item(), abs=1e-5)  # greedy: the top token
        assert c.text == tok.decode(ids) + lp.tokens[-1]
    # a longer generation after the scores: the same prompt logprobs, and greedy text that starts the same way
    r5 = server.client().completions.create(model="m", prompt=prompts[1], max_tokens=5, echo=True, logprobs=1,
                                            temperature=0)
    lp5 = r5.choices[0].logprobs
    n1 = len(prompts[1])
    assert lp5.token_logprobs[1:n1 + 1] == pytest.approx(r.choices[1].logprobs.token_logprobs[1:], abs=1e-5)
    assert lp5.tokens[:len(prompts[1]) + 1] == r.choices[1].logprobs.tokens
    assert "".join(lp5.tokens) == r5.choices[0].text


def _streamed_completion_logprobs(stream) -> dict[int, dict]:
    got: dict[int, dict] = {}
    for chunk in stream:
        for c in chunk.choices:
            g = got.setdefault(c.index, {"text": "", "tokens": [], "token_logprobs": [], "top_logprobs": [],
                                         "text_offset": []})
            g["text"] += c.text
            if c.logprobs:
                for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    g[k] += getattr(c.logprobs, k)
    return got


@pytest.mark.parametrize("kw", [dict(echo=True, max_tokens=0), dict(echo=True, max_tokens=6),
                                dict(echo=False, max_tokens=6)])
def test_streamed_logprobs_equal_the_whole_response(server, kw):
    client = server.client()
    args = dict(model="m", prompt=["the cat sat", "on the mat"], logprobs=2, temperature=0, **kw)
    whole = client.completions.create(**args)
    streamed = _streamed_completion_logprobs(client.completions.create(stream=True, **args))
    assert sorted(streamed) == [0, 1]
    for c in whole.choices:
        s = streamed[c.index]
        assert s["text"] == c.text
        assert s["tokens"] == c.logprobs.tokens and s["text_offset"] == c.logprobs.text_offset
        assert s["token_logprobs"] == pytest.approx(c.logprobs.token_logprobs, abs=1e-6)


def _chat_ids(run, messages, reply):
    from gptforge.chat_template import render_conversation

    tok = _loaded(str(run))[1]
    prompt = render_conversation(tok, messages, for_generation=True)[0]
    return prompt, prompt + tok.encode(reply)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_and_top_logprobs(server, char_run, stream):
    messages = [{"role": "user", "content": "hello there"}]
    args = dict(model="m", messages=messages, max_tokens=12, logprobs=True, top_logprobs=4, temperature=0)
    client = server.client()
    if stream:
        content, text = [], ""
        for chunk in client.chat.completions.create(stream=True, **args):
            for c in chunk.choices:
                text += c.delta.content or ""
                content += c.logprobs.content if c.logprobs and c.logprobs.content else []
    else:
        r = client.chat.completions.create(**args)
        text, content = r.choices[0].message.content, r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == text
    prompt, ids = _chat_ids(char_run, messages, text)
    ref = reference(char_run, ids)
    for j, t in enumerate(content):
        row = ref[len(prompt) + j - 1]
        assert t.bytes == list(t.token.encode("utf-8"))
        assert t.logprob == pytest.approx(row[ids[len(prompt) + j]].item(), abs=1e-5)
        assert len(t.top_logprobs) == 4
        assert [a.logprob for a in t.top_logprobs] == pytest.approx(row.topk(4).values.tolist(), abs=1e-5)
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the most likely
    if not stream:  # logprobs off: none in the reply
        plain = client.chat.completions.create(model="m", messages=messages, max_tokens=3)
        assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("route, body, says", [
    ("completions", {"prompt": "abc", "logprobs": 6}, "logprobs"),
    ("completions", {"prompt": "abc", "max_tokens": 0}, "needs echo"),
    ("completions", {"prompt": [[1, 2]] * 65}, "at most 64 prompts"),
    ("completions", {"prompt": [[1, 2], []]}, "prompt 2: the prompt's token ids are an empty list"),
    ("completions", {"prompt": ["abc", "ab\u00e9"]}, "prompt 2:"),
    ("completions", {"prompt": "a" * 97, "max_tokens": 0, "echo": True}, "context"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "needs logprobs"),
])
def test_bad_logprob_requests_are_400s(server, route, body, says):
    r = httpx.post(f"{server.url}/v1/{route}", json={"model": "m", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, tiktoken_cache):
    tok = GPT2Tokenizer()
    return save_run(tmp_path_factory.mktemp("lp") / "gpt2", tiny_chat_model(tok, 5, block_size=64), tok)


def test_byte_level_tokens_offsets_and_tokenizer_routes(gpt2_run):
    """A character split over GPT-2 tokens shows as "bytes:\\xNN" pieces; offsets count whole characters;
    /tokenize reads "<|endoftext|>" as the token (as lm-eval's remote tokenizer expects), /detokenize inverts."""
    text = "naïve café: 日本語 ok"
    tok = GPT2Tokenizer()
    s = LiveServer(gpt2_run)
    try:
        lp = s.client().completions.create(model="m", prompt=text, max_tokens=0, echo=True, logprobs=0) \
            .choices[0].logprobs
        ids = tok.encode(text)
        pieces = [tok.piece(i) for i in ids]
        assert any(t.startswith("bytes:\\x") for t in lp.tokens)
        assert lp.text_offset == [len(b"".join(pieces[:i]).decode("utf-8", "ignore")) for i in range(len(ids))]
        assert all(len(top) == 1 for top in lp.top_logprobs[1:])  # logprobs 0: the chosen token alone
        check_against(reference(gpt2_run, ids), ids, lp.token_logprobs[1:], lp.top_logprobs[1:], 0)
        info = httpx.get(f"{s.url}/tokenizer_info").json()
        assert info["eos_token"] == "<|endoftext|>"
        got = httpx.post(f"{s.url}/tokenize", json={"prompt": "hi<|endoftext|>yo"}).json()["tokens"]
        assert got == tok.encode("hi") + [tok.eot_id] + tok.encode("yo")
        assert httpx.post(f"{s.url}/detokenize", json={"tokens": ids}).json()["prompt"] == text
        assert httpx.post(f"{s.url}/detokenize", json={"tokens": [10 ** 6]}).status_code == 400
        lm_eval_utils = pytest.importorskip("lm_eval.utils")
        assert lm_eval_utils.check_remote_tokenizer_support(f"{s.url}/v1/completions")
    finally:
        s.close()


def test_a_failed_scoring_job_fails_its_request_alone(server, monkeypatch):
    """A scoring forward that fails ends that request with a 500 (an error event when streamed); the server
    goes on answering, generation and scoring alike."""
    import gptforge.serve.batcher as batcher

    real = batcher.score

    def broken(model, seqs, **kw):
        if any(len(s) == 7 for s in seqs):
            raise RuntimeError("boom")
        return real(model, seqs, **kw)

    monkeypatch.setattr(batcher, "score", broken)
    bad = {"model": "m", "prompt": "seven!!", "max_tokens": 0, "echo": True, "logprobs": 1}
    r = httpx.post(f"{server.url}/v1/completions", json=bad, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    streamed = httpx.post(f"{server.url}/v1/completions", json={**bad, "stream": True}, timeout=30).text
    assert "engine_error" in streamed and "[DONE]" not in streamed
    ok = server.client().completions.create(model="m", prompt="six!!!", max_tokens=0, echo=True, logprobs=1)
    assert ok.choices[0].logprobs.token_logprobs[0] is None and len(ok.choices[0].logprobs.tokens) == 6
    assert server.client().completions.create(model="m", prompt="hello", max_tokens=3).choices[0].finish_reason
