"""Setting a run up, in the order it happens: the run directory, the data, the model, and the restore of a
checkpoint. Each is a function of its own, so each can be read and tested alone; `run.train` calls them in turn.

None of them changes the config it is given: `set_vocab` returns a new one, `load_init` the model config of
the weights it loads (the caller puts it in with `dataclasses.replace`).

Nothing already on disk is removed until every check has passed: a previous run that `--overwrite` (or a
restart of a run that never wrote a checkpoint) replaces is moved aside by `RunDir.start`, and deleted only
once the new run's config.json is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from gptforge import dist, lora
from gptforge.chat_template import add_chat_template
from gptforge.config import ConfigError, RunConfig, save_json
from gptforge.data.loader import open_data
from gptforge.device import check_memory, format_bytes, seed_everything
from gptforge.errors import UserError, one_line
from gptforge.files import atomic_write, check_apart, temp_sibling
from gptforge.model import GPT, grow_vocab
from gptforge.modelio import checkpoint as ckpt_io
from gptforge.tokenizer import load_tokenizer
from gptforge.train.state import TrainState
from gptforge.train.task import BatchSource, ChatTask, LMTask, Task
from gptforge.modelio import load

CHECKPOINTS = ("latest", "best", ".latest.old", ".best.old")
RUN_FILES = ("config.json", "metrics.jsonl", "tensorboard", *CHECKPOINTS)


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


# ---------------------------------------------------------------------------------------------
# The run directory


@dataclass
class RunDir:
    """A run directory this process holds the lock of (rank 0), and what a previous run left there."""

    path: Path
    resume_from: Optional[Path] = None
    """the checkpoint to continue from (--resume)"""
    replaces: list[str] = field(default_factory=list)
    """files of a previous run that this one replaces (--overwrite, or a run that never wrote a checkpoint)"""
    is_main: bool = True

    def start(self, cfg: RunConfig, open_tracker: Callable[[], Any]) -> Any:
        """The last moment: move the previous run aside, open the tracker, write config.json, then delete
        what was moved aside (or, if anything failed, put it back). Returns the tracker."""
        if not self.is_main:
            return open_tracker()
        aside = temp_sibling(self.path / "replaced", "") if self.replaces else None
        if aside is not None:
            aside.mkdir()
            for name in self.replaces:
                os.rename(self.path / name, aside / name)
        try:
            tracker = open_tracker()
            save_json(cfg.to_dict(), self.path / "config.json")
        except BaseException:
            if aside is not None:
                for name in self.replaces:
                    if not (self.path / name).exists():
                        os.rename(aside / name, self.path / name)
                shutil.rmtree(aside, ignore_errors=True)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return tracker


def _has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / name / ckpt_io.STATE).is_file() for name in CHECKPOINTS)


def check_inputs_apart(run_dir: Path, cfg: RunConfig) -> None:
    """A run directory is never, never holds and never lies inside what the run reads: the data directory
    and a local --train.init_from (an --overwrite there would replace the very files being read)."""
    inputs = [Path(p) for p in (cfg.data.dir, cfg.train.init_from) if p and os.path.lexists(p)]
    check_apart(run_dir, inputs)


def open_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, world: dist.DistInfo, stack: ExitStack) -> RunDir:
    """Check the run directory and take its lock (rank 0, held until `stack` closes). Removes nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory")
    if resume and not run_dir.is_dir():
        raise UserError(f"{run_dir} does not exist; start a run there with --out {run_dir}")
    if world.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run directory {run_dir}: {e.strerror or one_line(e)}") from None
        stack.enter_context(ckpt_io.RunLock(run_dir))  # also removes the temporaries of a killed writer
    dist.barrier()  # no rank looks before rank 0 holds the lock
    if resume:
        if not _has_checkpoint(run_dir) and (run_dir / "config.json").is_file():
            raise UserError(f"{run_dir} has no checkpoint yet (it stopped before its first one); start it again "
                            f"with the same command and --out {run_dir}, without --resume")
        return RunDir(run_dir, resume_from=ckpt_io.resolve_checkpoint(run_dir, "latest"), is_main=world.is_main)
    existing = [n for n in RUN_FILES if (run_dir / n).exists()]
    if existing and _has_checkpoint(run_dir) and not overwrite:
        raise UserError(f"{run_dir} already holds a run ({', '.join(existing)}); continue it with "
                        f"`gptforge train --resume {run_dir}` or start afresh with --overwrite")
    return RunDir(run_dir, replaces=existing, is_main=world.is_main)


def trim_metrics(path: Path, after_step: int) -> None:
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
    atomic_write(path, "".join(line + "\n" for line in keep))


# ---------------------------------------------------------------------------------------------
# Data


def open_data_dir(cfg: RunConfig):
    """The data directory, checked (see gptforge.data.loader.open_data)."""
    if not cfg.data.dir:
        raise UserError("no data: pass --data DATA_DIR (a directory written by `gptforge prepare`)")
    return open_data(cfg.data.dir)


