"""The engine's batched sampling: `sample_rows` gives each row the id `sample_next` gives it alone (the filters and
the softmax are shared by rows with the same settings, the draw is per row from its own generator), and a batch
of requests with mixed settings and seeds decodes to what each request gives when it is decoded alone."""

import threading

import pytest
import torch

from gptforge.config import GPTConfig
from gptforge.model import GPT
from gptforge.infer.sampling import SamplingParams, sample_next, sample_rows
from gptforge.serve.batcher import Batcher, Event, Request, Sequence
from gptforge.tokenizer import CharTokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?"


def request(prompt, max_tokens, emit, n=1, stop_ids=frozenset(), **sampling) -> Request:
    """A batcher Request with the sampling settings given as keywords (temperature=..., seed=..., stop=...)."""
    return Request(prompt, max_tokens, emit, n=n, params=SamplingParams(**sampling), stop_ids=stop_ids)


SETTINGS = [dict(temperature=0.0), dict(temperature=0.8, top_k=5, seed=1), dict(temperature=0.8, top_k=5, seed=2),
            dict(temperature=1.0, top_p=0.9, seed=3), dict(temperature=0.0), dict(temperature=1.3, seed=4),
            dict(temperature=0.8, top_k=5, top_p=0.7, seed=5)]


def test_sample_rows_is_sample_next_row_by_row():
    torch.manual_seed(0)
    V, vocab = 64, 50  # padded logits: ids >= vocab are never chosen
    logits = torch.randn(len(SETTINGS), V) * 3
    logits[:, vocab:] = 100.0  # the padding would win every draw if it were not dropped
    noop = lambda _: ""  # noqa: E731
    seqs, alone = ([Sequence(request([0], 10, noop, **kw), 0, noop, vocab, "cpu") for kw in SETTINGS] for _ in "ab")
    for _ in range(20):  # the generators advance step after step as they do alone
        got = sample_rows(logits, [s.req.params for s in seqs], [s.generator for s in seqs], vocab)
        want = [int(sample_next(logits[b:b + 1], *s.req.params.filters, s.generator, vocab)[0])
                for b, s in enumerate(alone)]
        assert got == want and max(got) < vocab
        logits = logits.roll(1, dims=1)
    assert len(set(got)) > 1  # the rows really differ: the test compares distinct draws


def run_engine(engine, reqs, timeout=60):
    """Submit every (prompt, kwargs) at once; the text of each request's choice 0."""
    out, finished, done, lock = {}, set(), threading.Event(), threading.Lock()

    def emitter(r):
        def emit(ev: Event):
            with lock:
                out[r] = out.get(r, "") + ev.text
                if ev.finish_reason:
                    finished.add(r)
                    if len(finished) == len(reqs):
                        done.set()
        return emit

    for r, (prompt, kw) in enumerate(reqs):
        engine.submit(request(prompt, emit=emitter(r), **kw))
    assert done.wait(timeout)
    return [out[r] for r in range(len(reqs))]


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_mixed_settings_decoded_together_give_what_each_gives_alone(pos):
    tok = CharTokenizer(CHARS, eot=False)
    kw = {} if pos == "learned" else dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=96, vocab_size=tok.vocab_size, dropout=0.0,
                          **kw)).eval()
    prompts = [tok.encode(t) for t in ("ab", "hello there", "abc", "the cat", "a much longer prompt", "x", "zz")]
    reqs = [(p, dict(max_tokens=15 + 3 * i, **s)) for i, (p, s) in enumerate(zip(prompts, SETTINGS))]
    engine = Batcher(model, tok, torch.device("cpu"), torch.float32, max_seqs=8, prefill_chunk=4).start()
    try:
        together = run_engine(engine, reqs)
        alone = [run_engine(engine, [r])[0] for r in reqs]
    finally:
        engine.close()
    assert together == alone
    assert all(len(t) == 15 + 3 * i for i, t in enumerate(together))  # no end-of-text: each ran to max_tokens
