"""Scoring text: the log-probability the model gives each token of a sequence, in batched full forwards.

Where decoding asks "what comes next?", scoring asks "how likely is what is there?": the log-likelihood of a
continuation (an evaluation harness's multiple choice, HellaSwag), of a whole document (perplexity), or of a
prompt echoed back with its log-probabilities by the server. It is a prefill, not a decode loop: one forward
per batch of sequences, right-padded (attention is causal, so the padding after a row's last token cannot
change that row's numbers), rows of similar length batched together.

The log-probabilities are those of the distribution the model computed: log_softmax of the raw logits over
the tokenizer's ids (`vocab_size`: a padded model vocabulary's extra ids are never sampled, so they are not
part of it), before any temperature, top-k or top-p, as vLLM and OpenAI report them. They are computed in
float32 whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch

from gptforge.infer.sampling import SamplingError

# Tokens per scoring forward (rows x padded length): the logits are (rows, length, vocab), 0.4 GB in float32 for
# GPT-2's vocabulary at 2,048 tokens. One sequence longer than this still goes through, alone.
SCORE_BATCH_TOKENS = 2048


@dataclass
class Scored:
    """One sequence's scores. Position j of every list is the token ids[start + j], predicted from the tokens
    before it: its log-probability, whether it was the most likely id there, and (top_n > 0) the top_n ids
    with their log-probabilities, most likely first."""
    ids: list[int]
    start: int
    logprobs: list[float] = field(default_factory=list)
    greedy: list[bool] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    next_logits: Optional[torch.Tensor] = None  # (V,) raw logits after the last token, when asked

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    def entries(self) -> list["TokenLogprob"]:
        """Every token of the sequence with its scores: the tokens before `start` have none (logprob None)."""
        head = [TokenLogprob(i, None, []) for i in self.ids[:self.start]]
        tops = self.top or [[] for _ in self.logprobs]
        return head + [TokenLogprob(i, lp, t) for i, lp, t in zip(self.ids[self.start:], self.logprobs, tops)]


def _check(seqs: Sequence[Sequence[int]], starts: Sequence[int], block_size: int, with_next: bool) -> None:
    for i, (ids, s) in enumerate(zip(seqs, starts)):
        inputs = len(ids) if with_next else len(ids) - 1
        if not 1 <= s <= len(ids) or (not with_next and s == len(ids)):
            raise SamplingError(f"sequence {i}: nothing to score (start {s} of {len(ids)} tokens)")
        if inputs > block_size:
            raise SamplingError(f"sequence {i} is {len(ids)} tokens; a forward takes at most {block_size} "
                                "(the model's block_size): score it in windows")


def _batches(order: list[int], lengths: list[int], max_tokens: Optional[int]) -> list[list[int]]:
    """Groups of indices, longest first, each group's rows x longest length within max_tokens (None: one group)."""
    if max_tokens is None:
        return [order] if order else []
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class TokenLogprob(NamedTuple):
    """One token's log-probability where it stands, and the top ids there (most likely first); logprob None
    for a sequence's first token, which nothing predicts."""
    id: int
    logprob: Optional[float]
    top: list[tuple[int, float]]


def rank_tokens(logits: torch.Tensor, targets: Sequence[int], vocab_size: int,
                top_n: int = 0) -> tuple[list[float], list[bool], list[list[tuple[int, float]]]]:
    """For raw logits (n, V) and the n ids that followed: each id's log-probability (log_softmax in float32 over
    the first vocab_size ids), whether it was the most likely id, and the top_n (id, logprob) pairs of each row."""
    lp = torch.log_softmax(logits[:, :vocab_size].float(), dim=-1)  # (n, V)
    target = torch.as_tensor(list(targets), device=lp.device)
    chosen = lp.gather(1, target[:, None])[:, 0].tolist()
    greedy = (lp.argmax(dim=-1) == target).tolist()
    top: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if top_n:
        vals, idx = lp.topk(min(top_n, vocab_size), dim=-1)
        top = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    return chosen, greedy, top


@torch.inference_mode()
def _score_group(model, seqs: list[list[int]], starts: list[int], vocab_size: int, top_n: int,
                 with_next: bool, device: torch.device) -> list[Scored]:
    inputs = [ids if with_next else ids[:-1] for ids in seqs]
    T = max(len(x) for x in inputs)
    x = torch.zeros(len(seqs), T, dtype=torch.long)  # padding id 0: never scored
    for r, ids in enumerate(inputs):
        x[r, :len(ids)] = torch.tensor(ids)
    logits = model(x.to(device))  # (R, T, V)
    out = []
    for r, (ids, s) in enumerate(zip(seqs, starts)):
        sc = Scored(list(ids), s)
        n = len(ids) - s  # scored positions: targets ids[s:], predicted at inputs s - 1 .. len - 2
        if n:
            sc.logprobs, sc.greedy, sc.top = rank_tokens(logits[r, s - 1:s - 1 + n], ids[s:], vocab_size, top_n)
        if with_next:
            sc.next_logits = logits[r, len(ids) - 1].float()
        out.append(sc)
    return out


def score(model: torch.nn.Module, seqs: Sequence[Sequence[int]], *, vocab_size: Optional[int] = None,
          starts: Optional[Sequence[int]] = None, top_n: int = 0, with_next: bool = False,
          max_batch_tokens: Optional[int] = SCORE_BATCH_TOKENS) -> list[Scored]:
    """The scores of each sequence of ids, in the order given.

    `starts[i]` (default 1) is the first token of sequence i that is scored: a continuation's first token,
    after its context. `top_n` adds the top_n most likely ids at each scored position. `with_next` also runs
    the last token and keeps the logits after it (`Scored.next_logits`), from which a first generated token
    can be drawn. Each forward holds at most `max_batch_tokens` tokens (None: every sequence in one forward,
    as a caller that must run the same number of forwards on every rank needs). A sequence may be at most
    block_size tokens (block_size + 1 without `with_next`): longer text is scored in windows by the caller.
    Call it inside the autocast the model runs in; eval mode is set for the call and restored after.
    """
    seqs = [list(map(int, s)) for s in seqs]
    vocab = model.config.vocab_size
    vocab_size = vocab if vocab_size is None else vocab_size
    if not 0 < vocab_size <= vocab:
        raise SamplingError(f"vocab_size must be in [1, {vocab}], got {vocab_size}")
    if top_n < 0:
        raise SamplingError(f"top_n must be >= 0, got {top_n}")
    starts = [1] * len(seqs) if starts is None else [int(s) for s in starts]
    if len(starts) != len(seqs):
        raise SamplingError(f"{len(starts)} starts for {len(seqs)} sequences")
    _check(seqs, starts, model.config.block_size, with_next)
    device = next(model.parameters()).device
    lengths = [len(s) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: -lengths[i])
    out: list[Optional[Scored]] = [None] * len(seqs)
    was_training = model.training
    model.eval()
    try:
        for group in _batches(order, lengths, max_batch_tokens):
            scored = _score_group(model, [seqs[i] for i in group], [starts[i] for i in group], vocab_size,
                                  top_n, with_next, device)
            for i, sc in zip(group, scored):
                out[i] = sc
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]

