"""The training loop: accumulation, autocast, clipping, evaluation, logging, checkpoints and exact resume.

`train(config, run_dir)` is the whole of `gptforge train`. A run directory holds config.json (the resolved
config), metrics.jsonl (one JSON object per step and per evaluation), latest/ (resumable) and best/
(the weights with the lowest val loss so far). Stopping (Ctrl-C, SIGTERM) finishes the current step,
writes latest/ and returns; `train(..., resume=True)` continues from it and, on CPU, ends with weights
bit-identical to those of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from gptforge import checkpoint as ckpt_io
from gptforge import dist
from gptforge.config import ConfigError, RunConfig, save_json
from gptforge.data.loader import RandomBatches, open_data
from gptforge.device import autocast, peak_flops, pick_device, pick_dtype, seed_everything, setup_backends
from gptforge.errors import UserError
from gptforge.evaluate import estimate_loss
from gptforge.model import GPT
from gptforge.optim import build_optimizer, lr_at, validate_schedule
from gptforge.tokenizer import load_tokenizer

RUN_FILES = ("config.json", "metrics.jsonl", "latest", "best", ".latest.old", ".latest.tmp", ".best.old", ".best.tmp")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: Optional[float]
    val_loss: Optional[float]
    best_val_loss: Optional[float]
    elapsed_s: float
    interrupted: Optional[str] = None  # the signal's name when stopped early

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "step": self.step, "train_loss": self.train_loss,
                "val_loss": self.val_loss, "best_val_loss": self.best_val_loss,
                "elapsed_s": round(self.elapsed_s, 3), "interrupted": self.interrupted}


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round the vocabulary up so the output matmul has friendly shapes (50257 -> 50304)."""
    return multiple * math.ceil(n / multiple)


def grad_accum_steps(cfg: RunConfig, world_size: int) -> int:
    per_micro = cfg.train.batch_size * cfg.model.block_size * world_size
    total = cfg.train.total_batch_size
    if total is None:
        return 1
    if total < per_micro or total % per_micro:
        raise ConfigError(
            f"train.total_batch_size ({total} tokens) must be a multiple of batch_size x block_size x processes "
            f"= {cfg.train.batch_size} x {cfg.model.block_size} x {world_size} = {per_micro}")
    return total // per_micro


