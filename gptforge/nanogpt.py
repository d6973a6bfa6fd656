"""nanoGPT's files, read as they are and never run: `ckpt.pt` checkpoints, `data/NAME/` directories
(`train.bin`/`val.bin` + optional `meta.pkl`) and `config/*.py` recipes.

Nothing here executes a stranger's code. A checkpoint is read by `torch.load(weights_only=True)`, which
builds only tensors and plain containers; if it refuses a file we refuse it too, never retrying unsafely.
`meta.pkl` goes through an unpickler whose `find_class` refuses every name, so only pickle's own opcodes
(dicts, lists, strings, numbers) can load: nothing callable can ever be reached. A config file is parsed
with `ast`; only top-level `name = literal` assignments are read (`ast.literal_eval`), anything else is
reported and skipped.

nanoGPT's model is the classic rung of our ladder with GPT-2's parameter names and `nn.Linear` layers,
so its weights load by a key copy (after stripping torch.compile's `_orig_mod.` prefix and dropping the
causal-mask buffers it registers as `attn.bias` when flash attention is unavailable).
"""

from __future__ import annotations

import ast
import dataclasses
import io
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from gptforge.config import ConfigError, GPTConfig, RunConfig
from gptforge.data.loader import TokenData
from gptforge.errors import UserError, one_line
from gptforge.tokenizer import CharTokenizer, GPT2Tokenizer, Tokenizer

META = "meta.pkl"
GPT2_VOCAB = 50257
_COMPILED_PREFIX = "_orig_mod."
_MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.bias$")  # not attn.c_attn.bias, a real parameter


# ----------------------------------------------------------------------------------------------
# meta.pkl -> a char tokenizer


class _PlainUnpickler(pickle.Unpickler):
    """Loads only what pickle builds from its own opcodes; any class or function reference is refused,
    and with it every way for a pickle to call something (REDUCE needs a callable found by name)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, and meta.pkl may hold only plain data")


def read_meta(path: Union[str, Path]) -> CharTokenizer:
    """nanoGPT's `meta.pkl` ({'vocab_size', 'stoi', 'itos'}) as a char tokenizer with exactly its ids."""
    path = Path(path)
    try:
        meta = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except OSError as e:
        raise UserError(f"cannot read {path}: {one_line(e)}") from None
    except Exception as e:  # UnpicklingError, truncation, garbage: all mean "not a plain meta.pkl"
        raise UserError(f"refusing {path}: {one_line(e, 160)} (nothing in it was run)") from None
    return _char_tokenizer(meta, path)


def _char_tokenizer(meta: Any, path: Path) -> CharTokenizer:
    if not isinstance(meta, dict) or not isinstance(meta.get("stoi"), dict) or not isinstance(meta.get("itos"), dict):
        raise UserError(f"{path} is not a nanoGPT char vocabulary (a dict with 'stoi' and 'itos')")
    itos, stoi = meta["itos"], meta["stoi"]
    n = len(itos)
    if sorted(k for k in itos if isinstance(k, int)) != list(range(n)) or any(
            not isinstance(c, str) or len(c) != 1 for c in itos.values()):
        raise UserError(f"{path}: itos must map the ids 0..{n - 1} to single characters")
    chars = [itos[i] for i in range(n)]
    if stoi != {c: i for i, c in enumerate(chars)} or meta.get("vocab_size", n) != n:
        raise UserError(f"{path}: stoi, itos and vocab_size disagree")
    # CharTokenizer numbers characters in sorted order, as nanoGPT's prepare.py does; a vocabulary
    # numbered any other way cannot keep its ids, and the model's rows would mean other characters.
    if chars != sorted(chars):
        raise UserError(f"{path}: its ids are not in sorted character order (as nanoGPT's prepare.py writes them), "
                        "so a gptforge char tokenizer cannot keep them")
    return CharTokenizer(chars, eot=False)


