"""What a run carries from step to step and across a resume (`TrainState`), and what it returns (`TrainResult`).

Every resumable field of the loop is a field of `TrainState`, written to a checkpoint's state.json by
`state_dict` and read back by `from_state_dict`: one list, in one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass
class TrainState:
    """The loop's resumable state (the data position and optimizer moments live with their owners)."""

    step: int = 0
    """optimizer steps taken"""
    best_val_loss: Optional[float] = None
    val_loss: Optional[float] = None
    """the last periodic evaluation's val loss"""
    elapsed_s: float = 0.0
    """wall-clock seconds of training so far (the time budget counts it)"""
    last_eval_step: Optional[int] = None
    last_hellaswag_step: Optional[int] = None

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> "TrainState":
        """The fields of a checkpoint's state.json (older checkpoints may lack some: their defaults apply)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None})


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: Optional[float]
    val_loss: Optional[float]
    best_val_loss: Optional[float]
    elapsed_s: float
    interrupted: Optional[str] = None  # the signal's name when stopped early
    val_loss_full: Optional[float] = None  # the whole val split, with train.full_val_at_end

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "step": self.step, "train_loss": self.train_loss,
                "val_loss": self.val_loss, "best_val_loss": self.best_val_loss,
                "elapsed_s": round(self.elapsed_s, 3), "interrupted": self.interrupted,
                "val_loss_full": self.val_loss_full}
