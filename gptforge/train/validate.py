"""The evaluations a run makes while it trains, each returning numbers and reporting nothing: `Validator.losses`
(train and val loss on the fixed eval batches), `Validator.hellaswag` and `Validator.full_val` (the whole val
split). The Trainer decides when they run; the RunLog reports what they return.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from gptforge import dist
from gptforge.evaluate import EvalResult
from gptforge.hellaswag import hellaswag_during_training
from gptforge.train.task import Task


class Validator:
    """Evaluations through `model` (the plain model, or under FSDP the wrapper, which alone has the weights: see
    dist.eval_module) on `task`'s splits, on `device` in `dtype`, shared among the ranks of `world`; HellaSwag
    over `hellaswag_examples` (loaded once at start-up, encoded with `tokenizer`) when there are any."""

    def __init__(self, task: Task, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 world: Optional[dist.DistInfo] = None, *, eval_iters: int, tokenizer=None,
                 hellaswag_examples: Optional[Sequence[dict[str, Any]]] = None, hellaswag_batch_size: int = 8):
        self.task, self.model, self.device, self.dtype = task, model, device, dtype
        self.world = world or dist.DistInfo()
        self.eval_iters, self.tokenizer = eval_iters, tokenizer
        self.hellaswag_examples, self.hellaswag_batch_size = hellaswag_examples, hellaswag_batch_size

    def losses(self, progress: bool = False) -> tuple[float, float]:
        """(train loss, val loss), each over the same `eval_iters` batches at every call."""
        kw = dict(batches=self.eval_iters, device=self.device, dtype=self.dtype, rank=self.world.rank,
                  world_size=self.world.world_size, progress=progress)
        return self.task.eval_loss(self.model, "train", **kw), self.task.eval_loss(self.model, "val", **kw)

    @property
    def has_hellaswag(self) -> bool:
        return self.hellaswag_examples is not None

    def hellaswag(self, progress: bool = False) -> dict[str, Any]:
        """{acc, acc_norm, n, ...} over every example (each rank scores its share; see hellaswag_during_training)."""
        return hellaswag_during_training(self.model, self.tokenizer, self.hellaswag_examples, self.device, self.dtype,
                                         self.hellaswag_batch_size, rank=self.world.rank,
                                         world_size=self.world.world_size, progress=progress)

    def full_val(self, progress: bool = False) -> EvalResult:
        """The loss over the whole val split (every rank computes it alone)."""
        return self.task.full_val(self.model, device=self.device, dtype=self.dtype, progress=progress)
