"""Checkpoints: atomic save and safe load of everything a run needs to resume exactly.

A checkpoint is a directory (RUN_DIR/latest, RUN_DIR/best):
  model.safetensors        weights (a tied output head is stored once, as the token embedding)
  adapter.safetensors      instead of model.safetensors in a LoRA run's checkpoints: the adapters only, and
                           state.json's "base" names the model they adapt and the sha256 of its weights
  config.json              the resolved RunConfig
  tokenizer.json           the tokenizer, complete: sampling needs nothing else
  state.json               step, losses, data position, optimizer hyper-parameters, file sizes
  train_state.safetensors  optimizer moments and torch RNG states (only in resumable checkpoints)
Nothing is ever unpickled: only safetensors and JSON are read, so a stranger's checkpoint cannot run code.

A directory is written under a temporary name of its own (`.NAME.tmp-RANDOM`, so two writers never share
one) and renamed into place. The previous version is moved aside as `.NAME.old` and deleted only after the
new one is in place, so a kill at any moment leaves one complete checkpoint that `resolve_checkpoint` finds.
The temporaries of killed writers are removed by `clean_stale`, which `RunLock` runs once it holds the run
directory. `load_model` checks the tensor shapes in the weights' header against the config before it
allocates a model, so a corrupt or hostile config.json cannot make it allocate more than the file holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gptforge.config import GPTConfig, RunConfig, read_config_json, save_json
from gptforge.errors import UserError, one_line
from gptforge.files import path_problem
from gptforge.model import GPT, meta_model, stored_layers
from gptforge.tokenizer import load_tokenizer

FORMAT = "gptforge-checkpoint/1"
WEIGHTS, ADAPTER, CONFIG, TOKENIZER, STATE, TRAIN_STATE = (
    "model.safetensors", "adapter.safetensors", "config.json", "tokenizer.json", "state.json", "train_state.safetensors")
CHECKPOINT_FILES = (WEIGHTS, ADAPTER, CONFIG, TOKENIZER, STATE, TRAIN_STATE)  # every name write_checkpoint may write
LOCK = ".lock"
# what killed writers leave: our temporary directories (and the old fixed `.NAME.tmp`), and the temporary
# files of gptforge.files (`.NAME.<12 hex>.tmp`)
_STALE_DIR = re.compile(r"\..+\.tmp(-[0-9a-f]+)?")
_STALE_FILE = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


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


def _fsync_files(directory: Path) -> None:
    for f in directory.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(directory)


def write_dir_atomically(path: Path, write_files: Callable[[Path], None],
                         owned: Optional[Collection[str]] = None) -> None:
    """Fill a fresh temporary directory with `write_files(tmp)`, then put it in place of `path`.

    The whole directory is swapped in (see the module docstring). With `owned`, the names of the files this
    writer makes, an existing directory `path` is kept instead: its owned names are replaced or removed and
    every other file in it stays (each file is replaced atomically, the set of them is not).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(6)}"  # unique: concurrent writers cannot collide
    tmp.mkdir()
    try:
        write_files(tmp)
        _fsync_files(tmp)
        if owned is not None and path.is_dir():
            _merge_into(path, tmp, owned)
        else:
            _swap_in(path, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed


def _swap_in(path: Path, tmp: Path) -> None:
    old = path.parent / f".{path.name}.old"
    if path.exists():
        if old.exists():  # path is complete, so the copy kept from an earlier kill is not needed
            shutil.rmtree(old)
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)


def _merge_into(path: Path, tmp: Path, owned: Collection[str]) -> None:
    new = [f.name for f in tmp.iterdir()]
    stray = [n for n in new if n not in owned]
    if stray:  # the list of owned names is ours: a file missing from it is a bug, not the user's doing
        raise RuntimeError(f"{stray[0]} was written but is not among the owned names {sorted(owned)}")
    for name in owned:
        if (path / name).is_dir() and not (path / name).is_symlink():
            raise UserError(f"{path / name} is a directory; move it away or choose another directory")
    # config and state last: a reader that sees them new sees the files they describe new too
    for name in sorted(new, key=lambda n: (n in (CONFIG, STATE), n)):
        os.replace(tmp / name, path / name)
    for name in owned:
        if name not in new and ((path / name).is_file() or (path / name).is_symlink()):
            (path / name).unlink()
    _fsync_dir(path)