def data_tokenizer(data_dir: Union[str, Path]) -> Tokenizer:
    """The tokenizer of a nanoGPT data directory: meta.pkl's characters, or GPT-2 BPE when there is none."""
    meta = Path(data_dir) / META
    return read_meta(meta) if meta.is_file() else GPT2Tokenizer()


# ----------------------------------------------------------------------------------------------
# data directories


@dataclass
class NanoGPTData(TokenData):
    """A nanoGPT data directory opened like a prepared one: uint16 train.bin/val.bin, tokenizer from meta.pkl."""

    _tokenizer: Optional[Tokenizer] = field(default=None, repr=False)

    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = data_tokenizer(self.path)
        return self._tokenizer


def open_nanogpt_data(path: Union[str, Path]) -> NanoGPTData:
    """A directory with nanoGPT's train.bin and val.bin (uint16 token ids, no header) as TokenData."""
    path = Path(path)
    splits = {}
    for split in ("train", "val"):
        file = path / f"{split}.bin"
        if not file.is_file():
            raise UserError(f"{path} looks like a nanoGPT data directory but has no {file.name}")
        size = file.stat().st_size
        if size % 2:
            raise UserError(f"{file} has an odd number of bytes; nanoGPT's .bin files hold uint16 token ids")
        splits[split] = {"file": file.name, "tokens": size // 2}
    tok = read_meta(path / META) if (path / META).is_file() else None
    kind, vocab = ("char", tok.vocab_size) if tok is not None else ("gpt2", GPT2_VOCAB)
    for split in splits:  # a cheap spot check, as for prepared data: ids at both ends fit the vocabulary
        ids = np.memmap(path / f"{split}.bin", dtype=np.uint16, mode="r") if splits[split]["tokens"] else []
        top = max([int(ids[:4096].max()), int(ids[-4096:].max())]) if len(ids) else 0
        if top >= vocab:
            raise UserError(f"{path / split}.bin holds token id {top:,}, outside the {kind} vocabulary of {vocab:,} "
                            f"tokens{' in meta.pkl' if tok is not None else ' (no meta.pkl: GPT-2 BPE)'}")
    manifest = {"format": "nanogpt", "dtype": "uint16", "splits": splits,
                "tokenizer": {"kind": kind, "vocab_size": vocab}}
    return NanoGPTData(path, manifest, tok)


# ----------------------------------------------------------------------------------------------
# ckpt.pt


@dataclass
class NanoCheckpoint:
    """What a nanoGPT ckpt.pt holds that we use; `weights` are keyed and shaped for our GPT(config)."""

    config: GPTConfig
    weights: dict[str, torch.Tensor]
    iter_num: int
    best_val_loss: Optional[float]
    train_config: dict[str, Any]


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code in the pickle; RuntimeError etc. for a bad file
        text = str(e).strip()
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        why = f"it refers to {found.group(1)}" if found else one_line(text.splitlines()[0] if text else repr(e), 120)
        raise UserError(f"refusing {path}: torch.load(weights_only=True) cannot read it safely ({why}); "
                        "it was not loaded any other way") from None


def _model_config(args: Any, sd: dict[str, torch.Tensor], path: Path) -> GPTConfig:
    if not isinstance(args, dict):
        raise UserError(f"{path}: model_args is not a dict; is this a nanoGPT checkpoint?")
    ints = {}
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        v = args.get(name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserError(f"{path}: model_args[{name!r}] must be an int, got {v!r}")
        ints[name] = v
    bias = args.get("bias", "transformer.ln_f.bias" in sd)  # early nanoGPT had no bias option: always biases
    dropout = args.get("dropout", 0.0)
    if not isinstance(bias, bool) or isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise UserError(f"{path}: model_args bias must be a bool and dropout a number")
    head, wte = sd.get("lm_head.weight"), sd.get("transformer.wte.weight")
    tied = head is None or (wte is not None and head.shape == wte.shape and torch.equal(head, wte))
    try:
        return GPTConfig(**ints, bias=bias, dropout=float(dropout), pos="learned", norm="layernorm", norm_eps=1e-5,
                         mlp="gelu", tie_embeddings=tied)  # nn.GELU() is the exact GELU
    except ConfigError as e:
        raise UserError(f"{path}: {e}") from None


def _check_shapes(cfg: GPTConfig, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor named and shaped as GPT(cfg) wants, before a single real weight is allocated."""
    from gptforge.model import GPT

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        want = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    wrong = [f"{k} is {tuple(sd[k].shape)}, expected {want[k]}" for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    bad_dtype = [k for k in want if k in sd and not sd[k].is_floating_point()]
    for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong), ("not floating point", bad_dtype)):
        if items:
            more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
            raise UserError(f"{path}: weights do not fit its model_args: {label}: {items[0]}{more}")


def read_checkpoint(path: Union[str, Path]) -> NanoCheckpoint:
    """nanoGPT's ckpt.pt, read safely and mapped onto our GPTConfig and parameter names."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    ck = _torch_load(path)
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict) or "model_args" not in ck:
        raise UserError(f"{path} is not a nanoGPT checkpoint (a dict with 'model' and 'model_args')")
    sd = {}
    for k, v in ck["model"].items():
        if not isinstance(k, str) or not torch.is_tensor(v):
            raise UserError(f"{path}: the model state holds a non-tensor entry {k!r}")
        k = k[len(_COMPILED_PREFIX):] if k.startswith(_COMPILED_PREFIX) else k  # saved from a torch.compile'd model
        if not _MASK_BUFFER.match(k):  # a constant causal mask, not a weight
            sd[k] = v
    cfg = _model_config(ck["model_args"], sd, path)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd.get("lm_head.weight", sd.get("transformer.wte.weight"))
        if sd["lm_head.weight"] is None:
            del sd["lm_head.weight"]
    _check_shapes(cfg, sd, path)
    best = ck.get("best_val_loss")
    best = float(best) if isinstance(best, (int, float)) or (torch.is_tensor(best) and best.numel() == 1) else None
    iter_num = ck.get("iter_num", 0)
    iter_num = iter_num if isinstance(iter_num, int) and not isinstance(iter_num, bool) else 0
    train_config = ck.get("config") if isinstance(ck.get("config"), dict) else {}
    return NanoCheckpoint(cfg, sd, iter_num, best, train_config)


def _tokenizer_for(ck: NanoCheckpoint, data: Union[None, str, Path, Tokenizer], path: Path) -> Tokenizer:
    """The tokenizer given, or a data directory's, or (nanoGPT's own sample.py rule) data/<dataset>/meta.pkl
    if it exists, else GPT-2 BPE; it must fit in the model's vocabulary."""
    if isinstance(data, Tokenizer):
        tok = data
    elif data is not None:  # a nanoGPT data directory or a prepared one
        from gptforge.data.loader import open_data

        tok = open_data(data).tokenizer()
    else:
        dataset = ck.train_config.get("dataset")
        meta = Path("data") / dataset / META if isinstance(dataset, str) and dataset else None
        if meta is not None and meta.is_file():
            tok = read_meta(meta)
        elif ck.config.vocab_size < GPT2_VOCAB:
            where = f"data/{dataset}/meta.pkl" if meta is not None else "its meta.pkl"
            raise UserError(f"{path} has a {ck.config.vocab_size}-token vocabulary, not GPT-2's, and {where} is not "
                            f"here; `gptforge import {path} --out DIR --data NANOGPT_DATA_DIR` takes it from there")
        else:
            tok = GPT2Tokenizer()
    if tok.vocab_size > ck.config.vocab_size:
        raise UserError(f"the {tok.kind} tokenizer has {tok.vocab_size} tokens but {path} only {ck.config.vocab_size} "
                        "vocabulary rows; pass --data with the directory it was trained on")
    return tok


def load_init(path: Union[str, Path], data_dir_or_tokenizer: Union[None, str, Path, Tokenizer] = None, *,
              block_size: Optional[int] = None, dropout: Optional[float] = None,
              attention: Optional[str] = None) -> tuple[torch.nn.Module, GPTConfig, Tokenizer]:
    """A nanoGPT ckpt.pt as our GPT (eval mode, CPU), its config and its tokenizer, for --train.init_from,
    sample and eval. block_size may shorten the context (learned positions are cut); dropout and
    attention, when given, replace the checkpoint's."""
    from gptforge.model import GPT

    path = Path(path)
    ck = read_checkpoint(path)
    tok = _tokenizer_for(ck, data_dir_or_tokenizer, path)
    cfg, sd = ck.config, dict(ck.weights)
    if block_size is not None and block_size != cfg.block_size:
        if block_size > cfg.block_size:
            raise UserError(f"block_size {block_size} exceeds the {cfg.block_size} positions {path} learned")
        sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][:block_size]
    changes = {k: v for k, v in (("block_size", block_size), ("dropout", dropout), ("attention", attention))
               if v is not None}
    cfg = dataclasses.replace(cfg, **changes)
    model = GPT(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg, tok


def load_nanogpt_checkpoint(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                            data: Union[None, str, Path] = None):
    """`load_init` as a `gptforge.checkpoint.Checkpoint`, for `sample` and `eval` on a ckpt.pt."""
    from gptforge.checkpoint import Checkpoint

    ck = read_checkpoint(path)
    model, _, tok = load_init(path, data)
    return Checkpoint(model=model.to(device), tokenizer=tok, config=_run_config(ck, data), path=Path(path),
                      state={"source": str(path), "step": ck.iter_num, "best_val_loss": ck.best_val_loss})


def _run_config(ck: NanoCheckpoint, data: Union[None, str, Path]) -> RunConfig:
    """The run config a ckpt.pt was trained with, as far as it maps; the model from model_args (what the
    weights are), not from where it ran (device, dtype, compile), its data directory as nanoGPT finds it."""
    sections, _ = map_names(ck.train_config, strict=False)
    sections["train"] = {k: v for k, v in sections.get("train", {}).items() if k not in _MACHINE_FIELDS}
    sections["model"] = dataclasses.asdict(ck.config)
    if data is not None:
        sections["data"] = {"dir": str(data)}
    return RunConfig.from_dict(sections)


def import_checkpoint(path: Union[str, Path], out_dir: Union[str, Path], *, data: Union[None, str, Path] = None,
                      overwrite: bool = False) -> dict[str, Any]:
    """`gptforge import ckpt.pt --out DIR`: write a nanoGPT checkpoint as a gptforge checkpoint directory
    (weights, the run config it was trained with as far as it maps, its tokenizer, step and best val loss).
    The optimizer state is not carried over: the result is for sampling, eval and --train.init_from."""
    from gptforge.checkpoint import write_checkpoint
    from gptforge.hf import check_output_dir

    path, out = Path(path), Path(out_dir)
    check_output_dir(out, overwrite, tuple(p for p in (path, data and Path(data)) if p and p.exists()))
    ck = read_checkpoint(path)
    tok = _tokenizer_for(ck, data, path)
    run = _run_config(ck, data)
    state = {"step": ck.iter_num, "best_val_loss": ck.best_val_loss, "source": str(path), "imported_from": "nanoGPT"}
    write_checkpoint(out, ck.weights, run, tok, state, keep_other_files=True)  # --overwrite: only our files go
    return {"path": str(out), "source": str(path), "model": dataclasses.asdict(ck.config), "tokenizer": tok.kind,
            "vocab_size": ck.config.vocab_size, "tokenizer_vocab_size": tok.vocab_size, "step": ck.iter_num,
            "best_val_loss": ck.best_val_loss}


# ----------------------------------------------------------------------------------------------
# config/*.py

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
_MACHINE_FIELDS = ("device", "dtype", "compile")  # describe where a run ran, not the model: not imported
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