def make_task(cfg: RunConfig, data, tokenizer, world: dist.DistInfo) -> Task:
    """The task on the data's train and val splits, in the final model's block size (after --init-from): a
    ChatTask (SFT, the loss on the assistant's tokens) for chat data, else an LMTask."""
    if getattr(data, "kind", "tokens") == "chat":
        say = print if world.is_main else None  # once, not once per process
        return ChatTask({s: (data.tokens(s), data.mask(s)) for s in ("train", "val")},
                        bos_id=tokenizer.chat.bos_id, sampling=cfg.train.sampling,
                        batch_size=cfg.train.batch_size, block_size=cfg.model.block_size, log=say)
    return LMTask(data.tokens("train"), data.tokens("val"), sampling=cfg.train.sampling,
                  batch_size=cfg.train.batch_size, block_size=cfg.model.block_size)


def set_vocab(cfg: RunConfig, data_vocab: int) -> RunConfig:
    """`cfg` with a model vocabulary for the data's `data_vocab` tokens: padded (see pad_vocab) when unset,
    checked when given."""
    if cfg.model.vocab_size is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=pad_vocab(data_vocab)))
    if cfg.model.vocab_size < data_vocab:
        raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the data's vocabulary "
                          f"({data_vocab} tokens)")
    return cfg


# ---------------------------------------------------------------------------------------------
# The model


def memory_needed(cfg: RunConfig, dtype: torch.dtype, world_size: int = 1) -> dict[str, int]:
    """Bytes one process needs at the least, by part: fp32 weights, their gradients and the optimizer's
    moments (sharded under FSDP), the activations backward keeps for one micro-batch (block inputs, norms,
    q/k/v, attention output, the MLP's hidden layer; the attention matrix too with the manual attention), and
    the logits with their fp32 copy and gradient. A floor, not a forecast: a run needs more than this, never
    less (the README's GPT-2-tokenizer Shakespeare recipe: 6.6 GiB here; a CPU trial of it peaked at 8.7 GB)."""
    m, t = cfg.model, cfg.train
    params, shard = m.param_count(), world_size if t.dist == "fsdp" else 1
    act = torch.finfo(dtype).bits // 8
    tokens = t.batch_size * m.block_size
    attention = 2 * t.batch_size * m.n_head * m.block_size ** 2 * act if m.attention == "manual" else 0
    trained, weights = params, 4 * params // shard
    if t.finetune == "lora":  # the frozen base has no gradients or moments, and its block matrices keep `dtype`
        trained = lora.adapter_param_count(m, cfg.lora)
        weights = 4 * (params + trained) - ((4 - act) * lora.base_matrix_count(m) if act < 4 else 0)
    return {
        "weights": weights,
        "gradients": 4 * trained // shard,
        "optimizer state": (8 if cfg.optim.optimizer == "adamw" else 4) * trained // shard,
        "activations": m.n_layer * (tokens * act * (10 * m.n_embd + 3 * m.mlp_hidden) + attention)
        + (2 * m.block_size * m.head_dim * 4 if m.pos == "rope" else 0),
        "logits": tokens * (m.vocab_size or 0) * (act + 8),
    }


def check_memory_fits(cfg: RunConfig, device: torch.device, dtype: torch.dtype, world_size: int) -> None:
    """Refuse, before the model is built, a run whose floor (`memory_needed`) exceeds the device's free memory;
    on a CPU every process of this machine shares it."""
    parts = memory_needed(cfg, dtype, world_size)
    per_host = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    need = sum(parts.values()) * per_host
    detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items())
    procs = f" x {per_host} processes" if per_host > 1 else ""
    check_memory(need, device, f"training this model at {cfg.train.batch_size:,} x {cfg.model.block_size:,} tokens "
                 f"per micro-batch ({cfg.model.param_count():,} parameters; {detail}{procs})",
                 "make the model smaller or lower --train.batch_size (with --train.total_batch_size the "
                 "accumulation steps grow to keep the total)")


@dataclass
class Init:
    """What --train.init_from gives a run: the model (its vocabulary grown to the data's tokens when the data adds
    the chat markers to a base that lacks rows for them), the ids the base's tokenizer did not have (the chat
    markers of an SFT of a base model, else none), and the sha256 of the weights as loaded (LoRA records it)."""

    model: GPT
    added_ids: list[int]
    sha256: Optional[str] = None
    base: Optional[dict] = None
    """a LoRA run's base as its checkpoints record it (modelio.load.base_identity; a resumed run's as recorded)"""


