"""The training loop as a `Trainer` with named steps: `train_step`, `evaluate`, `save`, `hellaswag`,
`full_val`, the stop decision `should_stop`, and `fit`, which runs them in nanoGPT's order:

    while not finished:  evaluate if due -> train_step -> log -> stop?
    then:                final evaluations (or, when stopped early, a checkpoint to resume from)

A test can build a Trainer from a model and in-memory tokens and drive one step at a time; `run.train` builds
one from a run directory. The resumable fields are `Trainer.state` (a `TrainState`).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from gptforge.modelio import checkpoint as ckpt_io
from gptforge import dist
from gptforge.config import RunConfig
from gptforge.device import autocast
from gptforge.errors import UserError
from gptforge.loggers import NoLogger
from gptforge.optim import lr_at, lr_at_progress, set_lr
from gptforge.progress import StepProgress, duration
from gptforge.train.state import TrainResult, TrainState
from gptforge.train.task import LMTask


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


ESTIMATE_AFTER = 3  # steps measured (the first is warm-up) before the time estimate is logged
LONG_RUN_S = 3600.0  # on a CPU, a run estimated longer than this gets a hint


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


class Trainer:
    """One run's loop. `model` is what the forward runs through (DDP/FSDP-wrapped or not), `raw` the plain
    model inside it; `task` gives batches and losses; `run_dir` None writes nothing (no metrics, no checkpoints)."""

    def __init__(self, cfg: RunConfig, *, model: torch.nn.Module, raw: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, task: LMTask, device: torch.device, dtype: torch.dtype,
                 world: Optional[dist.DistInfo] = None, accum: int = 1, state: Optional[TrainState] = None,
                 batches=None, eval_model: Optional[torch.nn.Module] = None, tokenizer=None,
                 run_dir: Optional[Path] = None, tracker=None, hellaswag_examples=None, peak_flops=None,
                 log: Callable[[str], None] = print, on_step: Optional[Callable[[int, dict], Any]] = None,
                 progress: Optional[StepProgress] = None, verbosity: int = 1):
        self.cfg, self.model, self.raw, self.optimizer, self.task = cfg, model, raw, optimizer, task
        self.device, self.dtype, self.accum = device, dtype, accum
        self.world = world or dist.DistInfo(rank=0, local_rank=0, world_size=1)
        self.state = state or TrainState()
        self.batches = batches or task.batches(cfg.train.seed, self.world.rank, self.world.world_size, accum)
        self.eval_model = eval_model or model
        self.tokenizer, self.run_dir, self.hs_examples = tokenizer, run_dir, hellaswag_examples
        self.tracker = tracker or NoLogger()
        self._log, self.on_step, self.progress, self.verbosity = log, on_step, progress, verbosity
        self._step_times: list[float] = []
        self._eval_s: Optional[float] = None  # how long the first evaluation took (for the time estimate)
        self._mfu_remeasured = False
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.tokens_per_step = cfg.train.batch_size * cfg.model.block_size * accum * self.world.world_size
        self.flops_per_step = raw.flops_per_token() * cfg.train.batch_size * cfg.model.block_size * accum
        self.peak = peak_flops
        write = run_dir is not None and self.world.is_main
        self.metrics = open(run_dir / "metrics.jsonl", "a", buffering=1) if write else None
        self.t_start = time.perf_counter() - self.state.elapsed_s
        self.t_last = time.perf_counter()
        self.elapsed = self._agreed_elapsed()
        self.last_train_loss: Optional[float] = None
        self.stopper: Optional[StopOnSignal] = None  # while `fit` runs

    def abortable(self):
        """Where a signal may abandon the work (evaluations, which change nothing) in a single process; under
        torchrun the ranks would stop at different batches of a collective, so there each finishes it."""
        if self.stopper is None:
            return contextlib.nullcontext()
        return self.stopper.abortable(allowed=not self.world.is_distributed)

    # ---- bookkeeping

    def log(self, msg: str) -> None:
        """A log line (above the live progress line when there is one)."""
        if self.progress is not None:
            self.progress.write(self._log, msg)
        else:
            self._log(msg)

    def write_row(self, row: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(row) + "\n")
        self.tracker.log(row, row["step"])

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.tracker.close()
        if self.progress is not None:
            self.progress.close()

    def _agreed_elapsed(self) -> float:
        """Seconds since the start; under a time budget, the slowest rank's, so every rank sees the same clock."""
        elapsed = time.perf_counter() - self.t_start
        if self.cfg.train.time_budget is not None and self.world.is_distributed:
            elapsed = dist.max_over_ranks([elapsed], self.device)[0]
        return elapsed

    def lr(self) -> float:
        t = self.cfg.train
        if t.time_budget is None:
            return lr_at(self.state.step, self.cfg.optim, t.max_iters)
        return lr_at_progress(self.state.step, self.elapsed / t.time_budget, self.cfg.optim)

    # ---- the named steps

    def train_step(self) -> dict:
        """One optimizer step over `accum` micro-batches; returns (and records) its metrics row."""
        mode, accum = self.cfg.train.dist, self.accum
        lr = self.lr()
        set_lr(self.optimizer, lr)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            dist.set_grad_sync(self.model, mode, micro == accum - 1)
            x, y = self.batches.next(micro, self.device)
            with autocast(self.device, self.dtype):
                loss = self.task.loss(self.model, x, y) / accum
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        grad_norm = apply_gradients(self.model, self.optimizer, self.scaler, self.cfg.optim.grad_clip)
        self.state.step += 1
        if self.world.is_distributed:
            loss_sum = dist.all_reduce_sum(loss_sum) / self.world.world_size  # the mean over every rank's data
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.last_train_loss, norm = loss_sum.item(), grad_norm.item()
        self._check_finite(self.last_train_loss, norm)
        now = time.perf_counter()
        dt, self.t_last = now - self.t_last, now
        row = {"step": self.state.step, "loss": self.last_train_loss, "lr": lr, "grad_norm": norm,
               "dt_ms": round(dt * 1000, 3), "tokens_per_s": round(self.tokens_per_step / dt, 1),
               "mfu": self._mfu(dt), "time_s": round(now - self.t_start, 3)}
        self.write_row(row)
        self._step_times.append(dt)
        if self.progress is not None:
            self.progress.update(row)
        return row

    def _mfu(self, dt: float) -> Optional[float]:
        """Model FLOPs utilisation against the peak; never above 1. A CPU's peak is a matmul timed at start-up: if
        the machine was busy then, a step can seem faster than the peak, so the peak is measured again (once);
        a figure still above 1 is not a measurement and is left out (None)."""
        if not self.peak:
            return None
        mfu = self.flops_per_step / dt / self.peak
        if mfu > 1.0 and not self._mfu_remeasured and self.device.type == "cpu":
            from gptforge.device import measure_peak_flops

            self._mfu_remeasured = True
            old, self.peak = self.peak, max(self.peak, measure_peak_flops(self.device, self.dtype))
            self.log(f"note: a step beat the matmul peak measured at start-up ({old / 1e9:.0f} GFLOP/s; the machine "
                     f"was busy then?); MFU is now against {self.peak / 1e9:.0f} GFLOP/s measured again")
            self.t_last = time.perf_counter()
            mfu = self.flops_per_step / dt / self.peak
        return round(mfu, 5) if mfu <= 1.0 else None

    def _check_finite(self, loss: float, grad_norm: float) -> None:
        """A non-finite loss (or, outside fp16's loss scaling, gradient norm) means the weights are now garbage:
        stop before anything is saved, so latest/ keeps the last good step."""
        bad_norm = not math.isfinite(grad_norm) and self.dtype != torch.float16
        if math.isfinite(loss) and not bad_norm:
            return
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
        kept = (f"; {self.run_dir / 'latest'} keeps step {self.state.last_eval_step}"
                if self.run_dir is not None and self.state.last_eval_step else "; no checkpoint was written")
        raise UserError(f"training diverged at step {self.state.step}: the {what}; stopped without saving{kept}. "
                        "Lower --optim.lr, raise --optim.warmup_iters, or check --model.norm_eps and the data")

    def evaluate(self) -> tuple[float, float]:
        """Train and val loss on the fixed eval batches; then (after step 0) latest/, and best/ on a new best."""
        st, kw = self.state, dict(batches=self.cfg.train.eval_iters, device=self.device, dtype=self.dtype,
                                  rank=self.world.rank, world_size=self.world.world_size,
                                  progress=self.progress is not None)
        t0 = time.perf_counter()
        if self._eval_s is None and self.verbosity >= 1:
            self.log(f"eval step {st.step}: measuring train and val loss over {self.cfg.train.eval_iters} batches each ...")
        with self.abortable():
            tr, va = self.task.eval_loss(self.eval_model, "train", **kw), self.task.eval_loss(self.eval_model, "val", **kw)
        if not (math.isfinite(tr) and math.isfinite(va)):
            raise UserError(f"training diverged by step {st.step}: the eval loss is train {tr}, val {va}; "
                            "stopped without saving. Lower --optim.lr or raise --optim.warmup_iters")
        st.last_eval_step, st.val_loss = st.step, va
        improved = st.best_val_loss is None or va < st.best_val_loss
        if improved:
            st.best_val_loss = va
        self.write_row({"step": st.step, "train_loss": tr, "val_loss": va,
                        "time_s": round(time.perf_counter() - self.t_start, 3), "tokens": st.step * self.tokens_per_step})
        self.log(f"eval step {st.step}: train loss {tr:.4f} | val loss {va:.4f}{' (best)' if improved else ''}")
        if st.step > 0:
            self.save()
            if improved and self.world.is_main and self._saving():
                ckpt_io.link_checkpoint(self.run_dir / "latest", self.run_dir / "best", {"val_loss": va, "step": st.step})
        self.t_last = time.perf_counter()  # evaluation time is not step time
        if self._eval_s is None:
            self._eval_s = self.t_last - t0
        return tr, va

    def _saving(self) -> bool:
        return self.cfg.train.save_checkpoints and self.run_dir is not None

    def save(self) -> None:
        """Write latest/ (every rank takes part: gathering FSDP shards and data positions are collectives)."""
        if not self._saving():
            return
        mode = self.cfg.train.dist
        weights = dist.full_model_state(self.raw, mode)
        optimizer_sd = dist.full_optimizer_state(self.raw, self.optimizer, mode)
        slots = [s for rank_slots in dist.all_gather_objects(self.batches.local_states()) for s in rank_slots]
        rng = dist.all_gather_objects({k: v.cpu() for k, v in ckpt_io.process_rng().items()})
        if self.world.is_main:
            self.state.elapsed_s = time.perf_counter() - self.t_start
            state = {**self.state.state_dict(), "tokens_seen": self.state.step * self.tokens_per_step,
                     "world_size": self.world.world_size,
                     "data": {"sampling": self.cfg.train.sampling, "slots": slots}}
            ckpt_io.write_checkpoint(self.run_dir / "latest", weights, self.cfg, self.tokenizer, state, optimizer_sd, rng)
        dist.barrier()

    def hellaswag(self) -> dict:
        from gptforge.hellaswag import hellaswag_during_training

        t0, st = time.perf_counter(), self.state
        with self.abortable():
            hs = hellaswag_during_training(self.eval_model, self.tokenizer, self.hs_examples, self.device, self.dtype,
                                           self.cfg.eval.hellaswag_batch_size, rank=self.world.rank,
                                           world_size=self.world.world_size)
        st.last_hellaswag_step = st.step
        self.write_row({"step": st.step, "hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"],
                        "hellaswag_n": hs["n"], "time_s": round(time.perf_counter() - self.t_start, 3)})
        self.log(f"hellaswag step {st.step}: acc {hs['acc']:.4f} | acc_norm {hs['acc_norm']:.4f} | {hs['n']} examples "
                 f"| {time.perf_counter() - t0:.1f} s")
        self.t_last = time.perf_counter()
        return hs

    def full_val(self) -> float:
        t0 = time.perf_counter()
        with self.abortable():
            result = self.task.full_val(self.eval_model, device=self.device, dtype=self.dtype,
                                        progress=self.progress is not None)
        self.write_row({"step": self.state.step, "val_loss_full": result.loss, "val_tokens": result.tokens,
                        "time_s": round(time.perf_counter() - self.t_start, 3)})
        self.log(f"whole val split at step {self.state.step}: loss {result.loss:.4f} over {result.tokens} tokens "
                 f"({time.perf_counter() - t0:.1f} s)")
        return result.loss

    # ---- decisions

    def finished(self) -> bool:
        t = self.cfg.train
        return self.state.step >= t.max_iters or (t.time_budget is not None and self.elapsed >= t.time_budget)

    def eval_due(self) -> bool:
        step, t = self.state.step, self.cfg.train
        return step % t.eval_interval == 0 and step != self.state.last_eval_step and (step > 0 or t.eval_at_start)

    def hellaswag_due(self) -> bool:
        every, st = self.cfg.eval.hellaswag_every, self.state
        return self.hs_examples is not None and st.step % every == 0 and st.step != st.last_hellaswag_step

    def should_stop(self, row: dict, stopper: StopOnSignal, first_step: int) -> bool:
        """A signal, `on_step` returning true, or train.stop_after: every rank agrees, at the same step."""
        if self.on_step is not None and self.on_step(self.state.step, row):
            stopper.signal_name = stopper.signal_name or "STOP"
        stop_after = self.cfg.train.stop_after
        if stop_after is not None and self.state.step - first_step >= stop_after and not self.finished():
            stopper.signal_name = stopper.signal_name or "STOP"  # (a stop at the last step is just the end)
        stop = stopper.signal_name is not None
        self.elapsed = time.perf_counter() - self.t_start
        if self.world.is_distributed:  # all ranks must leave the loop at the same step, with the same lr
            stop_flag, self.elapsed = dist.max_over_ranks([float(stop), self.elapsed], self.device)
            stop = stop_flag > 0
        return stop

    def log_step(self, row: dict) -> None:
        t, step = self.cfg.train, row["step"]
        if len(self._step_times) == ESTIMATE_AFTER and self.verbosity >= 1:
            self.log(self.time_estimate())
        if self.verbosity < 1 or (self.verbosity < 2 and step % t.log_interval and step != t.max_iters):
            return
        mfu = f" | mfu {row['mfu'] * 100:.1f}%" if row["mfu"] is not None else ""
        where = f"{step}/{t.max_iters}" if t.time_budget is None else f"{step} ({row['time_s']:.0f}/{t.time_budget:g} s)"
        self.log(f"step {where} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | norm {row['grad_norm']:.3f} | "
                 f"{row['dt_ms']:.1f} ms | {row['tokens_per_s'] / 1000:.1f}k tok/s{mfu}")

    def time_estimate(self) -> str:
        """After the first few steps: the measured time per step, the whole run's estimate, and a hint when that
        is hours on a CPU."""
        t, st = self.cfg.train, self.state
        per_step = sorted(self._step_times[1:])[len(self._step_times[1:]) // 2]  # median, the first step is warm-up
        if t.time_budget is not None:
            steps = int(max(0.0, t.time_budget - self.elapsed) / per_step) + st.step
            return (f"time: {per_step:.3g} s/step measured over steps {st.step - ESTIMATE_AFTER + 2}-{st.step}, "
                    f"so about {steps:,} steps in the {t.time_budget:g} s budget")
        left = max(0, t.max_iters - st.step)
        evals = left // t.eval_interval + 1
        total = left * per_step + evals * (self._eval_s or 0.0)
        line = (f"time: {per_step:.3g} s/step measured over steps {st.step - ESTIMATE_AFTER + 2}-{st.step}; the "
                f"{left:,} steps left{f' and {evals} evaluations' if self._eval_s else ''} take about "
                f"{duration(total)} on this machine ({self.device.type})")
        if total > LONG_RUN_S and self.device.type != "cuda":
            line += ("; this recipe is meant for a GPU: on a CPU try --preset speedrun-cpu or "
                     "--preset shakespeare-char-cpu, or fewer --train.max_iters")
        return line

    # ---- the loop

    def fit(self) -> TrainResult:
        st, first_step, interrupted, val_full = self.state, self.state.step, None, None
        try:
            with StopOnSignal(self.log) as stopper:
                self.stopper, self.t_last = stopper, time.perf_counter()
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
            self.close()
        return TrainResult(run_dir=self.run_dir, step=st.step, train_loss=self.last_train_loss, val_loss=st.val_loss,
                           best_val_loss=st.best_val_loss, elapsed_s=time.perf_counter() - self.t_start,
                           interrupted=interrupted, val_loss_full=val_full)

    def _steps(self, stopper: StopOnSignal, first_step: int) -> Optional[str]:
        """Train until finished; what stopped the run early (a signal's name, or STOP), or None."""
        while not self.finished():
            if self.hellaswag_due():
                self.hellaswag()
            if self.eval_due():
                self.evaluate()
            row = self.train_step()
            self.log_step(row)
            if self.should_stop(row, stopper, first_step):
                return stopper.signal_name or "STOP"
        return None

    def _final_evaluations(self) -> Optional[float]:
        st = self.state
        if self.hs_examples is not None and st.step != st.last_hellaswag_step:
            self.hellaswag()  # the final figure, whatever hellaswag_every
        if st.step != st.last_eval_step:
            self.evaluate()
        return self.full_val() if self.cfg.train.full_val_at_end else None

    def _save_on_stop(self) -> None:
        if self.state.step == 0:  # stopped during the first evaluation: nothing trained, nothing to keep
            self.log("stopped before the first step; nothing was saved: run the same command again to start")
            return
        self.save()
        if self._saving():
            self.log(f"stopped at step {self.state.step}; checkpoint in {self.run_dir / 'latest'}; "
                     f"continue with `gptforge train --resume {self.run_dir}`")
        else:
            self.log(f"stopped at step {self.state.step}; train.save_checkpoints is off, so nothing was saved")
