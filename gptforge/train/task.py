"""What a run learns from: the micro-batches of a step, the loss of a batch, and the loss of a split.

The loop asks its task for `batches(seed, rank, world_size, accum)` (a source whose position goes into
every checkpoint), `loss(model, x, y)` and `eval_loss(model, split, ...)`, and nothing else. `LMTask` is
next-token prediction on token streams (pretraining). An objective with masked targets (fine-tuning on
conversations: loss on the assistant's tokens only) supplies targets of -1 where nothing is learned, which the
model's loss ignores, through the same methods, so the loop has no branch for it.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch

from gptforge.data.loader import RandomBatches, SlotLoader
from gptforge.evaluate import EvalResult, estimate_loss, evaluate_tokens


class BatchSource(Protocol):
    """A rank's training micro-batches; its position is saved and restored for an exact resume."""

    def next(self, micro: int, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def local_states(self) -> list[dict[str, Any]]: ...

    def load_states(self, all_states: list[dict[str, Any]]) -> bool: ...


class LMTask:
    """Next-token prediction on the train and val token streams of a data directory."""

    def __init__(self, train_tokens, val_tokens, *, sampling: str, batch_size: int, block_size: int):
        self.splits = {"train": train_tokens, "val": val_tokens}
        self.sampling, self.batch_size, self.block_size = sampling, batch_size, block_size
        RandomBatches(val_tokens, batch_size, block_size, seed=0)  # fail early, with a clear message, if val is too short

    def batches(self, seed: int, rank: int, world_size: int, accum: int) -> BatchSource:
        return SlotLoader(self.splits["train"], self.sampling, self.batch_size, self.block_size, seed, rank,
                          world_size, accum)

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, y)

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
                               progress=progress)
