"""The batcher's sampling: a batch of requests with mixed settings and seeds decodes to what each request gives
when it is decoded alone (rows share their filters, each draws from its own generator)."""

import threading

import pytest
import torch

from gptforge.config import GPTConfig
from gptforge.model import GPT
from gptforge.infer.sampling import SamplingParams, sample_next, sample_rows
from gptforge.serve.batcher import Batcher, Event, Request, Sequence
from gptforge.tokenizer import CharTokenizer
from tiny import request

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?"


SETTINGS = [dict(temperature=0.0), dict(temperature=0.8, top_k=5, seed=1), dict(temperature=0.8, top_k=5, seed=2),
            dict(temperature=1.0, top_p=0.9, seed=3), dict(temperature=0.0), dict(temperature=1.3, seed=4),
            dict(temperature=0.8, top_k=5, top_p=0.7, seed=5)]


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
