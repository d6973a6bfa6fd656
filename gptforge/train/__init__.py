"""Training: `train(config, run_dir)` is the whole of `gptforge train`.

A run directory holds config.json (the resolved config), metrics.jsonl (one JSON object per step and per
evaluation), latest/ (resumable) and best/ (the weights with the lowest val loss so far), and .lock while a
process trains there. Stopping (Ctrl-C, SIGTERM) finishes the current step, writes latest/ and returns;
`train(..., resume=True)` continues from it and, on CPU, ends with weights bit-identical to those of an
uninterrupted run.

The package, in the order a run meets it: `setup` (run directory, data, model, restore), `task` (the batches
and the loss), `loop` (the `Trainer` and its named steps), `state` (`TrainState`, every resumable field once),
and `run` (`train`, which strings them together).
"""

from gptforge.train.loop import Trainer, apply_gradients
from gptforge.train.run import train
from gptforge.train.setup import grad_accum_steps, pad_vocab
from gptforge.train.state import TrainResult, TrainState
from gptforge.train.task import LMTask

__all__ = ["train", "Trainer", "TrainState", "TrainResult", "LMTask", "apply_gradients", "grad_accum_steps",
           "pad_vocab"]
