"""Checkpoints: atomic save and safe load of everything a run needs to resume exactly.

A checkpoint is a directory (RUN_DIR/latest, RUN_DIR/best):
  model.safetensors        weights (a tied output head is stored once, as the token embedding)
  config.json              the resolved RunConfig
  tokenizer.json           the tokenizer, complete: sampling needs nothing else
  state.json               step, losses, data position, optimizer hyper-parameters, file sizes
  train_state.safetensors  optimizer moments and torch RNG states (only in resumable checkpoints)
Nothing is ever unpickled: only safetensors and JSON are read, so a stranger's checkpoint cannot run code.

A directory is written under a temporary name and renamed into place. The previous version is moved
aside as `.NAME.old` and deleted only after the new one is in place, so a kill at any moment leaves
one complete checkpoint that `resolve_checkpoint` finds.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptforge.config import RunConfig, save_json
from gptforge.errors import UserError

FORMAT = "gptforge-checkpoint/1"
WEIGHTS, CONFIG, TOKENIZER, STATE, TRAIN_STATE = (
    "model.safetensors", "config.json", "tokenizer.json", "state.json", "train_state.safetensors")


# ---------------------------------------------------------------------------------------------
# Writing


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_dir_atomically(path: Path, write_files: Callable[[Path], None]) -> None:
    """Fill a fresh temporary directory with `write_files(tmp)`, then swap it in for `path`."""
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp, old = parent / f".{path.name}.tmp", parent / f".{path.name}.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_files(tmp)
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(parent)
    if old.exists():
        shutil.rmtree(old)


def umask_mode(path: Path) -> None:
    """safetensors creates files readable by their owner only; give them the usual mode for new files."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors on CPU, for saving."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def optimizer_state(optimizer_sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer.state_dict() into tensors (for safetensors) and JSON-able hyper-parameters."""
    tensors, scalars = {}, {}
    for idx, st in optimizer_sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in optimizer_sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def process_rng() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (dropout draws from them)."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_process_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save_checkpoint(path: Path, model: torch.nn.Module, config: RunConfig, tokenizer,
                    state: Optional[dict[str, Any]] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Write a checkpoint of a model in this process. With an optimizer it is resumable (moments + RNG)."""
    write_checkpoint(path, model_state(model), config, tokenizer, state,
                     optimizer.state_dict() if optimizer is not None else None,
                     [process_rng()] if optimizer is not None else None)


def write_checkpoint(path: Path, weights: dict[str, torch.Tensor], config: RunConfig, tokenizer,
                     state: Optional[dict[str, Any]] = None, optimizer_sd: Optional[dict[str, Any]] = None,
                     rng: Optional[list[dict[str, torch.Tensor]]] = None) -> None:
    """Write a checkpoint directory atomically from full (unsharded) state: weights, optionally the
    optimizer's state_dict() and each rank's RNG states, which make it resumable."""
    state = dict(state or {})
    weights = {k: v.contiguous() for k, v in weights.items()}
    if config.model.tie_embeddings:
        weights.pop("lm_head.weight", None)  # the same tensor as transformer.wte.weight

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        umask_mode(tmp / WEIGHTS)
        save_json(config.to_dict(), tmp / CONFIG)
        tokenizer.save(tmp)
        if optimizer_sd is not None:
            tensors, hyper = optimizer_state(optimizer_sd)
            for rank, states in enumerate(rng or []):
                for kind, t in states.items():
                    tensors[f"rng.{rank}.{kind}"] = t
            save_file(tensors, str(tmp / TRAIN_STATE))
            umask_mode(tmp / TRAIN_STATE)
            state["optimizer"] = hyper
        state["format"] = FORMAT
        state["files"] = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        save_json(state, tmp / STATE)

    write_dir_atomically(path, write)


def link_checkpoint(src: Path, dst: Path, state_update: dict[str, Any]) -> None:
    """Make `dst` a weights-only copy of checkpoint `src` (hard links where possible, so no bytes are copied)."""
    src_state = read_state(src)

    def write(tmp: Path) -> None:
        for name in (WEIGHTS, CONFIG, TOKENIZER):
            try:
                os.link(src / name, tmp / name)
            except OSError:
                shutil.copy2(src / name, tmp / name)
        state = {k: v for k, v in src_state.items() if k not in ("optimizer", "files")}
        state.update(state_update)
        state["files"] = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        save_json(state, tmp / STATE)

    write_dir_atomically(dst, write)


# ---------------------------------------------------------------------------------------------
# Reading


def resolve_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """A checkpoint directory from a run directory (its `which` checkpoint) or a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if (path / STATE).is_file() or (path / WEIGHTS).is_file():
        return path
    for candidate in (path / which, path / f".{which}.old"):  # .old: killed between the two renames
        if (candidate / STATE).is_file():
            return candidate
    raise UserError(f"no checkpoint found in {path} (expected {path / which}); is it a gptforge run directory?")


def read_state(ckpt: Path) -> dict[str, Any]:
    """state.json of a checkpoint, after checking that every file it lists is there with its full size."""
    try:
        state = json.loads((ckpt / STATE).read_text())
        files = state["files"]
    except FileNotFoundError:
        raise UserError(f"checkpoint {ckpt} is incomplete: no {STATE}") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"checkpoint {ckpt} is corrupt: {STATE} is unreadable") from None
    if state.get("format") != FORMAT:
        raise UserError(f"{ckpt} is not a {FORMAT} checkpoint (format {state.get('format')!r})")
    for name, size in files.items():
        f = ckpt / name
        if not f.is_file() or f.stat().st_size != size:
            raise UserError(f"checkpoint {ckpt} is corrupt or incomplete: {name} is missing or has the wrong size")
    return state


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {file}: {e}") from None


def read_config(ckpt: Path) -> RunConfig:
    try:
        return RunConfig.from_dict(json.loads((ckpt / CONFIG).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"checkpoint {ckpt} has an unreadable {CONFIG}: {e}") from None


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    sd = _load_tensors(ckpt / WEIGHTS)
    if model.config.tie_embeddings and "lm_head.weight" not in sd and "transformer.wte.weight" in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"weights in {ckpt} do not fit the model of its config: {' '.join(first[:2])}") from None


def read_train_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, torch.Tensor]]]:
    """A resumable checkpoint's state.json, optimizer state_dict() and per-rank RNG states."""
    state = read_state(ckpt)
    if "optimizer" not in state or not (ckpt / TRAIN_STATE).is_file():
        raise UserError(f"checkpoint {ckpt} holds weights only and cannot be resumed from")
    tensors = _load_tensors(ckpt / TRAIN_STATE)
    hyper = state["optimizer"]
    opt_state: dict[int, dict[str, Any]] = {}
    rng: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = t
        elif key.startswith("rng."):
            _, rank, kind = key.split(".", 2)
            rng.setdefault(int(rank), {})[kind] = t
    for key, v in hyper["scalars"].items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = v
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in hyper["param_groups"]]
    return state, {"state": opt_state, "param_groups": groups}, [rng[r] for r in sorted(rng)]


def load_train_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore a single process's optimizer and RNG (rank 0's) from a resumable checkpoint; return state.json."""
    state, optimizer_sd, rng = read_train_state(ckpt)
    try:
        optimizer.load_state_dict(optimizer_sd)
    except (ValueError, KeyError) as e:
        raise UserError(f"optimizer state in {ckpt} does not fit this model: {e}") from None
    if rng:
        restore_process_rng(rng[0])
    return state


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its tokenizer and the run config it was trained with."""

    model: torch.nn.Module
    tokenizer: Any
    config: RunConfig
    path: Path
    state: dict[str, Any] = field(default_factory=dict)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", which: str = "latest") -> Checkpoint:
    """Load a run directory (its `which` checkpoint: latest or best) or a checkpoint directory."""
    from gptforge.model import GPT
    from gptforge.tokenizer import load_tokenizer

    ckpt = resolve_checkpoint(path, which)
    state = read_state(ckpt)
    config = read_config(ckpt)
    tokenizer = load_tokenizer(ckpt)
    model = GPT(config.model)
    load_weights(model, ckpt)
    model.to(device).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, path=ckpt, state=state)
