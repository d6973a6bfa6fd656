"""The training loop: a `Trainer` with named steps (`train_step`, `evaluate`, `save`, the stop decision
`should_stop`) and `fit`, which runs them in nanoGPT's order and decides what is saved when:

    while not finished:  hellaswag if due -> evaluate if due (then latest/, best/) -> train_step -> stop?
    then:                final evaluations (or, when stopped early, a checkpoint to resume from)

The Trainer hands off what is not the loop, as torchtitan's does: its evaluations to a `Validator`
(train/validate.py), its reports (metrics.jsonl, trackers, console lines, MFU, the time estimate) to a `RunLog`
(train/metrics.py), its checkpoints to a `Checkpointer` (train/checkpointer.py). Signals (SIGINT/SIGTERM: stop
after this step, or abandon an evaluation) are handled here, by `StopOnSignal`.

A test can build a Trainer from a model and in-memory tokens and drive one step at a time; `run.train` builds
one from a run directory. The resumable fields are `Trainer.state` (a `TrainState`).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from gptforge import dist, lora
from gptforge.config import RunConfig
from gptforge.device import autocast
from gptforge.errors import UserError
from gptforge.optim import lr_at, lr_at_progress, set_lr
from gptforge.train.checkpointer import Checkpointer
from gptforge.train.metrics import EvalWork, RunLog
from gptforge.train.state import TrainResult, TrainState
from gptforge.train.task import BatchSource, Task
from gptforge.train.validate import Validator


def apply_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    grad_clip: float) -> torch.Tensor:
    """The end of every training step, after the backward passes: unscale (fp16), clip the global norm
    (0 = no clipping, but the norm is still measured for the log), step, and clear the gradients."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def scheduled_lr(cfg: RunConfig, step: int, elapsed: float) -> float:
    """The lr of `step`: along train.max_iters, or under a time budget along the share of it `elapsed` has used."""
    t = cfg.train
    if t.time_budget is None:
        return lr_at(step, cfg.optim, t.max_iters)
    return lr_at_progress(step, elapsed / t.time_budget, cfg.optim)


def check_step_finite(loss: float, grad_norm: float, *, step: int, fp16: bool, run_dir: Optional[Path],
                      last_eval_step: Optional[int]) -> None:
    """A non-finite loss (or, outside fp16's loss scaling, gradient norm) means the weights are now garbage:
    stop before anything is saved, so latest/ keeps the last good step."""
    bad_norm = not math.isfinite(grad_norm) and not fp16
    if math.isfinite(loss) and not bad_norm:
        return
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
    kept = (f"; {run_dir / 'latest'} keeps step {last_eval_step}"
            if run_dir is not None and last_eval_step else "; no checkpoint was written")
    raise UserError(f"training diverged at step {step}: the {what}; stopped without saving{kept}. "
                    "Lower --optim.lr, raise --optim.warmup_iters, or check --model.norm_eps and the data")


def check_eval_finite(train_loss: float, val_loss: float, step: int) -> None:
    """An evaluation's non-finite loss: the same divergence, seen at an evaluation (before its save)."""
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
        raise UserError(f"training diverged by step {step}: the eval loss is train {train_loss}, val {val_loss}; "
                        "stopped without saving. Lower --optim.lr or raise --optim.warmup_iters")


class Interrupted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: abort now, without saving; `signum` gives the exit status 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class EvalStopped(Exception):
    """A first SIGINT/SIGTERM during an evaluation: it is abandoned (it changes nothing), and the run saves and stops."""


