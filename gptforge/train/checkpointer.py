"""What a run keeps in its run directory while it trains: latest/ (the weights, the optimizer, every rank's data
position and RNG, gathered from all ranks) and best/ (latest/ as it was at the lowest val loss). The Trainer
decides when; how a checkpoint is stored is gptforge.modelio.checkpoint's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from gptforge import dist, lora
from gptforge.config import RunConfig
from gptforge.modelio import checkpoint as ckpt_io
from gptforge.train.task import BatchSource


class Checkpointer:
    """Checkpoints of the run in `run_dir` (None, or train.save_checkpoints off: nothing is written). `cfg` and
    `tokenizer` go into every checkpoint, so a checkpoint rebuilds the run on its own."""

    def __init__(self, run_dir: Optional[Path], cfg: RunConfig, tokenizer=None, world: Optional[dist.DistInfo] = None,
                 base: Optional[dict[str, Any]] = None):
        self.run_dir, self.cfg, self.tokenizer = run_dir, cfg, tokenizer
        self.base = base  # a LoRA run's base (modelio.load.base_identity): checkpoints hold the adapters only
        self.world = world or dist.DistInfo()
        self.enabled = run_dir is not None and cfg.train.save_checkpoints

    def save(self, raw: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: BatchSource,
             train_state: Callable[[], dict[str, Any]]) -> None:
        """Write latest/. Every rank takes part (gathering FSDP shards and data positions are collectives); rank 0
        writes, with the loop's `train_state()`, asked for once the gathering is done."""
        if not self.enabled:
            return
        mode = self.cfg.train.dist
        if self.base is not None:  # DDP only: every rank holds the whole adapter, and the base is not copied out
            weights = lora.adapter_state(raw)
        else:
            weights = dist.full_model_state(raw, mode)
        optimizer_sd = dist.full_optimizer_state(raw, optimizer, mode)
        slots = [s for rank_slots in dist.all_gather_objects(batches.local_states()) for s in rank_slots]
        rng = dist.all_gather_objects({k: v.cpu() for k, v in ckpt_io.process_rng().items()})
        if self.world.is_main:
            state = {**train_state(), "world_size": self.world.world_size,
                     "data": {"sampling": self.cfg.train.sampling, "slots": slots}}
            if self.base is not None:
                state["base"] = self.base
            ckpt_io.write_checkpoint(self.run_dir / "latest", weights, self.cfg, self.tokenizer, state, optimizer_sd,
                                     rng)
        dist.barrier()

    def mark_best(self, val_loss: float, step: int) -> None:
        """best/ becomes the latest/ just written (its weights, linked, not copied)."""
        if self.enabled and self.world.is_main:
            ckpt_io.link_checkpoint(self.run_dir / "latest", self.run_dir / "best",
                                    {"val_loss": val_loss, "step": step})
