"""Sampling: the pure filters, the KV cache against the full forward, and the decode loop."""

import pytest
import torch

from gptforge.config import GPTConfig
from gptforge.model import GPT
from gptforge.infer.engine import KVCache, generate, stream
from gptforge.infer.sampling import SamplingError, sample_next, top_k_filter, top_p_filter
from gptforge.infer.text import TextStreamer

NEG_INF = float("-inf")


def tiny_model(seed: int = 0, **overrides) -> GPT:
    cfg = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg))
    # A wider spread of weights than GPT-2's init gives logits far apart, so greedy ids do not
    # hinge on rounding; any disagreement between the paths is then a real bug.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def reference_greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """The plainest decode there is: full forward on the last block_size tokens, argmax."""
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx[:, -model.config.block_size:])[:, -1]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


def prompt(B: int, T: int, seed: int = 1, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


VARIANTS = {
    "learned": {},
    "rope-gqa-qknorm": dict(pos="rope", n_kv_head=2, qk_norm=True, norm="rmsnorm", mlp="swiglu", bias=False,
                            tie_embeddings=False),
    "learned-mqa-manual": dict(n_kv_head=1, attention="manual"),
}


# ----------------------------------------------------------------------------------------------
# The KV cache against the full forward


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_prefill_through_cache_matches_full_forward(variant):
    model = tiny_model(**VARIANTS[variant])
    idx = prompt(2, 13)
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        cache = KVCache(2, model.config, "cpu", torch.float32)
        first = model(idx[:, :5], kv_cache=cache)
        second = model(idx[:, 5:12], kv_cache=cache)
        third = model(idx[:, 12:], kv_cache=cache)  # a single token after a chunk
    assert cache.pos == 13
    torch.testing.assert_close(torch.cat([first, second, third], dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_reset_reuses_buffers_and_gives_the_same_logits():
    model = tiny_model()
    idx = prompt(1, 6)
    cache = KVCache(1, model.config, "cpu", torch.float32)
    buffer = cache.k.data_ptr()
    with torch.no_grad():
        a = model(idx, kv_cache=cache)
        model(prompt(1, 4, seed=9), kv_cache=cache)  # leave other tokens behind
        cache.reset()
        assert cache.pos == 0
        b = model(idx, kv_cache=cache)
    assert cache.k.data_ptr() == buffer
    torch.testing.assert_close(a, b)


def test_model_refuses_to_overfill_the_cache():
    model = tiny_model()
    cache = KVCache(1, model.config, "cpu", torch.float32)
    with torch.no_grad():
        model(prompt(1, 16), kv_cache=cache)
        with pytest.raises(ValueError):
            model(prompt(1, 1), kv_cache=cache)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("T", [1, 7, 15, 16, 23])  # short, mid, one below / at / past block_size (16)
def test_greedy_with_cache_equals_without_and_reference(variant, T):
    model = tiny_model(**VARIANTS[variant])
    idx = prompt(1, T)
    n = 40  # well past block_size, so the window slides
    expected = reference_greedy(model, idx, n)
    cached = generate(model, idx, n, temperature=0.0, use_kv_cache=True)
    plain = generate(model, idx, n, temperature=0.0, use_kv_cache=False)
    assert torch.equal(plain, expected)
    assert torch.equal(cached, expected)


@pytest.mark.parametrize("variant", ["learned", "rope-gqa-qknorm"])
def test_batched_greedy_equals_each_sequence_alone(variant):
    model = tiny_model(**VARIANTS[variant])
    idx = prompt(3, 5, seed=3)
    assert len({tuple(row.tolist()) for row in idx}) == 3
    batched = generate(model, idx, 25, temperature=0.0)
    for b in range(3):
        alone = generate(model, idx[b:b + 1], 25, temperature=0.0)
        assert torch.equal(batched[b:b + 1], alone)


def test_sampling_with_cache_equals_without_for_the_same_seed():
    model = tiny_model(**VARIANTS["rope-gqa-qknorm"])
    idx = prompt(2, 4)
    a = generate(model, idx, 30, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(5))
    b = generate(model, idx, 30, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(5),
                 use_kv_cache=False)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Seeds, temperature, top-k through the decode loop


def test_same_seed_same_samples_different_seed_different():
    model = tiny_model()
    idx = prompt(2, 3)

    def run(seed):
        return generate(model, idx, 30, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_temperature_zero_and_top_k_one_are_greedy():
    model = tiny_model()
    idx = prompt(2, 4)
    expected = reference_greedy(model, idx, 20)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, idx, 20, temperature=0.0, top_p=0.5, generator=g), expected)
    assert torch.equal(generate(model, idx, 20, temperature=1.7, top_k=1, generator=g), expected)
    assert torch.equal(generate(model, idx, 20, temperature=0.9, top_p=1e-6, generator=g), expected)


def test_generate_restores_training_mode_and_leaves_prompt_alone():
    model = tiny_model().train()
    idx = prompt(1, 4)
    before = idx.clone()
    out = generate(model, idx, 5, temperature=0.0)
    assert model.training
    assert torch.equal(idx, before) and torch.equal(out[:, :4], before) and out.shape == (1, 9)
    assert torch.equal(generate(model, idx, 0), before)


# ----------------------------------------------------------------------------------------------
# Pure filters on hand-made logits


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row != NEG_INF).flatten().tolist() for row in logits]


