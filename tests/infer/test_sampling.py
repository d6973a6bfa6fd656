"""Sampling: the pure filters on hand-made logits, SamplingParams, the draw, and `sample_rows` against `sample_next`."""

import pytest
import torch

from gptforge.infer.engine import stream
from gptforge.infer.sampling import SamplingError, sample_next, sample_rows, top_k_filter, top_p_filter
from gptforge.serve.batcher import Sequence
from tiny import request
from tiny import tiny_gpt as tiny_model

NEG_INF = float("-inf")


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


# ----------------------------------------------------------------------------------------------
# Rows with their own settings and generators


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
