"""SFT's task: packing conversations whole, targets only on the assistant's tokens, and the regression test
that user and system tokens contribute exactly zero gradient (nanochat once shipped an SFT that trained on
user turns)."""

import numpy as np
import pytest
import torch

from gptforge.chat_template import add_chat_template, render_conversation
from gptforge.config import GPTConfig
from gptforge.data.chat_loader import pack
from gptforge.model import GPT
from gptforge.tokenizer import train_tokenizer
from gptforge.train.task import ChatTask

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 +=?.!,"
LEARNED = ("text", "end")  # what the assistant says, and its <|end|>


def _conversations(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = int(rng.integers(0, 50)), int(rng.integers(0, 50))
        conv = [{"role": "user", "content": f"what is {a}+{b}?" + " pad" * int(rng.integers(0, 4))},
                {"role": "assistant", "content": f"{a + b}."}]
        if i % 3 == 0:
            conv.insert(0, {"role": "system", "content": "answer with a number."})
        if i % 4 == 0:
            conv += [{"role": "user", "content": "and again?"}, {"role": "assistant", "content": f"{a + b}!"}]
        out.append(conv)
    return out


def _stream(tok, convs):
    """tokens, mask, and (independently of the mask) what each token is: its role, 'marker' or 'end'."""
    ids, mask, what = [], [], []
    for conv in convs:
        i, m = render_conversation(tok, conv)
        ids += i
        mask += m
        what.append("marker")  # bos
        for msg in conv:
            n = len(tok.encode(msg["content"]))
            what += ["marker"] + [msg["role"]] * n + ["end" if msg["role"] == "assistant" else "marker"]
        assert len(what) == len(ids)
    roles = ["text" if w == "assistant" else w for w in what]
    return np.array(ids, dtype=np.uint16), np.array(mask, dtype=np.uint8), np.array(roles)


@pytest.fixture(scope="module")
def setup():
    tok = add_chat_template(train_tokenizer("char", [ALPHABET, "<|>"]))
    tokens, mask, roles = _stream(tok, _conversations(40))
    vtokens, vmask, _ = _stream(tok, _conversations(12, seed=1))
    return tok, tokens, mask, roles, vtokens, vmask


def _task(setup, block_size=64, batch_size=4):
    tok, tokens, mask, _, vtokens, vmask = setup
    return ChatTask({"train": (tokens, mask), "val": (vtokens, vmask)}, bos_id=tok.chat.bos_id, sampling="random",
                    batch_size=batch_size, block_size=block_size)


def _model(tok, block_size=64):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=block_size, vocab_size=tok.vocab_size,
                         dropout=0.0))


def test_packing_keeps_every_conversation_whole_and_counts_truncation(setup):
    tok, tokens, mask, *_ = setup
    starts = np.flatnonzero(tokens == tok.chat.bos_id).tolist() + [len(tokens)]
    lengths = {s: e - s for s, e in zip(starts, starts[1:])}
    assert max(lengths.values()) <= 129
    p = pack(tokens, mask, tok.chat.bos_id, 129)
    pieces = [piece for row in p.rows for piece in row]
    assert pieces == [(s, lengths[s]) for s in starts[:-1]]  # all, in order, whole
    assert all(sum(n for _, n in row) <= 129 for row in p.rows) and p.truncated == 0
    assert len(p.rows) < len(pieces)  # short ones share a row
    small = pack(tokens, mask, tok.chat.bos_id, 20)  # shorter than most conversations
    assert small.truncated == sum(n > 20 for n in lengths.values()) > 0
    assert all(len(row) >= 1 and sum(n for _, n in row) <= 20 for row in small.rows)
    assert len(small.rows) == small.conversations - small.dropped


def test_user_and_system_tokens_contribute_exactly_zero_gradient(setup):
    """The gradient of the loss wrt the logits is exactly 0 at every position whose next token is not the
    assistant's (system, user, markers, padding), and not 0 at the assistant's. Which positions those are
    comes from the rendering's roles, not from the targets the task built."""
    tok, tokens, mask, roles, *_ = setup
    task = _task(setup)
    model = _model(tok)
    batches = task.batches(seed=0, rank=0, world_size=1, accum=1)
    rows = batches.slots[0]
    x, y = batches.next(0)
    picked = [rows.rows[int(i)] for i in rows._order[:4]]
    expected = np.zeros(x.shape, dtype=bool)  # (B, T): is the target at t learned?
    for b, row in enumerate(picked):
        row_roles = np.concatenate([roles[s:s + n] for s, n in row] + [np.array(["pad"] * 65)])[:65]
        expected[b] = np.isin(row_roles[1:], LEARNED)
    assert set(roles[~np.isin(roles, LEARNED)]) == {"system", "user", "marker"}
    captured = {}

    def keep_logits(module, inputs, out):
        out.retain_grad()
        captured["logits"] = out

    model.lm_head.register_forward_hook(keep_logits)
    task.loss(model, x, y).backward()
    grad = captured["logits"].grad.abs().sum(-1)  # (B, T)
    assert expected.any() and (~expected).any()
    assert torch.all(grad[torch.from_numpy(~expected)] == 0)  # exactly zero, not small
    assert torch.all(grad[torch.from_numpy(expected)] > 0)


def test_eval_loss_is_the_mean_over_assistant_targets_only(setup):
    tok = setup[0]
    task = _task(setup, block_size=128)  # every conversation fits: none truncated
    model = _model(tok, block_size=128).eval()
    rows = task.packed["val"].rows
    from gptforge.data.chat_loader import batch_of

    x, y = batch_of(task.splits["val"], task.masks["val"], rows, task.window)
    with torch.no_grad():
        logits = model(x)
    keep = y != -1
    manual = torch.nn.functional.cross_entropy(logits[keep].float(), y[keep]).item()
    full = task.full_val(model, device=torch.device("cpu"), dtype=torch.float32)
    assert full.tokens == int(keep.sum()) == int(setup[5].sum())  # every learned val token, once
    assert full.loss == pytest.approx(manual, rel=1e-5)
    est = task.eval_loss(model, "val", batches=100, device=torch.device("cpu"), dtype=torch.float32)
    assert est == pytest.approx(manual, rel=1e-5)  # 100 batches cover the whole (small) split


def test_batches_resume_exactly(setup):
    task = _task(setup, batch_size=3)
    a = task.batches(seed=7, rank=0, world_size=1, accum=2)
    for _ in range(9):  # past an epoch of each slot's rows
        a.next(0), a.next(1)
    b = task.batches(seed=7, rank=0, world_size=1, accum=2)
    assert b.load_states(a.local_states())
    for _ in range(5):
        for m in (0, 1):
            xa, ya = a.next(m)
            xb, yb = b.next(m)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = task.batches(seed=7, rank=0, world_size=1, accum=1)
    assert not other.load_states(a.local_states())  # another slot layout: refused, not misapplied
