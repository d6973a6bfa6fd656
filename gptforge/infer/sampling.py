"""Sampling: from a model's logits to the next token id, for one row or a batch of rows with their own settings.

`SamplingParams` is the one form of the settings (temperature, top-k, top-p, seed, stop strings): every verb
and the server build one and call `validate()`, which says in one line what is wrong. The filters are pure
functions from logits (..., V) to logits with the excluded ids set to -inf. The draw is an exponential race
(`race`), written once: argmax of p_i / E_i with E_i ~ Exp(1) picks id i with probability p_i, the same
distribution as torch.multinomial, a few times cheaper per step and with no host sync on a GPU. Rows may share
one generator (`sample_next`, a batch decoding together) or each have their own (`sample_rows`, the server's
batch, where a seed must give the same text whoever else is in the batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from gptforge.device import check_seed
from gptforge.errors import UserError


class SamplingError(UserError, ValueError):
    """A bad sampling setting (temperature, top_k, top_p, vocab_size, an empty prompt)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 is greedy (top_k and top_p then change nothing); top_k None
    and top_p None (or 1) keep every id; seed None draws from fresh randomness; generation stops before the
    first of the `stop` strings (the server's; the terminal verbs stop at token ids)."""

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()

    def validate(self, *, seeds: int = 1, seed_name: str = "seed", each: str = "sample") -> "SamplingParams":
        """self, or a SamplingError for the first bad setting; `seeds` choices draw from seed, seed + 1, ..."""
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0:
            raise SamplingError(f"temperature must be >= 0, got {t}")
        if math.isinf(t):
            raise SamplingError(f"temperature must be a finite number, got {t}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise SamplingError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:  # written so that NaN fails too
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            check_seed(self.seed, seed_name, count=seeds, each=each)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> tuple[float, Optional[int], Optional[float]]:
        """(temperature, top_k, top_p): rows with equal filters share one filter pass."""
        return self.temperature, self.top_k, self.top_p

    def generator(self, device: Union[str, torch.device], offset: int = 0) -> torch.Generator:
        """A generator on `device` seeded with seed + offset (choice `offset` of a request), or from fresh
        randomness when there is no seed."""
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed + offset)
        return g


# ----------------------------------------------------------------------------------------------
# Filters


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by temperature: below 1 sharpens the distribution, above 1 flattens it."""
    if temperature <= 0:
        raise SamplingError(f"temperature must be > 0 to scale logits (0 means greedy), got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row. Ids tied with the k-th largest are all kept, so the
    kept set never depends on how ties happen to be ordered."""
    if k < 1:
        raise SamplingError(f"top_k must be at least 1, got {k}")
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1): the k-th largest per row
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely ids whose probability mass is >= p.

    The most likely id is always kept; ids tied with the least likely kept id are all kept;
    p = 1 keeps everything (even ids of probability that rounds to zero).
    """
    if not 0.0 < p <= 1.0:
        raise SamplingError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:
        return logits
    sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (..., V): mass of the ids ranked above each id
    # an id is needed while the ids above it hold less than p; always at least the top one
    n_keep = (mass_before < p).sum(dim=-1, keepdim=True).clamp_(min=1)  # (..., 1)
    threshold = sorted_logits.gather(-1, n_keep - 1)  # (..., 1): the smallest kept logit
    return logits.masked_fill(logits < threshold, float("-inf"))


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                   top_p: Optional[float] = None) -> torch.Tensor:
    """Next-token probabilities after temperature, top-k and top-p (temperature > 0): (B, V) -> (B, V)."""
    x = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        x = top_k_filter(x, top_k)
    if top_p is not None:
        x = top_p_filter(x, top_p)
    return torch.softmax(x, dim=-1)


# ----------------------------------------------------------------------------------------------
# The draw


def race(probs: torch.Tensor, generators: Union[None, torch.Generator, Sequence[torch.Generator]]) -> torch.Tensor:
    """One id per row of probs (B, V), row b drawn with probability probs[b]: the exponential race, in place on
    probs. `generators` is one generator for every row (None: torch's default), or one per row, each consumed
    exactly as it would be by that row alone."""
    draws = torch.empty_like(probs)
    if generators is None or isinstance(generators, torch.Generator):
        draws.exponential_(generator=generators)
    else:
        for row, g in zip(draws, generators):
            row.exponential_(generator=g)
    # the clamp guards against a backend drawing an exact 0 (0/0 would make argmax pick a filtered id)
    draws.clamp_(min=torch.finfo(probs.dtype).tiny)
    return probs.div_(draws).argmax(dim=-1)  # (B,)


def sample(logits: torch.Tensor, params: SamplingParams, generators=None) -> torch.Tensor:
    """(B,) ids for logits (B, V) under one validated setting; `generators` as for `race`."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return race(filtered_probs(logits, *params.filters), generators)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                vocab_size: Optional[int] = None) -> torch.Tensor:
    """The next token id (B,) for each row of logits (B, V), every row under the same settings.

    temperature 0 is greedy (argmax, no randomness). vocab_size is the tokenizer's real vocabulary:
    the model's vocabulary is padded (to a multiple of 64) and ids >= vocab_size are never chosen.
    Pass a seeded `generator` (on the logits' device) for reproducible samples.
    """
    if vocab_size is not None:
        if not 0 < vocab_size <= logits.size(-1):
            raise SamplingError(f"vocab_size must be in [1, {logits.size(-1)}], got {vocab_size}")
        logits = logits[..., :vocab_size]  # dropping the padded ids is cheaper than masking them
    return sample(logits, SamplingParams(temperature, top_k, top_p).validate(), generator)


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator],
                vocab_size: int) -> list[int]:
    """One next token per row of logits (B, V), row b under params[b] from generators[b]: the ids `sample_next`
    gives each row alone. Rows that share their filters are filtered and soft-maxed as one batch (every op is
    row-wise, so each row's numbers are the ones it gets alone); only the draw is per row."""
    logits = logits[:, :vocab_size]  # the padded ids are never chosen
    groups: dict[tuple, list[int]] = {}
    for b, p in enumerate(params):
        groups.setdefault(p.filters, []).append(b)
    if len(groups) == 1:  # the common case: one pass, no gather or scatter
        return sample(logits, params[0], generators).tolist()
    out = torch.empty(len(params), dtype=torch.long, device=logits.device)
    for rows in groups.values():
        out[rows] = sample(logits[rows], params[rows[0]], [generators[b] for b in rows])
    return out.tolist()  # one move to Python per step
