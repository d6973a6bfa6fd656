"""nanoGPT's ckpt.pt: read with torch.load(weights_only=True) (if it refuses a file, so do we, never retrying
unsafely), mapped onto the classic rung of the ladder by a key copy, imported as a gptforge checkpoint or used
for --train.init_from, sample and eval."""

from __future__ import annotations

import dataclasses
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from gptforge.config import ConfigError, GPTConfig, RunConfig
from gptforge.data.loader import open_data
from gptforge.errors import UserError, one_line
from gptforge.files import check_output_dir, path_problem
from gptforge.model import GPT, meta_model, stored_layers
from gptforge.modelio.checkpoint import Checkpoint, write_checkpoint
from gptforge.nanogpt.config_file import MACHINE_FIELDS, map_names
from gptforge.nanogpt.data import GPT2_VOCAB, META, read_meta
from gptforge.tokenizer import GPT2Tokenizer, Tokenizer

_COMPILED_PREFIX = "_orig_mod."
_MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.bias$")  # not attn.c_attn.bias, a real parameter



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
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing: our line says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code in the pickle; RuntimeError etc. for a bad file
        text = str(e).strip()
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            why = f"it refers to {found.group(1)}"
        elif "WeightsUnpickler error" in text:  # what follows torch's preamble is the reason
            reason = one_line(text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0], 120)
            why = reason if zipfile.is_zipfile(path) else f"it is not an archive torch.save writes: {reason}"
        else:
            why = one_line(text.splitlines()[0] if text else repr(e), 120)
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
    # shapes only: no memory, no initialisation, and no more blocks built than the file holds
    want = {k: tuple(v.shape) for k, v in meta_model(cfg, stored_layers(sd)).state_dict().items()}
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
    if problem := path_problem(path, "file"):
        raise UserError(f"{path} {problem}")
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
    path = Path(path)
    ck = read_checkpoint(path)
    tok = _tokenizer_for(ck, data_dir_or_tokenizer, path)
    cfg, sd = ck.config, dict(ck.weights)
    if block_size is not None and block_size != cfg.block_size:
        if block_size > cfg.block_size:
            raise UserError(f"block_size {block_size} exceeds the {cfg.block_size} positions {path} learned; add "
                            f"--model.block_size {cfg.block_size} (or less) to train with the context it has")
        sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][:block_size]
    changes = {k: v for k, v in (("block_size", block_size), ("dropout", dropout), ("attention", attention))
               if v is not None}
    cfg = dataclasses.replace(cfg, **changes)
    model = GPT(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg, tok


def load_nanogpt_checkpoint(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                            data: Union[None, str, Path] = None):
    """`load_init` as a `gptforge.modelio.checkpoint.Checkpoint`, for `sample` and `eval` on a ckpt.pt."""
    ck = read_checkpoint(path)
    model, _, tok = load_init(path, data)
    return Checkpoint(model=model.to(device), tokenizer=tok, config=_run_config(ck, data), path=Path(path),
                      state={"source": str(path), "step": ck.iter_num, "best_val_loss": ck.best_val_loss})


def _run_config(ck: NanoCheckpoint, data: Union[None, str, Path]) -> RunConfig:
    """The run config a ckpt.pt was trained with, as far as it maps; the model from model_args (what the
    weights are), not from where it ran (device, dtype, compile), its data directory as nanoGPT finds it."""
    sections, _ = map_names(ck.train_config, strict=False)
    sections["train"] = {k: v for k, v in sections.get("train", {}).items() if k not in MACHINE_FIELDS}
    sections["model"] = dataclasses.asdict(ck.config)
    if data is not None:
        sections["data"] = {"dir": str(data)}
    return RunConfig.from_dict(sections)


def import_checkpoint(path: Union[str, Path], out_dir: Union[str, Path], *, data: Union[None, str, Path] = None,
                      overwrite: bool = False) -> dict[str, Any]:
    """`gptforge import ckpt.pt --out DIR`: write a nanoGPT checkpoint as a gptforge checkpoint directory
    (weights, the run config it was trained with as far as it maps, its tokenizer, step and best val loss).
    The optimizer state is not carried over: the result is for sampling, eval and --train.init_from."""
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