def test_top_k_keeps_the_k_largest_and_ties_at_the_boundary():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0],
                           [0.0, 2.0, 2.0, 1.0, 2.0],   # three-way tie for the largest
                           [3.0, 1.0, 2.0, 2.0, 0.0]])  # tie at the k-th place
    assert kept(top_k_filter(logits, 2)) == [[1, 3], [1, 2, 4], [0, 2, 3]]
    assert kept(top_k_filter(logits, 1)) == [[1], [1, 2, 4], [0]]
    assert torch.equal(top_k_filter(logits, 5), logits)
    assert torch.equal(top_k_filter(logits, 99), logits)
    out = top_k_filter(logits, 2)
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])  # kept logits are unchanged


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25],
                          [0.25, 0.25, 0.25, 0.25]])
    logits = probs.log()
    assert kept(top_p_filter(logits, 0.5)) == [[1], [0, 1, 2, 3]]  # 0.5 alone reaches 0.5; ties all kept
    assert kept(top_p_filter(logits, 0.6)) == [[1, 3], [0, 1, 2, 3]]  # 0.5 < 0.6 <= 0.75
    assert kept(top_p_filter(logits, 0.9)) == [[1, 2, 3], [0, 1, 2, 3]]
    assert kept(top_p_filter(logits, 0.95)) == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert kept(top_p_filter(logits, 1e-9)) == [[1], [0, 1, 2, 3]]  # tiny p: the argmax (and its ties)
    distinct = torch.tensor([[0.0, 3.0, -1.0, 1.0]])
    assert kept(top_p_filter(distinct, 1e-9)) == [[1]]


def test_top_p_one_keeps_everything_even_negligible_ids():
    logits = torch.tensor([[0.0, 200.0, -200.0, 5.0]])  # softmax of ids 0, 2 rounds to 0
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_filters_respect_already_masked_ids():
    logits = torch.tensor([[2.0, NEG_INF, 1.0, NEG_INF]])
    assert kept(top_p_filter(logits, 0.999)) == [[0, 2]]
    assert kept(top_k_filter(logits, 3)) == [[0, 2]]


def test_bad_settings_are_user_errors():
    logits = torch.zeros(1, 4)
    for bad in (dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(vocab_size=5)):
        with pytest.raises(SamplingError):
            sample_next(logits, **{"temperature": 1.0, **bad})
    with pytest.raises(SamplingError):
        next(stream(tiny_model(), torch.zeros(1, 0, dtype=torch.long), 3))


