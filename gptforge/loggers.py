"""Optional experiment trackers: Weights & Biases and TensorBoard, off by default, never required.

Owns the mapping from the trainer's metrics rows (the rows of metrics.jsonl) to tracker scalars, and
the one-line errors when a tracker's package is missing. metrics.jsonl stays the record of a run; a
tracker is a view of it, so nothing here may stop training once it has started.

    logger = make_logger("tensorboard", run_dir, cfg.to_dict())
    logger.log(row, step)      # every metrics row, train and eval alike
    logger.close()

Scalars are named `train/<key>` for step rows and `eval/<key>` for evaluation rows (val loss, HellaSwag),
so both tools group them into two sections. Only rank 0 should make a logger other than "none".
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal, Optional

from gptforge.errors import UserError, one_line

LoggerKind = Literal["none", "wandb", "tensorboard"]
KINDS = ("none", "wandb", "tensorboard")
TENSORBOARD_DIR = "tensorboard"  # under RUN_DIR: `tensorboard --logdir RUN_DIR/tensorboard`
DEFAULT_WANDB_PROJECT = "gptforge"
_SKIP = ("step",)  # the x axis, not a curve


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics row, named `eval/KEY` for evaluation rows and `train/KEY` otherwise."""
    section = "eval" if any(k == "val_loss" or k.startswith("hellaswag") for k in row) else "train"
    out = {}
    for key, value in row.items():
        # bools are ints to Python, but a flag is not a curve; None (e.g. mfu on an unknown GPU) is no value
        if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"{section}/{key}"] = float(value)
    return out


class NoLogger:
    """kind "none": every call does nothing, so the trainer needs no `if logger` anywhere."""

    def log(self, row: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Tracker:
    """A tracker that turns itself off, with one warning on stderr, the first time it fails.

    A full disk or a lost connection to W&B must not end a training run that metrics.jsonl records anyway.
    """

    name = "tracker"
    _failed = False

    def _send(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _warn(self, e: BaseException) -> None:
        self._failed = True
        msg = one_line(e, 200, with_type=True)
        print(f"gptforge: warning: {self.name} logging failed ({msg}); training goes on without it, "
              "metrics.jsonl has every row", file=sys.stderr)

    def log(self, row: dict[str, Any], step: int) -> None:
        values = scalars(row)
        if self._failed or not values:
            return
        try:
            self._send(values, step)
        except Exception as e:  # noqa: BLE001 - whatever the tracker raises, training continues
            self._warn(e)

    def close(self) -> None:
        try:
            self._finish()
        except Exception as e:  # noqa: BLE001
            if not self._failed:
                self._warn(e)


class TensorBoardLogger(_Tracker):
    """Event files under RUN_DIR/tensorboard, written by PyTorch's own SummaryWriter."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch.utils.tensorboard imports the tensorboard package
            raise UserError("the tensorboard logger needs the tensorboard package: pip install tensorboard") from None
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        # The config as text, so a curve in the UI can be traced back to its settings.
        self._writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", global_step=0)

    def _send(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def _finish(self) -> None:
        self._writer.flush()
        self._writer.close()


class WandbLogger(_Tracker):
    """A Weights & Biases run whose files live in RUN_DIR/wandb.

    Online it needs `wandb login` (or WANDB_API_KEY); WANDB_MODE=offline writes the run locally and
    `wandb sync RUN_DIR/wandb/offline-run-*` uploads it later. Every `train` call, a resume included,
    is a new W&B run in the group named after the run directory, so resumed pieces sit together.
    """

    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], project: Optional[str], run_name: Optional[str]):
        try:
            import wandb
        except ImportError:
            raise UserError("the wandb logger needs the wandb package: pip install wandb") from None
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        name = run_name or run_dir.resolve().name
        try:
            self._run = wandb.init(project=project or DEFAULT_WANDB_PROJECT, name=name, group=name,
                                   dir=str(run_dir), config=config)
        except Exception as e:  # not logged in, unreachable server, bad project name: the user's to fix
            msg = one_line(e, 300)
            raise UserError(f"wandb could not start a run: {msg}; run `wandb login`, or set WANDB_MODE=offline "
                            "to log locally") from None

    def _send(self, values: dict[str, float], step: int) -> None:
        self._run.log(values, step=step)

    def _finish(self) -> None:
        self._run.finish()


def make_logger(kind: str, run_dir: str | os.PathLike, config_dict: dict[str, Any], project: Optional[str] = None,
                run_name: Optional[str] = None):
    """A logger with `log(row, step)` and `close()`: "none" (the default: does nothing), "wandb" or "tensorboard".

    `project` and `run_name` are for wandb (default project "gptforge", run name the run directory's name).
    A missing package is a UserError naming the pip install, raised here, before training starts.
    """
    if kind == "none":
        return NoLogger()
    if kind == "tensorboard":
        return TensorBoardLogger(Path(run_dir), config_dict)
    if kind == "wandb":
        return WandbLogger(Path(run_dir), config_dict, project, run_name)
    raise UserError(f"unknown logger {kind!r}; choose one of: {', '.join(KINDS)}")
