"""`train(cfg, run_dir)`: the whole of `gptforge train`, as set-up steps and then the loop.

    open_run_dir -> open_data_dir -> load_init -> set_vocab -> make_task -> build_model -> wrap + optimizer
    -> restore -> RunDir.start -> Trainer(parts, compute, RunLog, Validator, Checkpointer).fit

The config a caller passes is never changed: the set-up steps return the resolved one, which the run directory,
the checkpoints and the Trainer get.
"""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Optional

from gptforge import dist, lora
from gptforge.config import RunConfig
from gptforge.device import busy_note, peak_flops, pick_dtype, setup_backends
from gptforge.hellaswag import load_for_training
from gptforge.loggers import make_logger
from gptforge.optim import build_optimizer, describe_schedule, eager_optimizers
from gptforge.progress import StepProgress, is_terminal
from gptforge.train.checkpointer import Checkpointer
from gptforge.train.loop import Compute, ModelParts, Trainer
from gptforge.train.metrics import RunLog
from gptforge.train.setup import (RunDir, build_model, check_inputs_apart, check_memory_fits, check_resumable,
                                  grad_accum_steps, load_init, make_task, open_data_dir, open_run_dir, restore,
                                  set_vocab, trim_metrics)
from gptforge.train.state import TrainResult
from gptforge.train.validate import Validator


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          log: Callable[[str], None] = print,
          on_step: Optional[Callable[[int, dict], Any]] = None, verbosity: int = 1,
          progress: bool = False) -> TrainResult:
    """Train (or, with resume=True, continue training) the model described by `cfg` into `run_dir`.

    Under torchrun every process calls this; rank 0 logs and writes. `on_step(step, metrics_row)` is
    called after every optimizer step; a truthy return value stops the run as a signal would (a
    checkpoint is written), which is how tests interrupt a run at an exact step. `verbosity` 0 logs only
    notes and the end, 1 a start-up summary, the time estimate and a line every train.log_interval steps,
    2 also the whole config and every step. `progress` draws a live line on a terminal (stderr) and shows the
    progress of evaluations there (off a terminal, a line every 30 s: gptforge.progress). `cfg` itself
    is left as it is; config.json and the checkpoints hold the resolved config (vocabulary, --init-from's shape).
    """
    run_dir = Path(run_dir)
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))  # before anything is started: bad values fail fast
    world, device = dist.init(cfg.train.device)
    try:
        with ExitStack() as stack:
            stack.enter_context(eager_optimizers())
            check_inputs_apart(run_dir, cfg)
            rd = open_run_dir(run_dir, resume=resume, overwrite=overwrite, world=world, stack=stack)
            trainer = build_trainer(cfg, rd, world, device, log if world.is_main else _silent, on_step,
                                    verbosity=verbosity, progress=progress and world.is_main)
            result = trainer.fit()
        # Every rank is out of every collective before the group is torn down: without this, gloo under
        # FSDP sometimes aborted a rank at exit ("terminate called without an active exception"). Not on
        # an error path, where the other ranks may never arrive.
        dist.barrier()
        return result
    finally:
        dist.cleanup()


def _silent(msg: str) -> None:
    pass