class StopOnSignal:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step; a second one aborts.
    Inside `abortable()` (an evaluation) the first one also cuts the work short by raising EvalStopped:
    the periodic evaluation of a large model could otherwise keep a stopping run alive for minutes."""

    def __init__(self, log: Callable[[str], None]):
        self.signal_name: Optional[str] = None
        self._log, self._old, self._abortable = log, {}, False

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            raise Interrupted(signum)
        self.signal_name = signal.Signals(signum).name
        if self._abortable:
            self._abortable = False
            self._log(f"{self.signal_name}: stopping the evaluation and saving a checkpoint (again to abort without saving)")
            raise EvalStopped
        self._log(f"{self.signal_name}: finishing this step and saving a checkpoint (again to abort without saving)")

    @contextlib.contextmanager
    def abortable(self, allowed: bool = True) -> Iterator[None]:
        """A stretch of work that a signal may abandon: it raises EvalStopped at once, or here if it came before."""
        if allowed and self.signal_name is not None:
            raise EvalStopped
        old, self._abortable = self._abortable, allowed
        try:
            yield
        finally:
            self._abortable = old

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class ModelParts:
    """What is trained: `model`, which the forward runs through (DDP/FSDP-wrapped or not), its `optimizer`, and
    `raw`, the plain model inside it (what is saved and what FLOPs are counted on; by default `model`)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    raw: Optional[torch.nn.Module] = None

    def __post_init__(self) -> None:
        self.raw = self.raw if self.raw is not None else self.model


@dataclass
class Compute:
    """Where and how the steps run: the device and the autocast dtype, this process's place among the ranks, the
    micro-batches accumulated per step, and the device's peak FLOP/s (None: no MFU is reported)."""

    device: torch.device
    dtype: torch.dtype = torch.float32
    world: dist.DistInfo = field(default_factory=dist.DistInfo)
    accum: int = 1
    peak_flops: Optional[float] = None


