"""The engine: the KV cache against the full forward, the decode loop (seeds, temperature, end of text, padded
ids), few-row decode steps on one thread, and identical prompts prefilled once."""

import pytest
import torch

from gptforge.config import GPTConfig
from gptforge.infer.engine import KVCache, generate, stream
from gptforge.infer.sampling import SamplingError
from tiny import VARIANTS, prompt, reference_greedy
from tiny import tiny_gpt as tiny_model

NEG_INF = float("-inf")


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
def test_few_token_forwards_run_single_threaded_and_restore_the_thread_count(B):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = tiny_model(n_layer=4, n_head=8, n_embd=512)  # 8 rows x 12 L C^2 is past DECODE_ONE_THREAD_WORK
        seen = _threads_in_forwards(model, lambda: generate(model, prompt(B, 3), 5, temperature=0.0))
        assert seen[0] == (torch.Size([B, 3]), 1 if B * 3 <= 4 else 2)  # a prefill of 3 tokens, or of 24
        assert {n for _, n in seen[1:]} == {1 if B <= 4 else 2}  # decode steps
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_small_model_stays_single_threaded_at_any_batch():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = tiny_model()  # 2 x 32: even 16 rows' products are too small to share between threads
        seen = _threads_in_forwards(model, lambda: generate(model, prompt(16, 3), 5, temperature=0.0))
        assert {n for _, n in seen} == {1} and torch.get_num_threads() == 2
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