def validate(cfg: RunConfig) -> None:
    t = cfg.train
    for name in ("batch_size", "eval_interval", "eval_iters", "log_interval"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1, got {getattr(t, name)}")
    if t.max_iters < 0:
        raise ConfigError(f"train.max_iters must be >= 0, got {t.max_iters}")
    validate_schedule(cfg.optim, t.max_iters)


def _clear_run_dir(run_dir: Path) -> None:
    """Remove only what a previous run wrote; anything else the user keeps there stays."""
    for name in RUN_FILES:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


class _StopOnSignal:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step; a second one aborts."""

    def __init__(self, log: Callable[[str], None]):
        self.signal_name: Optional[str] = None
        self._log, self._old = log, {}

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self._log(f"{self.signal_name}: finishing this step and saving a checkpoint (again to abort without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _trim_metrics(path: Path, after_step: int) -> None:
    """On resume, drop rows logged after the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= after_step:
                keep.append(line)
        except ValueError:
            continue  # a line cut short by a kill
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          log: Callable[[str], None] = print,
          on_step: Optional[Callable[[int, dict], Any]] = None) -> TrainResult:
    """Train (or, with resume=True, continue training) the model described by `cfg` into `run_dir`.

    `on_step(step, metrics_row)` is called after every optimizer step; a truthy return value stops the run
    as a signal would (a checkpoint is written), which is how tests interrupt a run at an exact step.
    """
    run_dir = Path(run_dir)
    validate(cfg)
    world = dist.init()
    if not world.is_main:
        log = lambda msg: None  # noqa: E731  only rank 0 speaks

    # ---- run directory: never destroy an existing run unless asked to
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory")
    resume_from = None
    if resume:
        resume_from = ckpt_io.resolve_checkpoint(run_dir, "latest")
    else:
        existing = [n for n in RUN_FILES if (run_dir / n).exists()]
        if existing and not overwrite:
            raise UserError(f"{run_dir} already holds a run ({', '.join(existing)}); continue it with "
                            f"`gptforge train --resume {run_dir}` or start afresh with --overwrite")
        if world.is_main:
            _clear_run_dir(run_dir)

    # ---- data and tokenizer
    if not cfg.data.dir:
        raise UserError("no data: pass --data DATA_DIR (a directory written by `gptforge prepare`)")
    data = open_data(cfg.data.dir)
    tokenizer = data.tokenizer()
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = pad_vocab(data.vocab_size)
    elif cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the data's vocabulary "
                          f"({data.vocab_size} tokens)")
    train_tokens, val_tokens = data.tokens("train"), data.tokens("val")
    accum = grad_accum_steps(cfg, world.world_size)
    B, T = cfg.train.batch_size, cfg.model.block_size
    tokens_per_step = B * T * accum * world.world_size

    # ---- device, model, optimizer
    device = pick_device(cfg.train.device)
    dtype = pick_dtype(cfg.train.dtype, device)
    setup_backends(device)
    seed_everything(cfg.train.seed)
    model = GPT(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.optim, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    sampler = RandomBatches(train_tokens, B, T, seed=cfg.train.seed, rank=world.rank)
    RandomBatches(val_tokens, B, T, seed=0)  # fail early, with a clear message, if val is too short

    step, best_val, elapsed0, last_eval_step = 0, None, 0.0, None
    if resume_from is not None:
        old_cfg = ckpt_io.read_config(resume_from)
        if old_cfg.model != cfg.model:
            raise UserError(f"the model config differs from the checkpoint's in {resume_from}; "
                            "model fields cannot change on resume")
        if load_tokenizer(resume_from).fingerprint() != tokenizer.fingerprint():
            raise UserError(f"the data in {cfg.data.dir} uses a different tokenizer than the checkpoint in {resume_from}")
        ckpt_io.load_weights(model, resume_from)
        st = ckpt_io.load_train_state(resume_from, optimizer)
        sampler.load_state_dict(st["data"])
        step, best_val, elapsed0 = st["step"], st.get("best_val_loss"), st.get("elapsed_s", 0.0)
        last_eval_step = st.get("last_eval_step")
        _trim_metrics(run_dir / "metrics.jsonl", step)
    train_model = torch.compile(model) if cfg.train.compile else model

    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        save_json(cfg.to_dict(), run_dir / "config.json")
    log(json.dumps(cfg.to_dict(), indent=2))
    log(f"model: {model.num_params() / 1e6:.2f}M parameters | device {device} | dtype {str(dtype).split('.')[-1]} | "
        f"{tokens_per_step} tokens/step = {B} seqs x {T} tokens x {accum} accum x {world.world_size} procs")
    if resume_from is not None:
        log(f"resuming from {resume_from} at step {step}")
    flops_per_step = model.flops_per_token() * B * T * accum
    peak = peak_flops(device, dtype)

    metrics = open(run_dir / "metrics.jsonl", "a", buffering=1) if world.is_main else None
    t_start = time.perf_counter() - elapsed0
    last_train_loss, last_val = None, None

    def write_row(row: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")

    def state(elapsed: float) -> dict[str, Any]:
        return {"step": step, "best_val_loss": best_val, "val_loss": last_val, "elapsed_s": elapsed,
                "last_eval_step": last_eval_step, "tokens_seen": step * tokens_per_step,
                "data": sampler.state_dict()}

    def save_latest() -> None:
        if world.is_main and cfg.train.save_checkpoints:
            ckpt_io.save_checkpoint(run_dir / "latest", model, cfg, tokenizer,
                                    state(time.perf_counter() - t_start), optimizer)

    def run_eval() -> None:
        nonlocal best_val, last_eval_step, last_val
        kw = dict(batches=cfg.train.eval_iters, batch_size=B, block_size=T, device=device, dtype=dtype)
        tr, va = estimate_loss(model, train_tokens, **kw), estimate_loss(model, val_tokens, **kw)
        last_eval_step, last_val = step, va
        improved = best_val is None or va < best_val
        if improved:
            best_val = va
        elapsed = time.perf_counter() - t_start
        write_row({"step": step, "train_loss": tr, "val_loss": va, "time_s": round(elapsed, 3),
                   "tokens": step * tokens_per_step})
        log(f"eval step {step}: train loss {tr:.4f} | val loss {va:.4f}{' (best)' if improved else ''}")
        if step > 0:
            save_latest()
            if improved and world.is_main and cfg.train.save_checkpoints:
                ckpt_io.link_checkpoint(run_dir / "latest", run_dir / "best", {"val_loss": va, "step": step})

    interrupted = None
    try:
        with _StopOnSignal(log) as stopper:
            t_last = time.perf_counter()
            while step < cfg.train.max_iters:
                if step % cfg.train.eval_interval == 0 and step != last_eval_step:
                    run_eval()
                    t_last = time.perf_counter()  # evaluation time is not step time
                lr = lr_at(step, cfg.optim, cfg.train.max_iters)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=device)
                for _ in range(accum):
                    x, y = sampler.next(device)
                    with autocast(device, dtype):
                        loss = train_model(x, y) / accum
                    scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                scaler.unscale_(optimizer)
                clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                last_train_loss = loss_sum.item()
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                row = {"step": step, "loss": last_train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                       "dt_ms": round(dt * 1000, 3), "tokens_per_s": round(tokens_per_step / dt, 1),
                       "mfu": round(flops_per_step / dt / peak, 5) if peak else None,
                       "time_s": round(now - t_start, 3)}
                write_row(row)
                if step % cfg.train.log_interval == 0 or step == cfg.train.max_iters:
                    mfu = f" | mfu {row['mfu'] * 100:.1f}%" if row["mfu"] is not None else ""
                    log(f"step {step}/{cfg.train.max_iters} | loss {last_train_loss:.4f} | lr {lr:.2e} | "
                        f"norm {row['grad_norm']:.3f} | {row['dt_ms']:.1f} ms | "
                        f"{row['tokens_per_s'] / 1000:.1f}k tok/s{mfu}")
                if on_step is not None and on_step(step, row):
                    stopper.signal_name = stopper.signal_name or "STOP"
                if stopper.signal_name is not None:
                    interrupted = stopper.signal_name
                    break
            if interrupted is None and step != last_eval_step:
                run_eval()
            elif interrupted is not None:
                save_latest()
                if cfg.train.save_checkpoints:
                    log(f"stopped at step {step}; checkpoint in {run_dir / 'latest'}; "
                        f"continue with `gptforge train --resume {run_dir}`")
                else:
                    log(f"stopped at step {step}; train.save_checkpoints is off, so nothing was saved")
    finally:
        if metrics is not None:
            metrics.close()
    return TrainResult(run_dir=run_dir, step=step, train_loss=last_train_loss, val_loss=last_val,
                       best_val_loss=best_val, elapsed_s=time.perf_counter() - t_start, interrupted=interrupted)