class Trainer:
    """One run's loop: `parts` is what is trained, `compute` where; `task` gives the batches and the loss. By
    default its evaluations are a Validator's on `parts.model`, it reports through a RunLog that prints, and its
    checkpointer keeps nothing. `on_step(step, row)`, after every step, stops the run by returning true."""

    def __init__(self, cfg: RunConfig, parts: ModelParts, task: Task, compute: Compute, *,
                 state: Optional[TrainState] = None, batches: Optional[BatchSource] = None,
                 log: Optional[RunLog] = None, validator: Optional[Validator] = None,
                 checkpointer: Optional[Checkpointer] = None, on_step: Optional[Callable[[int, dict], Any]] = None):
        self.cfg, self.task, self.compute, self.on_step = cfg, task, compute, on_step
        self.model, self.optimizer, self.raw = parts.model, parts.optimizer, parts.raw
        world = compute.world
        self.state = state or TrainState()
        self.batches = batches or task.batches(cfg.train.seed, world.rank, world.world_size, compute.accum)
        self.log = log or RunLog(cfg.train)
        self.validator = validator or Validator(task, parts.model, compute.device, compute.dtype, world,
                                                eval_iters=cfg.train.eval_iters)
        self.checkpointer = checkpointer or Checkpointer(None, cfg, world=world)
        self.scaler = torch.amp.GradScaler(compute.device.type, enabled=compute.dtype == torch.float16)
        tokens = cfg.train.batch_size * cfg.model.block_size * compute.accum  # this process's, per step
        self.tokens_per_step = tokens * world.world_size
        self.t_start = time.perf_counter() - self.state.elapsed_s
        self.log.start(self.t_start, tokens_per_step=self.tokens_per_step,
                       flops_per_step=lora.training_flops_per_token(self.raw) * tokens, peak=compute.peak_flops,
                       device=compute.device, dtype=compute.dtype, work=self._work(tokens))
        self.elapsed = time.perf_counter() - self.t_start  # under a time budget, every rank's is the slowest's:
        if cfg.train.time_budget is not None and world.is_distributed:  # the same clock, so the same lr
            self.elapsed = dist.max_over_ranks([self.elapsed], compute.device)[0]
        self.last_train_loss: Optional[float] = None
        self.stopper: Optional[StopOnSignal] = None  # while `fit` runs

    def _work(self, step_tokens: int) -> EvalWork:
        """What the run does besides its steps, for the time estimate (this process's share)."""
        t, world = self.cfg.train, self.compute.world
        return EvalWork(eval_tokens=-(-self.task.eval_tokens(t.eval_iters) // world.world_size),
                        full_val_tokens=self.task.full_val_tokens() if t.full_val_at_end else 0,
                        step_tokens=step_tokens, save_bytes=self._checkpoint_bytes())

    def _checkpoint_bytes(self) -> int:
        """About what a save writes: the weights it keeps (a LoRA run's adapters only) and AdamW's two fp32
        moments of every trained weight (Muon keeps fewer: the estimate errs long)."""
        if not self.checkpointer.enabled:
            return 0
        params = list(self.raw.parameters())
        trained = sum(p.numel() for p in params if p.requires_grad)
        kept = (sum(p.numel() * p.element_size() for p in params) if self.checkpointer.base is None
                else trained * 4)
        return kept + 8 * trained

    def abortable(self):
        """Where a signal may abandon the work (evaluations, which change nothing) in a single process; under
        torchrun the ranks would stop at different batches of a collective, so there each finishes it."""
        if self.stopper is None:
            return contextlib.nullcontext()
        return self.stopper.abortable(allowed=not self.compute.world.is_distributed)

    def train_step(self) -> dict:
        """One optimizer step over `accum` micro-batches; returns its metrics row (recorded by the RunLog)."""
        mode, accum, device, world = self.cfg.train.dist, self.compute.accum, self.compute.device, self.compute.world
        lr = scheduled_lr(self.cfg, self.state.step, self.elapsed)
        set_lr(self.optimizer, lr)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            dist.set_grad_sync(self.model, mode, micro == accum - 1)
            x, y = self.batches.next(micro, device)
            with autocast(device, self.compute.dtype):
                loss = self.task.loss(self.model, x, y) / accum
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        grad_norm = apply_gradients(self.model, self.optimizer, self.scaler, self.cfg.optim.grad_clip)
        self.state.step += 1
        if world.is_distributed:
            loss_sum = dist.all_reduce_sum(loss_sum) / world.world_size  # the mean over every rank's data
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.last_train_loss, norm = loss_sum.item(), grad_norm.item()
        check_step_finite(self.last_train_loss, norm, step=self.state.step, fp16=self.compute.dtype == torch.float16,
                          run_dir=self.checkpointer.run_dir, last_eval_step=self.state.last_eval_step)
        return self.log.step({"step": self.state.step, "loss": self.last_train_loss, "lr": lr, "grad_norm": norm},
                             self.elapsed)

    def evaluate(self) -> tuple[float, float]:
        """Train and val loss on the fixed eval batches, kept in the state (the last evaluation, the best val loss)."""
        st = self.state
        with self.abortable():
            tr, va = self.validator.losses(progress=self.log.show_progress)
        check_eval_finite(tr, va, st.step)
        st.last_eval_step, st.val_loss = st.step, va
        if st.best_val_loss is None or va < st.best_val_loss:
            st.best_val_loss = va
        return tr, va

    def save(self) -> None:
        """Write latest/ (every rank takes part: gathering FSDP shards and data positions are collectives)."""
        self.checkpointer.save(self.raw, self.optimizer, self.batches, self._state_to_save)

    def _state_to_save(self) -> dict:
        self.state.elapsed_s = time.perf_counter() - self.t_start
        return {**self.state.state_dict(), "tokens_seen": self.state.step * self.tokens_per_step}

    def finished(self) -> bool:
        t = self.cfg.train
        return self.state.step >= t.max_iters or (t.time_budget is not None and self.elapsed >= t.time_budget)

    def eval_due(self) -> bool:
        step, t = self.state.step, self.cfg.train
        return step % t.eval_interval == 0 and step != self.state.last_eval_step and (step > 0 or t.eval_at_start)

    def hellaswag_due(self) -> bool:
        every, st = self.cfg.eval.hellaswag_every, self.state
        return self.validator.has_hellaswag and st.step % every == 0 and st.step != st.last_hellaswag_step

    def should_stop(self, row: dict, stopper: StopOnSignal, first_step: int) -> bool:
        """A signal, `on_step` returning true, or train.stop_after: every rank agrees, at the same step."""
        asked = self.on_step is not None and self.on_step(self.state.step, row)
        after = self.cfg.train.stop_after  # (reached at the last step, it is just the end)
        if asked or (after is not None and self.state.step - first_step >= after and not self.finished()):
            stopper.signal_name = stopper.signal_name or "STOP"
        stop = stopper.signal_name is not None
        self.elapsed = time.perf_counter() - self.t_start
        if self.compute.world.is_distributed:  # all ranks must leave the loop at the same step, with the same lr
            stop_flag, self.elapsed = dist.max_over_ranks([float(stop), self.elapsed], self.compute.device)
            stop = stop_flag > 0
        return stop

    def fit(self) -> TrainResult:
        st, first_step, interrupted, val_full = self.state, self.state.step, None, None
        try:
            with StopOnSignal(self.log.say) as stopper:
                self.stopper = stopper
                self.log.reset_step_clock()
                try:
                    interrupted = self._steps(stopper, first_step)
                    if interrupted is None:
                        val_full = self._final_evaluations()
                except EvalStopped:
                    interrupted = stopper.signal_name
                if interrupted is not None:
                    self._save_on_stop()
        finally:
            self.stopper = None
            self.log.close()
        return TrainResult(run_dir=self.checkpointer.run_dir, step=st.step, train_loss=self.last_train_loss,
                           val_loss=st.val_loss, best_val_loss=st.best_val_loss, val_loss_full=val_full,
                           elapsed_s=time.perf_counter() - self.t_start, interrupted=interrupted)

    def _steps(self, stopper: StopOnSignal, first_step: int) -> Optional[str]:
        """Train until finished; what stopped the run early (a signal's name, or STOP), or None."""
        while not self.finished():
            if self.hellaswag_due():
                self._hellaswag()
            if self.eval_due():
                self._evaluate_and_save()
            row = self.train_step()
            if self.should_stop(row, stopper, first_step):
                return stopper.signal_name or "STOP"
        return None

    def _evaluate_and_save(self) -> None:
        """An evaluation, reported; then (after step 0) latest/, and best/ on a new best val loss."""
        st, best = self.state, self.state.best_val_loss
        with self.log.between_steps(evaluation=True):
            self.log.eval_starting(st.step)
            tr, va = self.evaluate()
            improved = best is None or va < best
            self.log.evaluation(st.step, tr, va, best=improved)
            if st.step > 0:
                self.save()
                if improved:
                    self.checkpointer.mark_best(va, st.step)

    def _hellaswag(self) -> None:
        with self.log.between_steps() as seconds:
            with self.abortable():
                hs = self.validator.hellaswag(progress=self.log.show_progress)
            self.state.last_hellaswag_step = self.state.step
            self.log.hellaswag(self.state.step, hs, seconds())

    def _final_evaluations(self) -> Optional[float]:
        st = self.state
        if self.validator.has_hellaswag and st.step != st.last_hellaswag_step:
            self._hellaswag()  # the final figure, whatever hellaswag_every
        if st.step != st.last_eval_step:
            self._evaluate_and_save()
        if not self.cfg.train.full_val_at_end:
            return None
        with self.log.between_steps() as seconds:
            with self.abortable():
                result = self.validator.full_val(progress=self.log.show_progress)
            self.log.full_val(st.step, result, seconds())
        return result.loss

    def _save_on_stop(self) -> None:
        if self.state.step > 0:  # else stopped during the first evaluation: nothing trained, nothing to keep
            self.save()
        self.log.stopped(self.state.step, self.checkpointer.run_dir if self.checkpointer.enabled else None)
