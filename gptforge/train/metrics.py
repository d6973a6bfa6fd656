"""What a run reports, and where: `RunLog` owns metrics.jsonl and the tracker (TensorBoard / W&B), the console
lines (above the live progress line when there is one), the time of every step with its tokens/s and MFU, and
the time estimate after the first steps.

The Trainer hands it numbers (a step's loss, lr and gradient norm; an evaluation's losses); every row and every
line a run writes about itself is formatted here, so the loop has no formatting of its own.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from gptforge import device as devices  # the module, not a name from it: tests replace measure_peak_flops
from gptforge.config import TrainConfig
from gptforge.evaluate import EvalResult
from gptforge.loggers import NoLogger
from gptforge.progress import StepProgress, duration

ESTIMATE_AFTER = 3  # steps measured (the first is warm-up) before the time estimate is logged
LONG_RUN_S = 3600.0  # on a CPU, a run estimated longer than this gets a hint
# A checkpoint save is not timed before the estimate is due (the first comes with the first evaluation after step
# 0), so its time is its size at a write speed a laptop SSD sustains with fsync: a guess that errs long.
SAVE_BYTES_PER_S = 500e6
FORWARD_SHARE = 1 / 3  # a forward's share of a training step's FLOPs (backward ~2x): eval speed before one is timed


class RunLog:
    """A run's reports. `say` prints a line; `metrics_path` (None: none) gets every row, and so does `tracker`;
    `progress` is the live line (set once the start-up summary is out; a terminal only) and `show_progress`
    whether evaluations show theirs (gptforge.progress: a bar on a terminal, periodic lines off one).
    `verbosity` 0 logs only notes, 1 also the time estimate and a line every train.log_interval steps, 2 every
    step.

    `start` tells it the run's clock and what a step is worth (tokens, FLOPs, the device's peak FLOP/s)."""

    def __init__(self, train: TrainConfig, *, say: Callable[[str], None] = print, verbosity: int = 1,
                 metrics_path: Optional[Path] = None, tracker=None, progress: Optional[StepProgress] = None,
                 show_progress: bool = False):
        self.train, self._say, self.verbosity, self.progress = train, say, verbosity, progress
        self.show_progress = show_progress or progress is not None
        self.file = open(metrics_path, "a", buffering=1) if metrics_path is not None else None
        self.tracker = tracker or NoLogger()
        self.step_times: list[float] = []
        self.eval_s: Optional[float] = None  # how long the first evaluation took (for the time estimate)
        self.t_start = self.t_last = time.perf_counter()
        self.tokens_per_step, self.flops_per_step, self.peak = 0, 0.0, None
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.work = EvalWork()
        self._remeasured = False

    def start(self, t_start: float, *, tokens_per_step: int, flops_per_step: float, peak: Optional[float],
              device: torch.device, dtype: torch.dtype, work: Optional["EvalWork"] = None) -> None:
        """The run's clock (`t_start`: perf_counter at its step 0, counting the time before a resume), the tokens
        of a step over every process, this process's FLOPs per step, the peak they are set against, and the
        work besides the steps (`work`), for the time estimate."""
        self.t_start, self.t_last = t_start, time.perf_counter()
        self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak
        self.device, self.dtype = device, dtype
        self.work = work or EvalWork()

    # ---- the sinks

    def say(self, msg: str) -> None:
        """A log line (above the live progress line when there is one)."""
        if self.progress is not None:
            self.progress.write(self._say, msg)
        else:
            self._say(msg)

    def row(self, row: dict[str, Any]) -> None:
        """One metrics row, to metrics.jsonl and the tracker."""
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
        self.tracker.log(row, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.tracker.close()
        if self.progress is not None:
            self.progress.close()

    def _time_s(self) -> float:
        return round(time.perf_counter() - self.t_start, 3)

    # ---- what the loop reports

    def reset_step_clock(self) -> None:
        """What came before (set-up, an evaluation) is not part of the next step's time."""
        self.t_last = time.perf_counter()

    @contextlib.contextmanager
    def between_steps(self, evaluation: bool = False) -> Iterator[Callable[[], float]]:
        """Work between two steps (an evaluation and its save): left out of the next step's time. Yields the
        seconds since it began; with `evaluation`, the first one's time goes into the time estimate."""
        t0 = time.perf_counter()
        yield lambda: time.perf_counter() - t0
        self.reset_step_clock()
        if evaluation and self.eval_s is None:
            self.eval_s = self.t_last - t0

    def step(self, row: dict[str, Any], elapsed: float) -> dict[str, Any]:
        """A train step's row (step, loss, lr, grad_norm), completed with its time, tokens/s and MFU, recorded,
        drawn on the live line and (every log_interval steps) printed. `elapsed`: the run's clock as the ranks
        agreed it, for the time estimate. Returns the whole row."""
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        row = {**row, "dt_ms": round(dt * 1000, 3), "tokens_per_s": round(self.tokens_per_step / dt, 1),
               "mfu": self._mfu(dt), "time_s": round(now - self.t_start, 3)}
        self.row(row)
        self.step_times.append(dt)
        if self.progress is not None:
            self.progress.update(row)
        self._step_line(row, elapsed)
        return row

    def eval_starting(self, step: int) -> None:
        """Before the first evaluation, which may take long: what it is doing."""
        if self.eval_s is None and self.verbosity >= 1:
            self.say(f"eval step {step}: measuring train and val loss over {self.train.eval_iters} batches each ...")

    def evaluation(self, step: int, train_loss: float, val_loss: float, best: bool) -> None:
        self.row({"step": step, "train_loss": train_loss, "val_loss": val_loss, "time_s": self._time_s(),
                  "tokens": step * self.tokens_per_step})
        self.say(f"eval step {step}: train loss {train_loss:.4f} | val loss {val_loss:.4f}{' (best)' if best else ''}")

    def hellaswag(self, step: int, hs: dict[str, Any], seconds: float) -> None:
        self.row({"step": step, "hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"],
                  "hellaswag_n": hs["n"], "time_s": self._time_s()})
        self.say(f"hellaswag step {step}: acc {hs['acc']:.4f} | acc_norm {hs['acc_norm']:.4f} | {hs['n']} examples "
                 f"| {seconds:.1f} s")

    def full_val(self, step: int, result: EvalResult, seconds: float) -> None:
        self.row({"step": step, "val_loss_full": result.loss, "val_tokens": result.tokens, "time_s": self._time_s()})
        self.say(f"val loss at step {step}: {result.loss:.4f} over {result.counted('val')} ({seconds:.1f} s)")

    def stopped(self, step: int, saved_in: Optional[Path]) -> None:
        """The run stopped early, at `step`; `saved_in` is the run directory its checkpoint went to (None: none)."""
        if step == 0:
            self.say("stopped before the first step; nothing was saved: run the same command again to start")
        elif saved_in is not None:
            self.say(f"stopped at step {step}; checkpoint in {saved_in / 'latest'}; "
                     f"continue with `gptforge train --resume {saved_in}`")
        else:
            self.say(f"stopped at step {step}; train.save_checkpoints is off, so nothing was saved")

    # ---- derived figures

    def _mfu(self, dt: float) -> Optional[float]:
        """Model FLOPs utilisation against the peak; never above 1. A CPU's peak is a matmul timed at start-up: if
        the machine was busy then, a step can seem faster than the peak, so the peak is measured again (once);
        a figure still above 1 is not a measurement and is left out (None)."""
        if not self.peak:
            return None
        mfu = self.flops_per_step / dt / self.peak
        if mfu > 1.0 and not self._remeasured and self.device.type == "cpu":
            self._remeasured = True
            old, self.peak = self.peak, max(self.peak, devices.measure_peak_flops(self.device, self.dtype))
            self.say(f"note: a step beat the matmul peak measured at start-up ({old / 1e9:.0f} GFLOP/s; the machine "
                     f"was busy then?); MFU is now against {self.peak / 1e9:.0f} GFLOP/s measured again")
            self.reset_step_clock()
            mfu = self.flops_per_step / dt / self.peak
        return round(mfu, 5) if mfu <= 1.0 else None

    def _step_line(self, row: dict[str, Any], elapsed: float) -> None:
        t, step = self.train, row["step"]
        if len(self.step_times) == ESTIMATE_AFTER and self.verbosity >= 1:
            self.say(self.time_estimate(step, elapsed))
        if self.verbosity < 1 or (self.verbosity < 2 and step % t.log_interval and step != t.max_iters):
            return
        mfu = f" | mfu {row['mfu'] * 100:.1f}%" if row["mfu"] is not None else ""
        where = (f"{step}/{t.max_iters}" if t.time_budget is None
                 else f"{step} ({row['time_s']:.0f}/{t.time_budget:g} s)")
        self.say(f"step {where} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | norm {row['grad_norm']:.3f} | "
                 f"{row['dt_ms']:.1f} ms | {row['tokens_per_s'] / 1000:.1f}k tok/s{mfu}")

    def time_estimate(self, step: int, elapsed: float) -> str:
        """After the first few steps: the measured time per step, the whole run's estimate (the end included: the
        last evaluation, the checkpoint saves and the whole-val pass), and a hint when that is hours on a CPU.
        `step`: steps taken; `elapsed`: seconds of the run so far."""
        t, w = self.train, self.work
        per_step = sorted(self.step_times[1:])[len(self.step_times[1:]) // 2]  # median, the first step is warm-up
        measured = f"time: {per_step:.3g} s/step measured over steps {step - ESTIMATE_AFTER + 2}-{step}"
        eval_s, save_s = self._eval_s(per_step), w.save_bytes / SAVE_BYTES_PER_S
        full_s = w.full_val_tokens * self._forward_s_per_token(per_step)
        full = [f"the whole val split at the end ({w.full_val_tokens:,} tokens)"] if w.full_val_tokens else []
        if t.time_budget is not None:
            steps = int(max(0.0, t.time_budget - elapsed) / per_step) + step
            end = ["the last evaluation"] * bool(eval_s) + ["its checkpoint save"] * bool(save_s) + full
            then = f", then about {duration(eval_s + save_s + full_s)} for {_and(end)}" if end else ""
            return f"{measured}, so about {steps:,} steps in the {t.time_budget:g} s budget{then}"
        left = max(0, t.max_iters - step)
        evals = left // t.eval_interval + 1  # the last step's included
        saves = evals if save_s else 0
        parts = ([f"the {left:,} steps left"] + [f"{evals} evaluations"] * bool(eval_s)
                 + [f"{saves} checkpoint saves ({w.save_bytes / 1e9:.2g} GB each)"] * bool(saves) + full)
        total = left * per_step + evals * eval_s + saves * save_s + full_s
        line = f"{measured}; {_and(parts)} take about {duration(total)} on this machine ({self.device.type})"
        if total > LONG_RUN_S and self.device.type != "cuda":
            line += ("; this recipe is meant for a GPU: on a CPU try --preset speedrun-cpu or "
                     "--preset shakespeare-char-cpu, or fewer --train.max_iters")
        return line

    def _eval_s(self, per_step: float) -> float:
        """One periodic evaluation: the first one's time, or before there was one, its tokens at the speed of
        `_forward_s_per_token` (0 when neither is known)."""
        if self.eval_s is not None:
            return self.eval_s
        return self.work.eval_tokens * self._forward_s_per_token(per_step)

    def _forward_s_per_token(self, per_step: float) -> float:
        """Seconds of an evaluation's forward per token on this process: measured on the first evaluation, else
        a forward's share of a training step per token."""
        if self.eval_s is not None and self.work.eval_tokens:
            return self.eval_s / self.work.eval_tokens
        return per_step * FORWARD_SHARE / self.work.step_tokens if self.work.step_tokens else 0.0


def _and(parts: list[str]) -> str:
    return ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else parts[0]


@dataclass
class EvalWork:
    """What a run does besides its steps, for the time estimate: the tokens one periodic evaluation forwards on
    this process (train and val), those of the whole-val pass at the end (0: none), the tokens of a training
    step on this process, and the bytes of a checkpoint save (0: none is written)."""
    eval_tokens: int = 0
    full_val_tokens: int = 0
    step_tokens: int = 0
    save_bytes: int = 0
