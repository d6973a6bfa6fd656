"""Batches of conversations: packing whole conversations into fixed windows, and masked targets.

A chat split is a token stream of rendered conversations (each starts with the template's <|bos|>, which
text never encodes to) with a loss mask beside it (gptforge.chat_template). `pack` lays the conversations
into rows of block_size + 1 tokens, in order, greedily: a conversation that fits in what is left of a row
goes there whole, otherwise it starts the next row; the rest of a row is padding, never learned. So no
conversation is cut where it fits in the context. One LONGER than block_size + 1 tokens is truncated to
its first block_size + 1 tokens (the model cannot see more anyway) and counted in `Packing.truncated`;
one whose learned tokens all lie past that cut has nothing left to learn and is dropped (`Packing.dropped`).

Conversations in one row attend to each other (as in nanochat's SFT); each row's learned tokens are only
the assistant's. Targets are -1 wherever the mask is 0 (the model's loss ignores them), so the loss counts
only what the assistant says.

`ChatBatches` is a rank's training micro-batches, with the loader's slot layout (gptforge.data.loader):
slot r * accum + m owns rows slot, slot + n_slots, ...; it reads them in a shuffled order per epoch
(sampling "random") or in order ("sequential"); its (epoch, cursor) goes into every checkpoint, so a
resumed run sees exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from gptforge.data.loader import to_device
from gptforge.errors import UserError

Row = list[tuple[int, int]]  # (start, length) of each conversation piece in the stream


@dataclass
class Packing:
    rows: list[Row]
    conversations: int
    truncated: int
    dropped: int


def conversation_starts(tokens: Any, bos_id: int) -> np.ndarray:
    """Start offsets of the conversations in a token stream (its <|bos|> positions), read in blocks."""
    found, block = [], 1 << 24
    for lo in range(0, len(tokens), block):
        found.append(np.flatnonzero(np.asarray(tokens[lo:lo + block]) == bos_id) + lo)
    starts = np.concatenate(found) if found else np.empty(0, np.int64)
    if len(tokens) and (not len(starts) or starts[0] != 0):
        raise UserError("this chat split does not start with a conversation (<|bos|>); prepare the data again")
    return starts


def pack(tokens: Any, mask: Any, bos_id: int, window: int) -> Packing:
    """Conversations of the stream packed into rows of `window` tokens (see the module docstring)."""
    starts = conversation_starts(tokens, bos_id)
    ends = np.append(starts[1:], len(tokens))
    rows: list[Row] = []
    row: Row = []
    used = truncated = dropped = 0
    for start, end in zip(starts.tolist(), ends.tolist()):
        length = end - start
        if length > window:
            truncated += 1
            length = window
            if not np.asarray(mask[start + 1:start + length]).any():  # nothing learned before the cut
                dropped += 1
                continue
        if used + length > window:
            rows.append(row)
            row, used = [], 0
        row.append((start, length))
        used += length
    if row:
        rows.append(row)
    return Packing(rows, len(starts), truncated, dropped)


def row_arrays(tokens: Any, mask: Any, row: Row, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one row, (window - 1,) each; y is -1 on padding and wherever the mask is 0."""
    ids = np.zeros(window, dtype=np.int64)  # padding: id 0, never a target
    learn = np.zeros(window, dtype=bool)
    pos = 0
    for start, length in row:
        ids[pos:pos + length] = tokens[start:start + length]
        learn[pos:pos + length] = np.asarray(mask[start:start + length]) != 0
        pos += length
    y = np.where(learn[1:], ids[1:], -1)
    return ids[:-1], y


def batch_of(tokens: Any, mask: Any, rows: list[Row], window: int,
             device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [row_arrays(tokens, mask, r, window) for r in rows]
    x = torch.from_numpy(np.stack([p[0] for p in pairs]))  # (B, T)
    y = torch.from_numpy(np.stack([p[1] for p in pairs]))  # (B, T)
    if device is not None:
        x, y = to_device(x, device), to_device(y, device)
    return x, y


class _ChatSlot:
    """One slot's rows, read in epochs: shuffled by (seed, slot, epoch) or in order."""

    def __init__(self, rows: list[Row], batch_size: int, shuffle: bool, seed: int, slot: int):
        self.rows, self.batch_size, self.shuffle, self.seed, self.slot = rows, batch_size, shuffle, seed, slot
        self.epoch, self.cursor = 0, 0
        self._order = self._order_of(0)

    def _order_of(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.rows))
        return np.random.Generator(np.random.PCG64([self.seed, self.slot, epoch])).permutation(len(self.rows))

    def take(self) -> list[Row]:
        picked = []
        for _ in range(self.batch_size):
            if self.cursor == len(self.rows):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._order_of(self.epoch)
            picked.append(self.rows[int(self._order[self.cursor])])
            self.cursor += 1
        return picked

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "chat", "epoch": self.epoch, "cursor": self.cursor, "rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._order_of(self.epoch)


class ChatBatches:
    """A rank's micro-batches of packed conversation rows (the BatchSource of gptforge.train.task)."""

    def __init__(self, tokens: Any, mask: Any, rows: list[Row], *, window: int, batch_size: int, sampling: str,
                 seed: int, rank: int, world_size: int, accum: int):
        self.tokens, self.mask, self.window = tokens, mask, window
        self.n_slots, self.first = world_size * accum, rank * accum
        if len(rows) < self.n_slots:
            raise UserError(f"the train split packs into {len(rows)} rows of {window} tokens, fewer than the "
                            f"{self.n_slots} micro-batch slots (processes x accumulation); use more conversations")
        self.slots = [_ChatSlot(rows[s::self.n_slots], batch_size, sampling == "random", seed, s)
                      for s in range(self.first, self.first + accum)]

    def next(self, micro: int, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_of(self.tokens, self.mask, self.slots[micro].take(), self.window, device)

    def local_states(self) -> list[dict[str, Any]]:
        return [s.state_dict() for s in self.slots]

    def load_states(self, all_states: list[dict[str, Any]]) -> bool:
        """Restore this rank's slots; False when the states are another layout (or other data)."""
        if len(all_states) != self.n_slots or any(s.get("kind") != "chat" for s in all_states):
            return False
        mine = all_states[self.first:self.first + len(self.slots)]
        if any(st.get("rows") != len(slot.rows) for st, slot in zip(mine, self.slots)):
            return False
        for st, slot in zip(mine, self.slots):
            slot.load_state_dict(st)
        return True