def test_sample_next_greedy_and_distribution():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0.0).tolist() == [1, 0]
    # sampling follows softmax(logits / T): id frequencies over many draws
    g = torch.Generator().manual_seed(0)
    row = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    counts = torch.bincount(sample_next(row, temperature=2.0, generator=g), minlength=3).float() / 20000
    torch.testing.assert_close(counts, torch.softmax(torch.tensor([0.0, 0.5, 1.0]), -1), atol=0.015, rtol=0)
    # top_k then top_p: only ids 1, 2 survive top_k=2; top_p=0.5 then keeps just id 2
    assert set(sample_next(row, 1.0, top_k=2, generator=g).tolist()) == {1, 2}
    assert set(sample_next(row, 1.0, top_k=2, top_p=0.5, generator=g).tolist()) == {2}


def test_padded_ids_are_never_sampled():
    logits = torch.randn(500, 128, generator=torch.Generator().manual_seed(0))
    logits[:, 65:] = 1e4  # the padding would win every draw if it were allowed
    g = torch.Generator().manual_seed(0)
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0), dict(temperature=5.0, top_k=3),
                   dict(temperature=1.0, top_p=0.9)):
        ids = sample_next(logits, generator=g, vocab_size=65, **kwargs)
        assert ids.max().item() < 65, kwargs


class PaddingLover(torch.nn.Module):
    """A real model whose padded ids (>= 65 of 128) get overwhelming logits."""

    def __init__(self):
        super().__init__()
        self.gpt = tiny_model(vocab_size=128)
        self.config = self.gpt.config

    def forward(self, idx, targets=None, kv_cache=None, last_only=False):
        logits = self.gpt(idx, kv_cache=kv_cache, last_only=last_only)
        logits[..., 65:] += 1e4
        return logits


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_padded_ids_are_never_generated(use_kv_cache):
    model = PaddingLover()
    out = generate(model, prompt(4, 3), 30, temperature=1.5, vocab_size=65, use_kv_cache=use_kv_cache,
                   generator=torch.Generator().manual_seed(0))
    assert out.max().item() < 65


# ----------------------------------------------------------------------------------------------
# End of text


class Counter(torch.nn.Module):
    """A stand-in model that always predicts (last token + 1) % V: sequences reach a given id
    after a known number of steps."""

    def __init__(self, vocab_size: int = 64, block_size: int = 16):
        super().__init__()
        self.config = GPTConfig(n_layer=1, n_head=1, n_embd=4, block_size=block_size, vocab_size=vocab_size)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None, kv_cache=None, last_only=False):
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        return 10.0 * torch.nn.functional.one_hot((idx + 1) % self.config.vocab_size, self.config.vocab_size).float()


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_eot_finishes_a_sequence_others_continue_then_all_stop(use_kv_cache):
    idx = torch.tensor([[2], [5], [3]])
    out = generate(Counter(), idx, 50, temperature=0.0, eot_id=7, use_kv_cache=use_kv_cache)
    # row 0 reaches 7 after 5 steps, row 1 after 2 (then holds 7), row 2 after 4; all done: stop
    assert out.tolist() == [[2, 3, 4, 5, 6, 7],
                            [5, 6, 7, 7, 7, 7],
                            [3, 4, 5, 6, 7, 7]]


def test_without_eot_or_when_one_never_finishes_it_runs_to_max_new_tokens():
    idx = torch.tensor([[2], [30]])
    assert generate(Counter(), idx, 10, temperature=0.0, eot_id=7).shape == (2, 11)
    assert generate(Counter(), idx, 10, temperature=0.0).shape == (2, 11)
    steps = list(stream(Counter(), idx, 10, temperature=0.0, eot_id=7))
    assert [s[0].item() for s in steps] == [3, 4, 5, 6, 7, 7, 7, 7, 7, 7]