def clean_stale(parent: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers left in `parent`; return what was removed.

    Only the holder of `RunLock(parent)` may call this: a live writer's temporary looks just like a dead one's.
    `.NAME.old` directories are kept: one may be the only complete copy of a checkpoint.
    """
    removed = []
    for p in sorted(Path(parent).glob(".*.tmp*")):
        if p.is_dir() and not p.is_symlink() and _STALE_DIR.fullmatch(p.name):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and _STALE_FILE.fullmatch(p.name):
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p)
    return removed


class RunLock:
    """Exclusive use of a run directory by one gptforge process, for as long as a `with` block runs.

    Take it in the main process only (rank 0 of a distributed job), around everything that writes into the
    run directory, before the first write::

        with RunLock(run_dir):
            ...  # train: metrics, checkpoints (latest, best), the report

    A second process taking it for the same directory gets a one-line UserError at once instead of waiting.
    It is an flock on RUN_DIR/.lock, which records the holder's pid and host for that message; the OS drops
    the lock when the holder dies, even by SIGKILL, so a leftover .lock file is harmless and never needs
    deleting. Once held, the temporaries of killed writers in RUN_DIR are removed (`clean_stale`).
    Not re-entrant: a second RunLock on the same directory is refused in the holder's own process too.
    Processes forked without exec while it is held share it until they exit; without fcntl (Windows) it
    locks nothing.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise UserError(f"cannot lock {self.run_dir}: {one_line(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _lock_holder(fd)
            os.close(fd)
            if isinstance(e, BlockingIOError):
                raise UserError(f"{self.run_dir} is in use by another gptforge process ({holder}); "
                                "wait for it to finish or stop it") from None
            raise UserError(f"cannot lock {self.run_dir}: {one_line(e)}") from None
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode())
        self._fd = fd
        clean_stale(self.run_dir)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _lock_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"pid {int(info['pid'])} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written it yet
        return "pid unknown"


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


def write_checkpoint(path: Path, weights: dict[str, torch.Tensor], config: RunConfig, tokenizer,
                     state: Optional[dict[str, Any]] = None, optimizer_sd: Optional[dict[str, Any]] = None,
                     rng: Optional[list[dict[str, torch.Tensor]]] = None, *, keep_other_files: bool = False) -> None:
    """Write a checkpoint directory atomically from full (unsharded) state: weights (a LoRA run's: its adapter
    tensors, written as adapter.safetensors), optionally the optimizer's state_dict() and each rank's RNG states,
    which make it resumable. With keep_other_files, an existing directory keeps the files that are not a
    checkpoint's (`write_dir_atomically`'s `owned`)."""
    state = dict(state or {})
    weights = {k: v.contiguous() for k, v in weights.items()}
    name = ADAPTER if config.train.finetune == "lora" else WEIGHTS
    if config.model.tie_embeddings:
        weights.pop("lm_head.weight", None)  # the same tensor as transformer.wte.weight

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / name), metadata={"format": "pt"})
        umask_mode(tmp / name)
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

    write_dir_atomically(path, write, CHECKPOINT_FILES if keep_other_files else None)


def link_checkpoint(src: Path, dst: Path, state_update: dict[str, Any]) -> None:
    """Make `dst` a weights-only copy of checkpoint `src` (hard links where possible, so no bytes are copied)."""
    src_state = read_state(src)

    def write(tmp: Path) -> None:
        for name in (WEIGHTS if (src / WEIGHTS).is_file() else ADAPTER, CONFIG, TOKENIZER):
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
    if problem := path_problem(path, "folder"):
        raise UserError(f"{path} {problem}")
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
        return read_config_json(Path(ckpt) / CONFIG)
    except UserError as e:
        raise UserError(f"checkpoint {ckpt} has an unusable {CONFIG}: {one_line(e)}") from None


def weight_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a safetensors file, read from its header alone."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {file}: {one_line(e)}") from None