def build_trainer(cfg: RunConfig, rd: RunDir, world: dist.DistInfo, device, log: Callable[[str], None],
                  on_step, *, verbosity: int = 1, progress: bool = False) -> Trainer:
    """Every set-up step, in order; the run directory is touched only at the end, by `rd.start`."""
    data = open_data_dir(cfg)
    tokenizer = data.tokenizer()
    init, is_lora = None, cfg.train.finetune == "lora"
    if cfg.train.init_from and (rd.resume_from is None or is_lora):  # a LoRA run resumes on its base
        init = load_init(cfg, tokenizer, rd.resume_from)
        cfg = dataclasses.replace(cfg, model=init.model.config)
    cfg = set_vocab(cfg, data.vocab_size)
    dtype = pick_dtype(cfg.train.dtype, device)
    check_memory_fits(cfg, device, dtype, world.world_size)  # before a window or a weight is allocated
    task = make_task(cfg, data, tokenizer, world)  # after load_init: windows of the pretrained model's block size
    if rd.resume_from is not None:
        check_resumable(cfg, rd.resume_from, tokenizer)
    accum = grad_accum_steps(cfg, world.world_size)
    setup_backends(device)
    raw = build_model(cfg, init, rd.resume_from, device, world, dtype)
    mode = cfg.train.dist
    model = dist.wrap(raw, mode, world, device, dtype)
    optimizer = build_optimizer(model, cfg.optim, device)  # after wrapping: FSDP replaces the parameters
    batches, state = task.batches(cfg.train.seed, world.rank, world.world_size, accum), None
    if rd.resume_from is not None:
        state, batches = restore(rd.resume_from, raw=raw, optimizer=optimizer, batches=batches, cfg=cfg, world=world,
                                 task=task, accum=accum, log=log)
        if world.is_main:
            trim_metrics(rd.path / "metrics.jsonl", state.step)
    hs_examples = None
    if cfg.eval.hellaswag_every:
        hs_examples = load_for_training(tokenizer, cfg.eval.hellaswag_file, cfg.eval.hellaswag_limit)
    # Only rank 0 reports to a tracker; a missing package or a failed `wandb login` fails here, before the
    # previous run (with --overwrite) is gone: RunDir.start puts it back.
    tracker = rd.start(cfg, lambda: make_logger(cfg.train.logger if world.is_main else "none", rd.path, cfg.to_dict(),
                                                project=cfg.train.wandb_project, run_name=cfg.train.run_name))
    run_log = RunLog(cfg.train, say=log, verbosity=verbosity, tracker=tracker, show_progress=progress,
                     metrics_path=rd.path / "metrics.jsonl" if world.is_main else None)
    eval_model = dist.eval_module(model, raw, mode)
    validator = Validator(task, eval_model, device, dtype, world, eval_iters=cfg.train.eval_iters, tokenizer=tokenizer,
                          hellaswag_examples=hs_examples, hellaswag_batch_size=cfg.eval.hellaswag_batch_size)
    trainer = Trainer(cfg, ModelParts(model, optimizer, raw=raw), task,
                      Compute(device, dtype, world, accum, peak_flops=peak_flops(device, dtype)),
                      state=state, batches=batches, log=run_log, validator=validator,
                      checkpointer=Checkpointer(rd.path, cfg, tokenizer, world, base=init.base if is_lora else None),
                      on_step=on_step)
    _log_start(trainer, rd, tokenizer)
    if progress and is_terminal():  # after the summary, so the live line stays below it
        run_log.progress = StepProgress(max_iters=cfg.train.max_iters, time_budget=cfg.train.time_budget,
                                        initial_step=trainer.state.step, initial_elapsed=trainer.state.elapsed_s)
    return trainer


def _log_start(trainer: Trainer, rd: RunDir, tokenizer) -> None:
    """A few lines a person reads at start-up (the whole config is in RUN_DIR/config.json; -v prints it)."""
    cfg, c, say, t, m = trainer.cfg, trainer.compute, trainer.log.say, trainer.cfg.train, trainer.cfg.model
    schedule, warning = describe_schedule(cfg.optim, t.max_iters, t.time_budget)
    if warning:
        say(f"note: {warning}")
    if trainer.log.verbosity >= 1 and (busy := busy_note(c.device)):  # the load average only: free to read
        say(f"note: {busy}")
    if trainer.log.verbosity < 1:
        return
    if trainer.log.verbosity >= 2:
        say(json.dumps(cfg.to_dict(), indent=2))
    parallel = f" ({t.dist})" if c.world.is_distributed else ""
    splits = ", ".join(f"{s} {len(trainer.task.splits[s]):,}" for s in ("train", "val"))
    length = f"{t.max_iters:,} step{'s' * (t.max_iters != 1)}" if t.time_budget is None else f"{t.time_budget:g} s (at most {t.max_iters:,} steps)"
    peak = (f" | mfu against {c.peak_flops / 1e9:,.0f} GFLOP/s ({'a matmul measured here' if c.device.type == 'cpu' else 'the data sheet'})"
            if c.peak_flops else "")
    lines = [
        f"run: {rd.path} (config in {rd.path / 'config.json'})" + (f", resuming from {rd.resume_from} at step {trainer.state.step}" if rd.resume_from else ""),
        f"model: {trainer.raw.num_params() / 1e6:.2f}M parameters | {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, "
        f"block {m.block_size} | {m.pos}/{m.norm}/{m.mlp} | vocab {m.vocab_size:,}",
        f"data: {cfg.data.dir} | {tokenizer.kind} tokenizer | tokens {splits}",
        f"batch: {trainer.tokens_per_step:,} tokens/step = {t.batch_size} seqs x {m.block_size} tokens x {c.accum} accum "
        f"x {c.world.world_size} procs{parallel} | device {c.device} | {str(c.dtype).split('.')[-1]}{peak}",
        f"schedule: {length} | {schedule}",
    ]
    if t.finetune == "lora":
        lines.insert(2, lora.describe(cfg.lora, trainer.raw))
    for line in lines:
        say(line)