def test_eot_stops_a_real_model_early():
    model = tiny_model()
    idx = prompt(1, 4)
    first = reference_greedy(model, idx, 1)[0, -1].item()
    out = generate(model, idx, 30, temperature=0.0, eot_id=first)
    assert out.tolist() == [idx[0].tolist() + [first]]


# ----------------------------------------------------------------------------------------------
# Text streaming


def byte_decode(vocab):
    return lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


def stream_text(streamer, ids):
    pieces, seen = [], []
    for i in ids:
        seen.append(i)
        pieces.append(streamer(seen))
    return pieces


def test_streamer_holds_back_a_partial_multibyte_character():
    vocab = {0: b"h", 1: b"i\xe2", 2: b"\x82", 3: b"\xac ", 4: b"\xf0\x9f", 5: b"\x98", 6: b"\x80!"}
    decode = byte_decode(vocab)
    ids = [0, 1, 2, 3, 4, 5, 6]
    pieces = stream_text(TextStreamer(decode), ids)
    assert pieces == ["h", "i", "", "\u20ac ", "", "", "\U0001F600!"]
    assert "".join(pieces) == decode(ids) == "hi\u20ac \U0001F600!"
    assert "\ufffd" not in "".join(pieces)


def test_streamer_one_byte_per_token_and_flush_of_an_unfinished_character():
    vocab = {b: bytes([b]) for b in range(256)}
    data = "añ€😀z".encode()
    streamer = TextStreamer(byte_decode(vocab))
    pieces = stream_text(streamer, list(data))
    assert "".join(pieces) == "añ€😀z"
    assert [p for p in pieces if p] == ["a", "ñ", "€", "😀", "z"]
    assert streamer.flush() == ""
    # generation ended after the first byte of "€": nothing printed until flush, which shows U+FFFD
    streamer = TextStreamer(byte_decode(vocab))
    assert stream_text(streamer, list(b"ok\xe2")) == ["o", "k", ""]
    assert streamer.flush() == "\ufffd"


def test_streamer_does_not_stall_on_invalid_bytes():
    vocab = {b: bytes([b]) for b in range(256)}
    data = b"a" + b"\x80" * 20 + b"b"
    pieces = stream_text(TextStreamer(byte_decode(vocab)), list(data))
    assert "".join(pieces) == data.decode("utf-8", errors="replace")
    # a run of invalid bytes is printed as it goes, not held back until the next valid character
    assert "".join(pieces[:-1]).count("\ufffd") >= 20 - TextStreamer.MAX_PENDING


def test_streamer_with_a_decoder_that_drops_the_first_leading_space():
    # SentencePiece-style: "_" marks a space, and the text's first space is dropped.
    words = {0: "_Hello", 1: ",", 2: "_world", 3: "_again"}

    def decode(ids):
        return "".join(words[i] for i in ids).replace("_", " ").removeprefix(" ")

    ids = [0, 1, 2, 3, 2]
    pieces = stream_text(TextStreamer(decode, context=2), ids)
    assert "".join(pieces) == decode(ids) == "Hello, world again world"


def test_streamer_decodes_only_a_bounded_tail():
    lengths = []

    def decode(ids):
        lengths.append(len(ids))
        return "".join(chr(97 + i % 26) for i in ids)

    stream_text(TextStreamer(decode, context=4), list(range(300)))
    assert max(lengths) <= 5


# ----------------------------------------------------------------------------------------------
# The decode layout