def load_init(cfg: RunConfig, tokenizer, resume_from: Optional[Path] = None) -> Init:
    """The weights of --train.init_from (GPT-2 / a Hugging Face directory, a nanoGPT ckpt.pt, or a gptforge run
    or checkpoint) in the shape they have, with this run's dropout and attention (and, for Hugging Face sources, a
    shorter block_size: learned positions are cropped); `cfg` is left as it was. The caller puts the model's
    config (`init.model.config`) into the run's. A LoRA run resumed from `resume_from` loads the base its
    checkpoint records (from its absolute path, so a resume works from any working directory)."""

    source, recorded = cfg.train.init_from, None
    if resume_from is not None and cfg.train.finetune == "lora":
        recorded = ckpt_io.read_state(resume_from).get("base") or {}
        source = load.base_source(recorded) or source
    model, model_cfg, init_tok = load.load_init(source, tokenizer, block_size=cfg.model.block_size,
                                                dropout=cfg.model.dropout, attention=cfg.model.attention)
    added: list[int] = []
    if init_tok.fingerprint() != tokenizer.fingerprint():
        if not _adds_chat_markers(init_tok, tokenizer):
            raise UserError(f"--init-from {source} uses its own {init_tok.kind} tokenizer ({init_tok.vocab_size} "
                            f"tokens), not the one the data in {cfg.data.dir} was prepared with; prepare the data with "
                            "the same tokenizer (for GPT-2: gptforge prepare SOURCE --tokenizer gpt2)")
        added = sorted(tokenizer.chat.ids.values())
    digest = base = None
    if cfg.train.finetune == "lora":
        digest = lora.weights_sha256(model)  # of the weights as loaded, before the rows grow
        base = recorded or load.base_identity(cfg.train.init_from, digest)
    if tokenizer.vocab_size > model_cfg.vocab_size:  # GPT-2's 50,257 rows, the markers after them
        grow_vocab(model, pad_vocab(tokenizer.vocab_size))
    return Init(model, added, digest, base)


def _adds_chat_markers(init_tok, tokenizer) -> bool:
    """The data's tokenizer is the init model's plus the chat markers (SFT of a base model): the markers take
    ids the model already has rows for (GPT-2's padded slots; see gptforge.chat_template)."""
    if tokenizer.chat is None or init_tok.chat is not None:
        return False
    return add_chat_template(init_tok).fingerprint() == tokenizer.fingerprint()


def check_resumable(cfg: RunConfig, ckpt: Path, tokenizer) -> None:
    """The run being resumed must be the one in the checkpoint: same model, same tokenizer."""
    if ckpt_io.read_config(ckpt).model != cfg.model:
        raise UserError(f"the model config differs from the checkpoint's in {ckpt}; model fields cannot change on resume")
    if load_tokenizer(ckpt).fingerprint() != tokenizer.fingerprint():
        raise UserError(f"the data in {cfg.data.dir} uses a different tokenizer than the checkpoint in {ckpt}")


def build_model(cfg: RunConfig, init: Optional[Init], resume_from: Optional[Path], device: torch.device,
                world: dist.DistInfo, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The plain (unwrapped) model on its device: fresh, pretrained, or with the weights being resumed; for LoRA
    the pretrained model, frozen, with its adapters (fresh, or resumed), its block matrices kept in a 16-bit
    `dtype` (the autocast type)."""
    seed_everything(cfg.train.seed)  # the same initial weights on every rank
    if cfg.train.finetune == "lora":
        raw = init.model
        if resume_from is not None:
            load.check_base(init.sha256, init.base, resume_from)
            load.load_adapter(raw, cfg, ckpt_io.read_adapter(resume_from), resume_from)
        else:
            lora.attach(raw, cfg.lora, init.added_ids)
        if dtype in (torch.bfloat16, torch.float16):
            lora.keep_base_in(raw, dtype)
    elif resume_from is not None:  # shapes checked against the file before anything is allocated
        raw = ckpt_io.load_model(resume_from, cfg.model)  # before wrapping: FSDP then shards what was loaded
    else:
        raw = init.model if init is not None else GPT(cfg.model)
    raw = raw.to(device).train()
    if cfg.train.freeze_embeddings:
        for module in (raw.transformer.wte, getattr(raw.transformer, "wpe", None)):
            if module is not None:
                module.weight.requires_grad_(False)
    if world.is_distributed:
        torch.manual_seed(cfg.train.seed + world.rank)  # but different dropout draws
    if cfg.train.compile:
        raw.compile_blocks()
    return raw


# ---------------------------------------------------------------------------------------------
# Restoring a checkpoint


def restore(ckpt: Path, *, raw: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: BatchSource,
            cfg: RunConfig, world: dist.DistInfo, task: LMTask, accum: int,
            log: Callable[[str], None]) -> tuple[TrainState, BatchSource]:
    """Put the optimizer, the data position and the RNG back as they were at the checkpoint."""
    st, optimizer_sd, saved_rng = ckpt_io.read_train_state(ckpt)
    state = TrainState.from_state_dict(st)
    try:
        dist.load_optimizer_state(raw, optimizer, cfg.train.dist, optimizer_sd)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"optimizer state in {ckpt} does not fit this model: {one_line(e)}") from None
    if not batches.load_states(st["data"]["slots"]):
        # another number of micro-batch slots (processes x accumulation): fresh, deterministic streams
        log("note: the checkpoint has another number of micro-batches per step (processes x accumulation); "
            "the data streams restart, seeded by the step, so the run will not repeat an uninterrupted one")
        batches = task.batches(cfg.train.seed + state.step, world.rank, world.world_size, accum)
    if len(saved_rng) == world.world_size:
        ckpt_io.restore_process_rng(saved_rng[world.rank])
    else:  # another number of processes: dropout draws restart, seeded by the step
        torch.manual_seed(cfg.train.seed + state.step + world.rank)
    return state, batches
