"""Keys and values already computed for token sequences, kept for a later prompt that starts with the same tokens.

A chat client sends the whole conversation every turn, and a system prompt or a few-shot preamble opens many
requests: without this cache the server prefills all of it again each time. `PrefixCache` keeps the KV of whole
sequences (a prompt once it is in, a finished reply's prompt and tokens), least recently used first out, within
`max_bytes`. A new prompt takes the KV of its longest prefix found here and prefills only the rest.

Finding that prefix is a walk over the prompt in blocks of BLOCK tokens: each block boundary's chained hash
names every entry that holds the same tokens up to there, so a lookup costs a dict access per block, whatever
the number of entries; the match then extends token by token past the last shared boundary and is checked
token for token (a hash never decides alone). A sequence that extends an entry (the next turn of a
conversation) replaces it; one already held inside an entry is not stored twice.

Reused keys and values are those the same weights computed for the same tokens at the same positions, so the
continuation is the one a full prefill gives, up to float rounding of a differently shaped forward (the tests
check the tokens are the same). Entries belong to one set of weights: clear the cache when the weights change.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

BLOCK = 16  # tokens per hashed block; shorter sequences are not kept, nor matches shorter (too little to save)


@dataclass
class Entry:
    tokens: list[int]
    k: torch.Tensor  # (L, nkv, T, hs)
    v: torch.Tensor  # (L, nkv, T, hs)
    hashes: list[int]  # the chained hash at each full block boundary

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def _chain(tokens: list[int], blocks: int) -> list[int]:
    """The chained hash of tokens at each of the first `blocks` block boundaries."""
    out, h = [], 0
    for b in range(blocks):
        h = hash((h, tuple(tokens[b * BLOCK:(b + 1) * BLOCK])))
        out.append(h)
    return out


def _common(a: list[int], b: list[int], start: int, limit: int) -> int:
    """The length of a and b's common prefix, known to be at least `start`, at most `limit`."""
    n = start
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class PrefixCache:
    """KV of token sequences, LRU within max_bytes (0: keep nothing). Counters for metrics: `queries` and `hits`
    count prompt tokens looked up and found."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[int, Entry]" = OrderedDict()  # id -> entry, least recently used first
        self._at: dict[int, set[int]] = {}  # a block boundary's chained hash -> ids of the entries sharing it
        self._next_id = 0
        self.nbytes = 0
        self.queries = self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _longest(self, tokens: list[int], limit: int) -> tuple[Optional[int], int]:
        """(id, n): the entry sharing the longest prefix with tokens, at most `limit` tokens of it, and n."""
        best, best_n, ids = None, 0, set()
        shared = 0  # full blocks every entry in `ids` shares with tokens (by hash); none: no match is used
        h = 0
        for b in range(len(tokens) // BLOCK):
            h = hash((h, tuple(tokens[b * BLOCK:(b + 1) * BLOCK])))
            there = self._at.get(h)
            if not there:
                break
            ids, shared = there, b + 1
        for i in ids:
            e = self._entries[i]
            start = min(shared * BLOCK, len(e.tokens), limit)
            if e.tokens[:start] != tokens[:start]:  # a hash collision: only what is compared is shared
                start = 0
            n = _common(e.tokens, tokens, start, min(len(e.tokens), limit))
            if n > best_n:
                best, best_n = i, n
        return best, best_n

    def match(self, tokens: list[int]) -> tuple[int, Optional[tuple[torch.Tensor, torch.Tensor]]]:
        """(n, (k, v)) for the longest cached prefix of `tokens` short of their last token (a prompt's last token
        is always run: its logits are what generation starts from); k, v (L, nkv, n, hs) are views of the entry.
        (0, None) when nothing is cached."""
        self.queries += len(tokens)
        if not self._entries or len(tokens) < 2:
            return 0, None
        i, n = self._longest(tokens, len(tokens) - 1)
        if i is None or n == 0:
            return 0, None
        self._entries.move_to_end(i)
        self.hits += n
        e = self._entries[i]
        return n, (e.k[:, :, :n], e.v[:, :, :n])

    def put(self, tokens: list[int], k: torch.Tensor, v: torch.Tensor) -> bool:
        """Keep the KV (L, nkv, T, hs), T = len(tokens), of `tokens` (copied); an entry they extend is dropped.
        False when they are not kept: too short, already held, or larger than the whole cache."""
        tokens = list(tokens)
        T = len(tokens)
        nbytes = 2 * k.numel() * k.element_size()
        if T < BLOCK or nbytes > self.max_bytes:
            return False
        i, n = self._longest(tokens, T)
        if i is not None and n == T:  # already held, as this entry or inside it
            self._entries.move_to_end(i)
            return False
        if i is not None and n == len(self._entries[i].tokens):  # this sequence extends that entry
            self._drop(i)
        while self.nbytes + nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        e = Entry(tokens, k.clone(), v.clone(), _chain(tokens, T // BLOCK))
        self._entries[self._next_id] = e
        for h in e.hashes:
            self._at.setdefault(h, set()).add(self._next_id)
        self._next_id += 1
        self.nbytes += nbytes
        return True

    def _drop(self, i: int) -> None:
        e = self._entries.pop(i)
        self.nbytes -= e.nbytes
        for h in e.hashes:
            there = self._at[h]
            there.discard(i)
            if not there:
                del self._at[h]

    def clear(self) -> None:
        """Forget every entry (the weights changed); the counters go on."""
        self._entries.clear()
        self._at.clear()
        self.nbytes = 0