@pytest.mark.parametrize("variant", ["learned", "rope-gqa-qknorm"])
def test_decode_layout_keeps_shapes_ties_logits_and_greedy_tokens(variant):
    from gptforge.modelio.load import use_decode_layout

    model = tiny_model(**VARIANTS[variant])
    moved = tiny_model(**VARIANTS[variant])
    use_decode_layout(moved)
    assert all(a.shape == b.shape for a, b in zip(model.parameters(), moved.parameters()))
    assert not moved.lm_head.weight.is_contiguous()  # stored (in, out)
    assert (moved.lm_head.weight is moved.transformer.wte.weight) == (variant == "learned")  # a tie survives
    idx = prompt(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(moved(idx), model(idx), atol=1e-5, rtol=1e-5)
    assert torch.equal(generate(moved, idx, 20, temperature=0.0), generate(model, idx, 20, temperature=0.0))
    assert all(v.shape == model.state_dict()[k].shape for k, v in moved.state_dict().items())


def test_decode_layout_transposes_only_weights_with_more_outputs_than_inputs():
    from gptforge.modelio.load import use_decode_layout

    model = use_decode_layout(tiny_model())
    block = model.transformer.h[0]
    assert not block.attn.c_attn.weight.is_contiguous() and not block.mlp.c_fc.weight.is_contiguous()  # 96x32, 128x32
    assert block.mlp.c_proj.weight.is_contiguous()  # 32x128: read faster as (out, in)
    assert block.attn.c_proj.weight.is_contiguous()  # square: no faster either way


def test_load_checkpoint_gives_cpu_models_in_decode_layout_with_the_same_tokens(tmp_path):
    from gptforge.modelio.load import load_checkpoint
    from gptforge.modelio import checkpoint as ck
    from gptforge.config import RunConfig
    from gptforge.tokenizer import CharTokenizer

    model = tiny_model()
    cfg = RunConfig()
    cfg.model = model.config
    ck.write_checkpoint(tmp_path / "c", ck.model_state(model), cfg, CharTokenizer("abcdefgh", eot=False), None)
    loaded = load_checkpoint(tmp_path / "c").model
    assert not loaded.lm_head.weight.is_contiguous()  # the README path: load_checkpoint then generate
    idx = prompt(1, 5)
    assert torch.equal(generate(loaded, idx, 10, temperature=0.0), generate(model, idx, 10, temperature=0.0))


# ----------------------------------------------------------------------------------------------
# Decode steps: one thread for few rows; identical prompts prefilled once


def _threads_in_forwards(model, run):
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args[0].shape, torch.get_num_threads())),
                                           with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("B", [1, 8])
def test_few_row_decode_steps_run_single_threaded_and_restore_the_thread_count(B):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = tiny_model()
        seen = _threads_in_forwards(model, lambda: generate(model, prompt(B, 3), 5, temperature=0.0))
        assert seen[0] == (torch.Size([B, 3]), 2)  # prefill keeps the caller's threads
        assert {n for _, n in seen[1:]} == {1 if B <= 4 else 2}  # decode steps
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_identical_prompts_are_prefilled_once_and_sample_exactly_as_a_batched_prefill(variant):
    from gptforge.infer.engine import new_kv_cache

    model = tiny_model(**VARIANTS[variant])
    idx = prompt(1, 6).repeat(5, 1)  # `gptforge sample --num-samples 5`

    def sampled(**kw):
        g = torch.Generator().manual_seed(7)
        return generate(model, idx, 9, temperature=1.0, top_k=20, generator=g, **kw)

    seen = _threads_in_forwards(model, lambda: sampled())
    assert seen[0][0] == torch.Size([1, 6])  # the prompt ran once
    shared = sampled()
    batched = sampled(kv_cache=new_kv_cache(model, 5, idx.device))  # the old path: 5 identical rows prefilled
    assert torch.equal(shared, batched)
    assert len({tuple(r) for r in shared[:, 6:].tolist()}) > 1  # rows sample on their own: no shared cache rows


def test_different_prompts_are_still_prefilled_together():
    model = tiny_model()
    idx = torch.cat([prompt(1, 6, seed=1), prompt(1, 6, seed=2)])
    seen = _threads_in_forwards(model, lambda: generate(model, idx, 3, temperature=0.0))
    assert seen[0][0] == torch.Size([2, 6])
    assert torch.equal(generate(model, idx, 3, temperature=0.0)[1:], generate(model, idx[1:], 3, temperature=0.0))
