"""nanoGPT's config/*.py recipes, parsed with `ast` and never run: only top-level `name = literal` assignments
are read (`ast.literal_eval`) and mapped onto gptforge's config sections; anything else is reported."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Union

from gptforge.errors import UserError, one_line


# nanoGPT name -> (section, our field, type). The special cases are in map_names.
_NAMES: dict[str, tuple[str, str, type]] = {
    **{n: ("model", n, int) for n in ("n_layer", "n_head", "n_embd", "block_size")},
    "bias": ("model", "bias", bool), "dropout": ("model", "dropout", float),
    "learning_rate": ("optim", "lr", float), "min_lr": ("optim", "min_lr", float),
    "lr_decay_iters": ("optim", "decay_iters", int), "warmup_iters": ("optim", "warmup_iters", int),
    **{n: ("optim", n, float) for n in ("weight_decay", "beta1", "beta2", "grad_clip")},
    **{n: ("train", n, int) for n in ("max_iters", "batch_size", "eval_interval", "eval_iters", "log_interval", "seed")},
    "device": ("train", "device", str), "dtype": ("train", "dtype", str), "compile": ("train", "compile", bool),
    "wandb_project": ("train", "wandb_project", str), "wandb_run_name": ("train", "run_name", str),
}
_SPECIAL = ("decay_lr", "gradient_accumulation_steps", "dataset", "init_from", "wandb_log")
MACHINE_FIELDS = ("device", "dtype", "compile")  # describe where a run ran, not the model: not imported
# What nanoGPT's train.py uses for the shape of a step when a config file does not say.
_NANOGPT_BATCH, _NANOGPT_BLOCK = 12, 1024


def _typed(name: str, value: Any, kind: type, where: str) -> Any:
    ok = (isinstance(value, bool) if kind is bool else
          not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else kind))
    if not ok:
        raise UserError(f"{where}: {name} must be {'a' if kind is not int else 'an'} {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def map_names(values: dict[str, Any], where: str = "config", strict: bool = True
              ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """nanoGPT's config names and values as a partial config {section: {field: value}}, and the names
    that have no gptforge counterpart. strict=False skips values of the wrong type instead of refusing."""
    out: dict[str, dict[str, Any]] = {}
    unmapped: list[str] = []

    def put(section: str, name: str, value: Any) -> None:
        out.setdefault(section, {})[name] = value

    for name, value in values.items():
        try:
            if name in _NAMES:
                section, ours, kind = _NAMES[name]
                put(section, ours, _typed(name, value, kind, where))
            elif name == "decay_lr":
                if not _typed(name, value, bool, where):  # nanoGPT then uses learning_rate at every step
                    put("optim", "schedule", "constant")
                    put("optim", "cooldown_frac", 0.0)
                    put("optim", "warmup_iters", 0)
                else:
                    put("optim", "schedule", "cosine")
            elif name == "gradient_accumulation_steps":  # nanoGPT's count is over all processes, as ours is
                gas = _typed(name, value, int, where)
                B, T = values.get("batch_size", _NANOGPT_BATCH), values.get("block_size", _NANOGPT_BLOCK)
                put("train", "total_batch_size", gas * _typed("batch_size", B, int, where) * _typed("block_size", T, int, where))
            elif name == "dataset":
                put("data", "dir", f"data/{_typed(name, value, str, where)}")
            elif name == "init_from":
                if _typed(name, value, str, where).startswith("gpt2"):
                    put("train", "init_from", value)
                elif value != "scratch":  # 'resume' is --resume RUN_DIR here
                    unmapped.append(name)
            elif name == "wandb_log":
                if _typed(name, value, bool, where):
                    put("train", "logger", "wandb")
            else:
                unmapped.append(name)
        except UserError:
            if strict:
                raise
    if "decay_lr" in values and values["decay_lr"] is False and "warmup_iters" in values:
        out["optim"]["warmup_iters"] = 0  # no schedule at all in nanoGPT, warmup included
    return out, unmapped


def read_config(path: Union[str, Path]) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:
    """A nanoGPT config file, parsed (never run): (partial config, unmapped names, refused statements).

    Only top-level `name = literal` assignments are read; anything else (imports, calls, expressions,
    `if` blocks) is returned as 'line N: source' in the third list and has no effect."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {one_line(e)}") from None
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise UserError(f"cannot parse config file {path}: {one_line(e, 160)}") from None
    values: dict[str, Any] = {}
    refused: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring: a comment
        target = value = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            target, value = node.target.id, node.value
        if target is not None:
            try:
                values[target] = ast.literal_eval(value)
                continue
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                pass
        text = one_line(ast.get_source_segment(source, node) or type(node).__name__, 60)
        refused.append(f"line {node.lineno}: {text}")
    config, unmapped = map_names(values, where=str(path))
    return config, unmapped, refused


def load_config_py(path: Union[str, Path], log: Optional[Callable[[str], None]] = None) -> dict[str, dict[str, Any]]:
    """read_config for `--config FILE.py`: what it did not map, and what it did not run, each said in one line."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    config, unmapped, refused = read_config(path)
    if unmapped:
        log(f"gptforge: note: {path}: no gptforge setting for {', '.join(unmapped)} (ignored)")
    if refused:
        log(f"gptforge: warning: {path}: not run, only `name = literal` lines are read: {'; '.join(refused)}")
    return config

