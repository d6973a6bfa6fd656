"""Training: `train(config, run_dir)` is the whole of `gptforge train`.

A run directory holds config.json (the resolved config), metrics.jsonl (one JSON object per step and per
evaluation), latest/ (resumable) and best/ (the weights with the lowest val loss so far), and .lock while a
process trains there. Stopping (Ctrl-C, SIGTERM) finishes the current step, writes latest/ and returns;
`train(..., resume=True)` continues from it and, on CPU, ends with weights bit-identical to those of an
uninterrupted run.

The package, in the order a run meets it: `setup` (run directory, data, model, restore; each returns what it
resolves and changes no config), `task` (the batches and the loss), `loop` (the `Trainer`: its named steps and
`fit`, which decides what is evaluated and saved when), and beside the loop what it hands off to: `validate`
(the evaluations, returning numbers), `metrics` (the `RunLog`: metrics.jsonl, trackers, console lines, MFU, the
time estimate) and `checkpointer` (latest/ and best/); `state` (`TrainState`, every resumable field once), and
`run` (`train`, which strings them together).
"""

from gptforge.train.checkpointer import Checkpointer
from gptforge.train.loop import Compute, ModelParts, Trainer, apply_gradients
from gptforge.train.metrics import RunLog
from gptforge.train.run import train
from gptforge.train.setup import grad_accum_steps, pad_vocab
from gptforge.train.state import TrainResult, TrainState
from gptforge.train.task import ChatTask, LMTask, Task
from gptforge.train.validate import Validator

__all__ = ["train", "Trainer", "ModelParts", "Compute", "RunLog", "Validator", "Checkpointer", "TrainState",
           "TrainResult", "Task", "LMTask", "ChatTask", "apply_gradients", "grad_accum_steps", "pad_vocab"]
