"""What a run learns from: the micro-batches of a step, the loss of a batch, and the loss of a split.

The loop asks its task for `batches(seed, rank, world_size, accum)` (a source whose position goes into
every checkpoint), `loss(model, x, y)` and `eval_loss(model, split, ...)`, and nothing else. `LMTask` is
next-token prediction on token streams (pretraining). `ChatTask` is fine-tuning on conversations, the loss on
the assistant's tokens only: it supplies targets of -1 where nothing is learned, which the model's loss
ignores, through the same methods, so the loop has no branch for it; both take the training loss from `Task`.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import numpy as np
import torch

from gptforge.data.chat_loader import ChatBatches, pack
from gptforge.data.loader import RandomBatches, SlotLoader
from gptforge.errors import UserError
from gptforge.evaluate import (EVAL_SEED, EvalResult, estimate_loss, evaluate_tokens, masked_loss,
                               masked_result)


class BatchSource(Protocol):
    """A rank's training micro-batches; its position is saved and restored for an exact resume."""

    def next(self, micro: int, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def local_states(self) -> list[dict[str, Any]]: ...

    def load_states(self, all_states: list[dict[str, Any]]) -> bool: ...


class Task:
    """What every task shares: `splits` (name -> token stream), the batch and block size, and the training loss,
    the model's own (targets of -1 count for nothing). A task adds `batches`, `eval_loss` and `full_val`."""

    splits: dict[str, Any]
    batch_size: int
    block_size: int

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, y)

    def eval_tokens(self, batches: int) -> int:
        """Tokens one periodic evaluation (`eval_loss` of train and val) forwards, for the time estimate."""
        return 2 * batches * self.batch_size * self.block_size

    def full_val_tokens(self) -> int:
        """Tokens `full_val` forwards, for the time estimate."""
        return len(self.splits["val"])


class LMTask(Task):
    """Next-token prediction on the train and val token streams of a data directory."""

    def __init__(self, train_tokens, val_tokens, *, sampling: str, batch_size: int, block_size: int):
        self.splits = {"train": train_tokens, "val": val_tokens}
        self.sampling, self.batch_size, self.block_size = sampling, batch_size, block_size
        RandomBatches(val_tokens, batch_size, block_size, seed=0)  # fail early, with a clear message, if val is too short

    def batches(self, seed: int, rank: int, world_size: int, accum: int) -> BatchSource:
        return SlotLoader(self.splits["train"], self.sampling, self.batch_size, self.block_size, seed, rank,
                          world_size, accum)

    def eval_loss(self, model: torch.nn.Module, split: str, *, batches: int, device: torch.device,
                  dtype: torch.dtype, rank: int = 0, world_size: int = 1, progress: bool = False) -> float:
        """The periodic estimate: the same `batches` windows of the split at every call."""
        return estimate_loss(model, self.splits[split], batches=batches, batch_size=self.batch_size,
                             block_size=self.block_size, device=device, dtype=dtype, rank=rank,
                             world_size=world_size, progress=progress, desc=f"eval {split}")

    def full_val(self, model: torch.nn.Module, *, device: torch.device, dtype: torch.dtype,
                 progress: bool = False) -> EvalResult:
        """The whole val split in non-overlapping windows; forward only, so more windows per batch (up to 16k tokens)."""
        T = self.block_size
        batch = max(self.batch_size, min(64, 16384 // T))
        return evaluate_tokens(model, self.splits["val"], block_size=T, batch_size=batch, device=device, dtype=dtype,
                               progress=progress, desc="eval val (whole split)")


class ChatTask(Task):
    """Supervised fine-tuning on conversations: the loss (train and val) counts only the assistant's tokens.

    The splits' conversations are packed whole into rows of block_size + 1 tokens (gptforge.data.chat_loader:
    none is cut where it fits; a longer one is truncated to the context, and counted); targets are -1 where
    the loss mask is 0, which the model's loss ignores, so `loss` is every task's."""

    def __init__(self, splits: dict[str, tuple[Any, Any]], *, bos_id: int, sampling: str, batch_size: int,
                 block_size: int, log=None):
        """`splits`: name -> (tokens, mask) for "train" and "val"; `log` is told about truncated conversations."""
        self.splits = {name: tokens for name, (tokens, _) in splits.items()}  # as LMTask's: the token streams
        self.masks = {name: mask for name, (_, mask) in splits.items()}
        self.sampling, self.batch_size, self.block_size = sampling, batch_size, block_size
        self.window = block_size + 1
        self.packed = {name: pack(tokens, mask, bos_id, self.window) for name, (tokens, mask) in splits.items()}
        for name, p in self.packed.items():
            if not p.rows:
                raise UserError(f"the {name} split has no conversation with an assistant token inside "
                                f"{self.window} tokens; use a longer model.block_size or other data")
            if log is not None and p.truncated:
                log(f"note: {p.truncated} of {p.conversations} {name} conversations are longer than block_size + 1 "
                    f"= {self.window} tokens and were truncated to it ({p.dropped} of them dropped: nothing "
                    "the assistant says fits)")

    def batches(self, seed: int, rank: int, world_size: int, accum: int) -> BatchSource:
        tokens, mask = self.splits["train"], self.masks["train"]
        return ChatBatches(tokens, mask, self.packed["train"].rows, window=self.window, batch_size=self.batch_size,
                           sampling=self.sampling, seed=seed, rank=rank, world_size=world_size, accum=accum)

    def _masked_loss(self, model: torch.nn.Module, split: str, rows: list, *, device: torch.device,
                     dtype: torch.dtype, rank: int, world_size: int, progress: bool, desc: str) -> tuple[float, int]:
        return masked_loss(model, self.splits[split], self.masks[split], rows, window=self.window,
                           batch_size=self.batch_size, device=device, dtype=dtype, rank=rank, world_size=world_size,
                           progress=progress, desc=desc)

    def eval_tokens(self, batches: int) -> int:
        return sum(min(len(self.packed[s].rows), batches * self.batch_size) for s in ("train", "val")) * self.block_size

    def full_val_tokens(self) -> int:
        return len(self.packed["val"].rows) * self.block_size  # rows are padded to the window

    def eval_loss(self, model: torch.nn.Module, split: str, *, batches: int, device: torch.device,
                  dtype: torch.dtype, rank: int = 0, world_size: int = 1, progress: bool = False) -> float:
        """The periodic estimate: the same rows (the split's first `batches` x batch_size, in a fixed
        shuffled order) at every call."""
        rows = self.packed[split].rows
        order = np.random.Generator(np.random.PCG64(EVAL_SEED)).permutation(len(rows))
        chosen = [rows[i] for i in order[:batches * self.batch_size]]
        return self._masked_loss(model, split, chosen, device=device, dtype=dtype, rank=rank, world_size=world_size,
                                 progress=progress, desc=f"eval {split}")[0]

    def full_val(self, model: torch.nn.Module, *, device: torch.device, dtype: torch.dtype,
                 progress: bool = False) -> EvalResult:
        """Every val conversation once; `tokens` is the number of learned (assistant) targets."""
        loss, count = self._masked_loss(model, "val", self.packed["val"].rows, device=device, dtype=dtype, rank=0,
                                        world_size=1, progress=progress, desc="eval val (whole split)")
        return masked_result(loss, count, whole=True)
