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
from gptforge.data.loader import RandomBatches, SlotLoader, open_data
from gptforge.device import autocast, peak_flops, pick_dtype, seed_everything, setup_backends
from gptforge.errors import UserError
from gptforge.evaluate import estimate_loss, evaluate_tokens
from gptforge.model import GPT
from gptforge.optim import build_optimizer, lr_at, lr_at_progress, set_lr, validate_schedule
from gptforge.tokenizer import load_tokenizer

RUN_FILES = ("config.json", "metrics.jsonl", "tensorboard", "latest", "best", ".latest.old", ".latest.tmp",
             ".best.old", ".best.tmp")


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


def validate(cfg: RunConfig) -> None:
    t = cfg.train
    for name in ("batch_size", "eval_interval", "eval_iters", "log_interval"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1, got {getattr(t, name)}")
    if t.max_iters < 0:
        raise ConfigError(f"train.max_iters must be >= 0, got {t.max_iters}")
    if cfg.eval.hellaswag_every < 0:
        raise ConfigError(f"eval.hellaswag_every must be >= 0 (0 = never), got {cfg.eval.hellaswag_every}")
    if cfg.eval.hellaswag_batch_size < 1:
        raise ConfigError(f"eval.hellaswag_batch_size must be at least 1, got {cfg.eval.hellaswag_batch_size}")
    if t.time_budget is not None and not t.time_budget > 0:
        raise ConfigError(f"train.time_budget must be a positive number of seconds, got {t.time_budget}")
    if t.stop_after is not None and t.stop_after < 1:
        raise ConfigError(f"train.stop_after must be at least 1, got {t.stop_after}")
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

    Under torchrun every process calls this; rank 0 logs and writes. `on_step(step, metrics_row)` is
    called after every optimizer step; a truthy return value stops the run as a signal would (a
    checkpoint is written), which is how tests interrupt a run at an exact step.
    """
    run_dir = Path(run_dir)
    validate(cfg)
    world, device = dist.init(cfg.train.device)
    try:
        result = _train(cfg, run_dir, world, device, resume, overwrite, log if world.is_main else _silent, on_step)
        # Every rank is out of every collective before the group is torn down: without this, gloo under
        # FSDP sometimes aborted a rank at exit ("terminate called without an active exception"). Not on
        # an error path, where the other ranks may never arrive.
        dist.barrier()
        return result
    finally:
        dist.cleanup()


def _silent(msg: str) -> None:
    pass


def _load_init(cfg: RunConfig, tokenizer) -> torch.nn.Module:
    """The weights of --train.init_from: GPT-2 / a Hugging Face directory, or a gptforge run or checkpoint.
    Sets cfg.model to their shape, keeping this run's dropout and attention (and, for Hugging Face
    sources, a shorter block_size: learned positions are cropped)."""
    import dataclasses

    from gptforge.hf import is_hf_source, load_pretrained

    source = cfg.train.init_from
    if is_hf_source(source):
        model, model_cfg, init_tok = load_pretrained(source, "cpu", block_size=cfg.model.block_size,
                                                     dropout=cfg.model.dropout, attention=cfg.model.attention)
    else:  # a gptforge run or checkpoint: its shape, with this run's dropout and attention
        ckpt = ckpt_io.resolve_checkpoint(source)
        model_cfg = dataclasses.replace(ckpt_io.read_config(ckpt).model, dropout=cfg.model.dropout,
                                        attention=cfg.model.attention)
        model = GPT(model_cfg)
        ckpt_io.load_weights(model, ckpt)
        init_tok = load_tokenizer(ckpt)
    if init_tok.fingerprint() != tokenizer.fingerprint():
        raise UserError(f"--init-from {source} uses its own {init_tok.kind} tokenizer ({init_tok.vocab_size} tokens), "
                        f"not the one the data in {cfg.data.dir} was prepared with; prepare the data with the same "
                        "tokenizer (for GPT-2: gptforge prepare SOURCE --tokenizer gpt2)")
    cfg.model = model_cfg
    return model


def _train(cfg: RunConfig, run_dir: Path, world: dist.DistInfo, device: torch.device, resume: bool,
           overwrite: bool, log: Callable[[str], None], on_step) -> TrainResult:
    mode = cfg.train.dist
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
        dist.barrier()  # every rank has looked before rank 0 clears
        if world.is_main:
            _clear_run_dir(run_dir)

    # ---- data and tokenizer
    if not cfg.data.dir:
        raise UserError("no data: pass --data DATA_DIR (a directory written by `gptforge prepare`)")
    data = open_data(cfg.data.dir)
    tokenizer = data.tokenizer()
    pretrained = None
    if cfg.train.init_from and resume_from is None:
        pretrained = _load_init(cfg, tokenizer)  # replaces cfg.model with the pretrained model's shape
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = pad_vocab(data.vocab_size)
    elif cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the data's vocabulary "
                          f"({data.vocab_size} tokens)")
    train_tokens, val_tokens = data.tokens("train"), data.tokens("val")
    accum = grad_accum_steps(cfg, world.world_size)
    B, T = cfg.train.batch_size, cfg.model.block_size
    tokens_per_step = B * T * accum * world.world_size

    # ---- model, parallelism, optimizer
    dtype = pick_dtype(cfg.train.dtype, device)
    setup_backends(device)
    seed_everything(cfg.train.seed)  # the same initial weights on every rank
    raw = (pretrained if pretrained is not None else GPT(cfg.model)).to(device).train()
    if cfg.train.freeze_embeddings:
        for module in (raw.transformer.wte, getattr(raw.transformer, "wpe", None)):
            if module is not None:
                module.weight.requires_grad_(False)
    if world.is_distributed:
        torch.manual_seed(cfg.train.seed + world.rank)  # but different dropout draws
    step, best_val, elapsed0, last_eval_step, last_hs_step = 0, None, 0.0, None, None
    if resume_from is not None:
        old_cfg = ckpt_io.read_config(resume_from)
        if old_cfg.model != cfg.model:
            raise UserError(f"the model config differs from the checkpoint's in {resume_from}; "
                            "model fields cannot change on resume")
        if load_tokenizer(resume_from).fingerprint() != tokenizer.fingerprint():
            raise UserError(f"the data in {cfg.data.dir} uses a different tokenizer than the checkpoint in {resume_from}")
        ckpt_io.load_weights(raw, resume_from)  # before wrapping: FSDP then shards what was loaded
        st, optimizer_sd, saved_rng = ckpt_io.read_train_state(resume_from)
        step, best_val, elapsed0 = st["step"], st.get("best_val_loss"), st.get("elapsed_s", 0.0)
        last_eval_step = st.get("last_eval_step")
        last_hs_step = st.get("last_hellaswag_step")
    if cfg.train.compile:
        raw.compile_blocks()
    if cfg.optim.optimizer == "muon" and world.is_distributed and mode == "fsdp":
        raise ConfigError("optim.optimizer muon works with --train.dist ddp, not yet with fsdp "
                          "(it orthogonalises whole matrices, and FSDP holds shards of them)")
    model = dist.wrap(raw, mode, world, device, dtype)
    optimizer = build_optimizer(model, cfg.optim, device)  # after wrapping: FSDP replaces the parameters
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loader = SlotLoader(train_tokens, cfg.train.sampling, B, T, cfg.train.seed, world.rank, world.world_size, accum)
    RandomBatches(val_tokens, B, T, seed=0)  # fail early, with a clear message, if val is too short
    if resume_from is not None:
        try:
            dist.load_optimizer_state(raw, optimizer, mode, optimizer_sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"optimizer state in {resume_from} does not fit this model: {e}") from None
        if not loader.load_states(st["data"]["slots"]):
            # another number of micro-batch slots (processes x accumulation): fresh, deterministic streams
            log("note: the checkpoint has another number of micro-batches per step (processes x accumulation); "
                "the data streams restart, seeded by the step, so the run will not repeat an uninterrupted one")
            loader = SlotLoader(train_tokens, cfg.train.sampling, B, T, cfg.train.seed + step, world.rank,
                                world.world_size, accum)
        if len(saved_rng) == world.world_size:
            ckpt_io.restore_process_rng(saved_rng[world.rank])
        else:  # another number of processes: dropout draws restart, seeded by the step
            torch.manual_seed(cfg.train.seed + step + world.rank)
        if world.is_main:
            _trim_metrics(run_dir / "metrics.jsonl", step)
    eval_model = dist.eval_module(model, raw, mode)
    hs_examples = None
    if cfg.eval.hellaswag_every:
        from gptforge.hellaswag import load_for_training

        hs_examples = load_for_training(tokenizer, cfg.eval.hellaswag_file, cfg.eval.hellaswag_limit)
    # Only rank 0 reports to a tracker. Made before config.json and metrics.jsonl are written, so a missing
    # package or a failed `wandb login` leaves nothing that makes the next attempt refuse the run directory.
    from gptforge.loggers import make_logger

    tracker = make_logger(cfg.train.logger if world.is_main else "none", run_dir, cfg.to_dict(),
                          project=cfg.train.wandb_project, run_name=cfg.train.run_name)

    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        save_json(cfg.to_dict(), run_dir / "config.json")
    log(json.dumps(cfg.to_dict(), indent=2))
    parallel = f" ({mode})" if world.is_distributed else ""
    log(f"model: {raw.num_params() / 1e6:.2f}M parameters | device {device} | dtype {str(dtype).split('.')[-1]} | "
        f"{tokens_per_step} tokens/step = {B} seqs x {T} tokens x {accum} accum x {world.world_size} procs{parallel}")
    if resume_from is not None:
        log(f"resuming from {resume_from} at step {step}")
    flops_per_step = raw.flops_per_token() * B * T * accum  # per device
    peak = peak_flops(device, dtype)

    metrics = open(run_dir / "metrics.jsonl", "a", buffering=1) if world.is_main else None
    t_start = time.perf_counter() - elapsed0
    last_train_loss, last_val = None, None

    def write_row(row: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
        tracker.log(row, row["step"])

    def save_latest() -> None:
        if not cfg.train.save_checkpoints:
            return
        weights = dist.full_model_state(raw, mode)  # collective under FSDP: every rank takes part
        optimizer_sd = dist.full_optimizer_state(raw, optimizer, mode)
        slots = [s for rank_slots in dist.all_gather_objects(loader.local_states()) for s in rank_slots]
        rng = dist.all_gather_objects({k: v.cpu() for k, v in ckpt_io.process_rng().items()})
        if world.is_main:
            state = {"step": step, "best_val_loss": best_val, "val_loss": last_val,
                     "elapsed_s": time.perf_counter() - t_start, "last_eval_step": last_eval_step,
                     "last_hellaswag_step": last_hs_step,
                     "tokens_seen": step * tokens_per_step, "world_size": world.world_size,
                     "data": {"sampling": cfg.train.sampling, "slots": slots}}
            ckpt_io.write_checkpoint(run_dir / "latest", weights, cfg, tokenizer, state, optimizer_sd, rng)
        dist.barrier()

    def run_eval() -> None:
        nonlocal best_val, last_eval_step, last_val
        kw = dict(batches=cfg.train.eval_iters, batch_size=B, block_size=T, device=device, dtype=dtype,
                  rank=world.rank, world_size=world.world_size)
        tr, va = estimate_loss(eval_model, train_tokens, **kw), estimate_loss(eval_model, val_tokens, **kw)
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

    def run_full_val() -> float:
        t0 = time.perf_counter()
        # forward only: more windows per batch than training's micro-batch, up to 16k tokens, run faster
        batch = max(B, min(64, 16384 // T))
        result = evaluate_tokens(eval_model, val_tokens, block_size=T, batch_size=batch, device=device, dtype=dtype)
        write_row({"step": step, "val_loss_full": result.loss, "val_tokens": result.tokens,
                   "time_s": round(time.perf_counter() - t_start, 3)})
        log(f"whole val split at step {step}: loss {result.loss:.4f} over {result.tokens} tokens "
            f"({time.perf_counter() - t0:.1f} s)")
        return result.loss

    def run_hellaswag() -> None:
        nonlocal last_hs_step
        from gptforge.hellaswag import hellaswag_during_training

        t0 = time.perf_counter()
        hs = hellaswag_during_training(eval_model, tokenizer, hs_examples, device, dtype,
                                       cfg.eval.hellaswag_batch_size, rank=world.rank, world_size=world.world_size)
        last_hs_step = step
        write_row({"step": step, "hellaswag_acc": hs["acc"], "hellaswag_acc_norm": hs["acc_norm"],
                   "hellaswag_n": hs["n"], "time_s": round(time.perf_counter() - t_start, 3)})
        log(f"hellaswag step {step}: acc {hs['acc']:.4f} | acc_norm {hs['acc_norm']:.4f} | {hs['n']} examples "
            f"| {time.perf_counter() - t0:.1f} s")

    def hellaswag_due() -> bool:
        return hs_examples is not None and step % cfg.eval.hellaswag_every == 0 and step != last_hs_step

    interrupted, first_step, val_full = None, step, None
    try:
        with _StopOnSignal(log) as stopper:
            t_last = time.perf_counter()
            budget = cfg.train.time_budget
            elapsed = t_last - t_start  # agreed by every rank: the schedule and the stop follow the slowest clock
            if budget is not None and world.is_distributed:
                elapsed = dist.max_over_ranks([elapsed], device)[0]
            while step < cfg.train.max_iters and (budget is None or elapsed < budget):
                if hellaswag_due():
                    run_hellaswag()
                    t_last = time.perf_counter()  # evaluation time is not step time
                if step % cfg.train.eval_interval == 0 and step != last_eval_step:
                    run_eval()
                    t_last = time.perf_counter()  # evaluation time is not step time
                if budget is None:
                    lr = lr_at(step, cfg.optim, cfg.train.max_iters)
                else:
                    lr = lr_at_progress(step, elapsed / budget, cfg.optim)
                set_lr(optimizer, lr)
                loss_sum = torch.zeros((), device=device)
                for micro in range(accum):
                    dist.set_grad_sync(model, mode, micro == accum - 1)
                    x, y = loader.next(micro, device)
                    with autocast(device, dtype):
                        loss = model(x, y) / accum
                    scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                grad_norm = apply_gradients(model, optimizer, scaler, cfg.optim.grad_clip)
                step += 1

                if world.is_distributed:
                    loss_sum = dist.all_reduce_sum(loss_sum) / world.world_size  # the mean over every rank's data
                if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                    grad_norm = grad_norm.full_tensor()
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
                    where = f"{step}/{cfg.train.max_iters}" if budget is None else f"{step} ({row['time_s']:.0f}/{budget:g} s)"
                    log(f"step {where} | loss {last_train_loss:.4f} | lr {lr:.2e} | "
                        f"norm {row['grad_norm']:.3f} | {row['dt_ms']:.1f} ms | "
                        f"{row['tokens_per_s'] / 1000:.1f}k tok/s{mfu}")
                if on_step is not None and on_step(step, row):
                    stopper.signal_name = stopper.signal_name or "STOP"
                if cfg.train.stop_after is not None and step - first_step >= cfg.train.stop_after:
                    stopper.signal_name = stopper.signal_name or "STOP"
                stop = stopper.signal_name is not None
                elapsed = time.perf_counter() - t_start
                if world.is_distributed:  # all ranks must leave the loop at the same step, with the same lr
                    stop_flag, elapsed = dist.max_over_ranks([float(stop), elapsed], device)
                    stop = stop_flag > 0
                if stop:
                    interrupted = stopper.signal_name or "STOP"
                    break
            if interrupted is None and hs_examples is not None and step != last_hs_step:
                run_hellaswag()  # the final figure, whatever hellaswag_every
            if interrupted is None and step != last_eval_step:
                run_eval()
            if interrupted is None and cfg.train.full_val_at_end:
                val_full = run_full_val()
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
        tracker.close()
    return TrainResult(run_dir=run_dir, step=step, train_loss=last_train_loss, val_loss=last_val,
                       best_val_loss=best_val, elapsed_s=time.perf_counter() - t_start, interrupted=interrupted,
                       val_loss_full=val_full)