def check_weights_fit(ckpt: Path, cfg: GPTConfig, config_name: str = CONFIG) -> None:
    """Refuse, in one line naming the first differing tensor, weights in `ckpt` that GPT(cfg) would not
    take; and a cfg whose derived tables alone would take far more memory than the weights. Allocates nothing:
    the model is built on the meta device."""
    found = weight_shapes(ckpt / WEIGHTS)
    try:
        meta = meta_model(cfg, stored_layers(found))
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{config_name} of {ckpt} describes no buildable model: {one_line(e)}") from None
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    if cfg.tie_embeddings and "lm_head.weight" not in found:
        expected.pop("lm_head.weight", None)  # stored once, as the token embedding
    where = f"the weights in {ckpt} do not fit the model of {config_name}"
    for k in [*expected, *sorted(set(found) - set(expected))]:
        if k not in found:
            blocks = stored_layers(found)
            also = f" ({WEIGHTS} holds {blocks} blocks, {config_name} {cfg.n_layer:,})" if blocks != cfg.n_layer else ""
            raise UserError(f"{where}: {k} is missing from {WEIGHTS}{also}")
        if k not in expected:
            raise UserError(f"{where}: {WEIGHTS} has a tensor {k} that the model does not")
        if found[k] != expected[k]:
            raise UserError(f"{where}: {k} is {list(found[k])} in {WEIGHTS} but {list(expected[k])} in {config_name}")
    # tables derived from the config, not stored (RoPE's cos/sin grow with block_size): bounded by the
    # weights, with room for long contexts of small models
    derived = sum(b.numel() * b.element_size() for b in meta.buffers())
    if derived > max(4 * (ckpt / WEIGHTS).stat().st_size, 1 << 30):
        raise UserError(f"{config_name} of {ckpt} asks for {derived / 2**30:.1f} GiB of position tables "
                        f"(block_size {cfg.block_size}) for {(ckpt / WEIGHTS).stat().st_size / 2**20:.1f} MiB "
                        "of weights; is it corrupt?")


def model_from_state(cfg: GPTConfig, sd: dict[str, torch.Tensor], *, block_size: Optional[int] = None,
                     dropout: float = 0.0, attention: str = "sdpa") -> GPT:
    """GPT(cfg) holding the converted weights `sd` (eval mode, float32, CPU); block_size may shorten the context
    (learned positions are cut to it; they cannot be lengthened); dropout and attention are the caller's."""
    if block_size is not None and block_size != cfg.block_size and cfg.pos == "learned":
        if block_size > cfg.block_size:
            raise UserError(f"block_size {block_size} exceeds the {cfg.block_size} positions the model learned")
        sd = {**sd, "transformer.wpe.weight": sd["transformer.wpe.weight"][:block_size]}
    cfg = dataclasses.replace(cfg, block_size=block_size or cfg.block_size, dropout=dropout, attention=attention)
    model = GPT(cfg)
    model.load_state_dict({**sd, **({"lm_head.weight": sd["transformer.wte.weight"]} if cfg.tie_embeddings else {})})
    return model.eval()


def load_model(ckpt: str | Path, model_config: Optional[GPTConfig] = None) -> GPT:
    """The GPT of checkpoint directory `ckpt` with its weights, on the CPU and in training mode.

    model_config replaces the checkpoint's own (config.json) model config, for a model of the same shape
    with other settings (dropout, attention). The weights' shapes are checked against it before anything
    is allocated (`check_weights_fit`). Pair it with `read_state`, which checks the files are complete.
    """
    ckpt = Path(ckpt)
    cfg = model_config if model_config is not None else read_config(ckpt).model
    check_weights_fit(ckpt, cfg, "the model config" if model_config is not None else CONFIG)
    model = GPT(cfg)
    load_weights(model, ckpt)
    return model


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


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its tokenizer and the run config it was trained with."""

    model: torch.nn.Module
    tokenizer: Any
    config: RunConfig
    path: Path
    state: dict[str, Any] = field(default_factory=dict)


def is_adapter(ckpt: Path) -> bool:
    """A LoRA run's checkpoint: adapters, no model weights of its own (`gptforge.modelio.load` opens it)."""
    return (Path(ckpt) / ADAPTER).is_file() and not (Path(ckpt) / WEIGHTS).is_file()


def read_adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint's adapter tensors (names under `lora.`)."""
    return _load_tensors(Path(ckpt) / ADAPTER)


def open_checkpoint(path: str | Path, which: str = "latest") -> Checkpoint:
    """A run directory's `which` checkpoint (latest or best), or a checkpoint directory, as stored: on the CPU,
    in eval mode, with its tokenizer, run config and state. `gptforge.modelio.load` readies it for a device,
    and opens a LoRA run's checkpoint (its base model with the adapters merged), which this refuses."""
    ckpt = resolve_checkpoint(path, which)
    if is_adapter(ckpt):
        raise UserError(f"{ckpt} holds LoRA adapters, not a whole model; gptforge.modelio.load.load opens it "
                        "with its base model")
    state = read_state(ckpt)
    config = read_config(ckpt)
    tokenizer = load_tokenizer(ckpt)
    model = load_model(ckpt).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, path=ckpt, state=state)
