"""The prefix cache (gptforge.infer.prefix_cache): the longest held prefix is found, a conversation's next turn
replaces the entry it extends, memory stays within its bound (least recently used out), a hash never decides a
match alone; and through the batcher, a conversation decodes to the same tokens with the cache as without it,
while its later turns prefill only what is new."""

import threading

import torch

from gptforge.chat_template import add_chat_template, render_conversation
from gptforge.infer import prefix_cache as pc
from gptforge.infer.prefix_cache import PrefixCache
from gptforge.serve.batcher import Batcher, Event
from gptforge.tokenizer import CharTokenizer
from tiny import CHARS, request, tiny_chat_model


def kv(tokens, L=2, nkv=2, hs=4):
    """Keys and values that record their tokens (so a test can see which were reused)."""
    t = torch.tensor(tokens, dtype=torch.float32)
    k = t[None, None, :, None].expand(L, nkv, len(tokens), hs).contiguous()
    return k, -k


def nbytes(n, L=2, nkv=2, hs=4):
    return 2 * L * nkv * n * hs * 4


def test_the_longest_held_prefix_is_found_short_of_the_last_token():
    cache = PrefixCache(1 << 20)
    a = list(range(40))
    assert cache.put(a, *kv(a))
    n, (k, v) = cache.match(a + [99, 98])
    assert n == 40 and k[0, 0, :, 0].tolist() == a and torch.equal(v, -k)
    n, (k, _) = cache.match(a)  # the same prompt again: its last token is run for the logits
    assert n == 39 and k.size(2) == 39
    n, _ = cache.match(a[:20] + [7] * 20)  # diverges inside the second block: the match goes token by token
    assert n == 20
    assert cache.match(list(range(100, 140))) == (0, None)
    assert cache.match(a[:10] + [7] * 30) == (0, None)  # shorter than a block: not worth a copy
    assert (cache.queries, cache.hits) == (42 + 40 + 40 + 40 + 40, 40 + 39 + 20)


def test_a_next_turn_replaces_the_entry_it_extends_and_nothing_is_held_twice():
    cache = PrefixCache(1 << 20)
    turn1 = list(range(32))
    turn2 = turn1 + list(range(50, 70))
    assert cache.put(turn1, *kv(turn1))
    assert cache.put(turn2, *kv(turn2))
    assert len(cache) == 1 and cache.nbytes == nbytes(len(turn2))
    assert not cache.put(turn1, *kv(turn1))  # inside the entry already
    assert not cache.put(list(range(10)), *kv(list(range(10))))  # too short to keep
    assert len(cache) == 1


def test_memory_stays_within_the_bound_least_recently_used_out():
    seqs = [[s * 1000 + i for i in range(32)] for s in range(4)]
    cache = PrefixCache(3 * nbytes(32))
    for s in seqs[:3]:
        assert cache.put(s, *kv(s))
    assert cache.match(seqs[0] + [1])[0] == 32  # seqs[0] is now the most recently used
    assert cache.put(seqs[3], *kv(seqs[3]))  # evicts seqs[1], the least recently used
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    assert cache.match(seqs[1] + [1]) == (0, None)
    assert all(cache.match(s + [1])[0] == 32 for s in (seqs[0], seqs[2], seqs[3]))
    assert not PrefixCache(nbytes(32) - 1).put(seqs[0], *kv(seqs[0]))  # larger than the whole cache
    assert not PrefixCache(0).put(seqs[0], *kv(seqs[0]))  # off
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and cache.match(seqs[0] + [1]) == (0, None)


def test_a_hash_collision_never_reuses_other_tokens(monkeypatch):
    monkeypatch.setattr(pc, "hash", lambda x: 0, raising=False)  # every block hashes alike
    cache = PrefixCache(1 << 20)
    a, b = list(range(32)), list(range(100, 132))
    cache.put(a, *kv(a))
    assert cache.match(b + [1]) == (0, None)
    n, (k, _) = cache.match(a[:16] + b[:16] + [1])
    assert n == 16 and k[0, 0, :, 0].tolist() == a[:16]


# ----------------------------------------------------------------------------------------------
# Through the batcher


def converse(engine, tok, turns, max_tokens=12):
    """Each user turn after the conversation so far, greedy; (replies, cached prompt tokens of each turn)."""
    messages, replies, cached = [], [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        prompt = render_conversation(tok, messages, for_generation=True)[0]
        got, done = [], threading.Event()

        def emit(ev: Event, got=got, done=done):
            got.append(ev.text)
            if ev.finish_reason:
                done.set()
        req = request(prompt, max_tokens, emit, stop_ids=tok.chat.stop_ids(tok.eot_id), temperature=0.0)
        engine.submit(req)
        assert done.wait(60)
        replies.append("".join(got))
        cached.append(req.cached_tokens)
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies, cached


def test_a_conversation_decodes_the_same_with_its_earlier_turns_reused():
    tok = add_chat_template(CharTokenizer(CHARS, eot=True))
    model = tiny_chat_model(tok, 3, block_size=256)
    turns = ["hello there, how are you", "and what is the weather like", "tell me more about it", "thanks, bye"]
    out = {}
    for mb in (0, 4):
        engine = Batcher(model, tok, torch.device("cpu"), torch.float32, max_seqs=4, prefill_chunk=8,
                         prefix_cache_bytes=mb << 20).start()
        try:
            out[mb] = converse(engine, tok, turns)
        finally:
            engine.close()
    (plain, none), (reused, cached) = out[0], out[4]
    assert reused == plain and any(plain)
    assert none == [0, 0, 0, 0]
    assert cached[0] == 0 and all(c > 0 for c in cached[1:])
    # turn i reuses at least the whole prompt of turn i - 1 and the reply the model gave to it
    for i in range(1, len(turns)):
        earlier = render_conversation(tok, [{"role": "user", "content": turns[0]}], for_generation=True)[0]
        assert cached[i] >= len(earlier)
