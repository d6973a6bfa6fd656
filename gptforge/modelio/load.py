"""The one loader: every "what is this model source?" in gptforge is answered here, once.

A source is one of four kinds (`source_kind`):
  "hf"       a GPT-2 name (gpt2 ... gpt2-xl) or a local Hugging Face model directory  (gptforge.modelio.hf)
  "nanogpt"  a nanoGPT ckpt.pt, read with torch.load(weights_only=True)              (gptforge.nanogpt)
  "gguf"     a .gguf file of an architecture gptforge exports                         (gptforge.modelio.gguf)
  "run"      a gptforge run directory (its latest/ or best/) or checkpoint directory (gptforge.modelio.checkpoint);
             a LoRA run's checkpoint holds adapters only, and opens as its base model (loaded from the source it
             records, checked against the sha256 of its weights) with the adapters merged in (`open_run`)
and three things are done with one:
- `load(source, device, which, dtype)`: a ready model for inference (eval mode, on the device, on a CPU in the
  decode layout or, with dtype int8, in 8-bit weights) with its tokenizer and run config: what sample, chat,
  eval, HellaSwag and serve call;
- `load_init(source, tokenizer, ...)`: the weights a training run starts from (--train.init_from), in the
  layout training uses, with the model config they need;
- `import_model(source, out_dir, ...)`: the source written as a gptforge checkpoint (`gptforge import`).
`load_checkpoint` is `load` for gptforge checkpoints only (the Python API's entry).
This module sits above storage and the formats: they never import it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch

from gptforge import lora
from gptforge.config import GPTConfig
from gptforge.errors import UserError, one_line
from gptforge.model import GPT, grow_vocab
from gptforge.modelio import gguf, hf
from gptforge.modelio.checkpoint import (Checkpoint, is_adapter, load_model, open_checkpoint, read_adapter, read_config,
                                         read_state, resolve_checkpoint)
from gptforge.nanogpt import checkpoint as nanogpt
from gptforge.quantize import check_dtype, to_int8
from gptforge.tokenizer import Tokenizer, load_tokenizer

SourceKind = Literal["hf", "nanogpt", "gguf", "run"]
Source = Union[str, Path]


def source_kind(source: Source) -> SourceKind:
    """Which kind of model source `source` is. A name that is no local path goes to the Hugging Face loader
    only when it is a GPT-2 name; anything else that is not a ckpt.pt file is read as a gptforge run, whose
    loader says in one line what is wrong with it (missing, not a folder, no checkpoint inside)."""
    if hf.is_hf_source(source):
        return "hf"
    if str(source).endswith(".pt") and Path(source).is_file():
        return "nanogpt"
    if str(source).endswith(".gguf") and Path(source).is_file():
        return "gguf"
    return "run"


# ----------------------------------------------------------------------------------------------
# For inference


def use_decode_layout(model: torch.nn.Module) -> torch.nn.Module:
    """Keep the Linear weights that decoding reads faster transposed in memory, (in, out) row by row, with
    the same shape, values and names; returns the model. `load` applies it to every model it gives a CPU.

    Decoding one token multiplies a single row by every weight matrix, so its speed is the speed of
    reading the weights, and with MKL that depends on the layout (AMD EPYC, fp32, GB/s read by a one-row
    product, (out, in) vs (in, out) storage; F.linear, mv, addmv and addmm all alike):
    qkv 2304x768 10.5 vs 14.4, fc 3072x768 9.9 vs 15.1, head 50304x768 10.5 vs 13.8, but the MLP's
    768x3072 down-projection 14.5 vs 12.0, and 768x768 the same either way. So only weights with more
    outputs than inputs are transposed: GPT-2 124M decodes 24.2 tok/s so, 22.9 with every weight
    transposed and 19.2 with none (same run). Prefill is no slower and training still works (checkpoints
    are written contiguous); results can differ from the contiguous layout's in the last bits (MKL sums in
    another order: 4.8e-7 in a 10-token forward of a char model), so compare models in the same layout.
    Changing the layout costs a transposed copy of each weight (0.4 s for 124M, about ten decode steps),
    which is why `generate` does not do it per call: a caller's model is theirs.
    A tied embedding matrix is transposed with the output layer; a lookup reads a strided row, which costs
    microseconds for a few tokens.
    """
    with torch.no_grad():
        for module in model.modules():
            if (isinstance(module, torch.nn.Linear) and module.out_features > module.in_features
                    and module.weight.is_contiguous()):
                module.weight.data = module.weight.data.t().contiguous().t()  # (out, in) shape, (in, out) storage
    return model


def _ready(ck: Checkpoint, device: Union[str, torch.device], dtype: str = "auto") -> Checkpoint:
    """The loaded model on `device`, in eval mode, and on a CPU in the decode layout, or with `dtype` int8 its
    Linear weights in 8 bits (gptforge.quantize): the one place any loaded model is readied for inference."""
    ck.model.to(device).eval()
    if dtype == "int8":
        to_int8(ck.model)
    elif next(ck.model.parameters()).device.type == "cpu":
        use_decode_layout(ck.model)
    return ck


def load_checkpoint(path: Source, device: Union[str, torch.device] = "cpu", which: str = "latest",
                    dtype: str = "auto") -> Checkpoint:
    """A gptforge run directory (its `which` checkpoint: latest or best) or checkpoint directory, ready for
    inference on `device` (on a CPU in the decode layout; `dtype` int8: 8-bit weights); a LoRA run's as its
    base with the adapters merged."""
    check_dtype(dtype, torch.device(device))
    return _ready(open_run(path, which), device, dtype)


def open_run(path: Source, which: str = "latest") -> Checkpoint:
    """A gptforge run's `which` checkpoint, or a checkpoint directory, as stored (on the CPU, eval mode): for a
    LoRA run, its base model with the adapters merged in. What exports and inference read."""
    ckpt = resolve_checkpoint(path, which)
    return _open_adapter(ckpt) if is_adapter(ckpt) else open_checkpoint(ckpt)


# ----------------------------------------------------------------------------------------------
# LoRA: an adapter checkpoint and the base model it adapts


def base_identity(source: str, digest: str) -> dict[str, Any]:
    """What an adapter checkpoint records of its base (state.json's "base"): the source as given, its absolute
    path when it is a local file or folder (so the adapter opens from any working directory), and the sha256
    of its weights as loaded (`lora.weights_sha256`)."""
    local = Path(source).expanduser()
    return {"source": source, "path": str(local.resolve()) if local.exists() else None, "sha256": digest}


def base_source(recorded: dict[str, Any]) -> Optional[str]:
    """Where to load a recorded base from: its absolute path while it exists there, else the source as given."""
    path = recorded.get("path")
    return path if path and Path(path).exists() else recorded.get("source")


def check_base(digest: str, recorded: dict[str, Any], where: Path) -> None:
    """Refuse, in one line, a base whose weights are not those the adapters in `where` were trained on."""
    if digest != recorded.get("sha256"):
        raise UserError(f"the LoRA adapters in {where} were trained on {recorded.get('source')} with weights of sha256 "
                        f"{str(recorded.get('sha256'))[:16]}..., but {recorded.get('source')} now has {digest[:16]}...: "
                        "it changed since (trained further, re-imported, another download); use the exact base "
                        "the adapters were trained on")


def load_base(recorded: dict[str, Any], tokenizer: Optional[Tokenizer], where: Path, *, block_size: int, vocab_size: int,
              dropout: float = 0.0, attention: str = "sdpa") -> GPT:
    """The base model that the adapters in checkpoint `where` were trained on (state.json's "base"), checked
    against the sha256 it records, with the run's vocabulary rows (the chat markers' added after GPT-2's)."""
    source = base_source(recorded)
    if not source:
        raise UserError(f"{where} holds LoRA adapters but does not say which base model they adapt (state.json)")
    try:
        model, _, _ = load_init(source, tokenizer, block_size=block_size, dropout=dropout, attention=attention)
    except UserError as e:
        raise UserError(f"cannot open {source}, the base model of the LoRA adapters in {where}: {one_line(e)}") from None
    check_base(lora.weights_sha256(model), recorded, where)
    return grow_vocab(model, vocab_size)


def load_adapter(model: GPT, config, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Attach the adapters of `config.lora` to `model` and load their tensors (from checkpoint `where`)."""
    lora.attach(model, config.lora, lora.token_ids_of(tensors))
    own = {k[len(lora.PREFIX):]: v for k, v in tensors.items() if k.startswith(lora.PREFIX)}
    try:
        model.lora.load_state_dict(own, strict=True)
    except RuntimeError as e:
        raise UserError(f"the adapters in {where} do not fit the lora section of its config: "
                        f"{' '.join(str(e).strip().splitlines()[:2])}") from None


def _open_adapter(ckpt: Path, *, dropout: float = 0.0, attention: str = "sdpa") -> Checkpoint:
    state, config, tok = read_state(ckpt), read_config(ckpt), load_tokenizer(ckpt)
    tensors = read_adapter(ckpt)  # before the base: a damaged file fails fast
    model = load_base(state.get("base") or {}, tok, ckpt, block_size=config.model.block_size,
                      vocab_size=config.model.vocab_size, dropout=dropout, attention=attention)
    load_adapter(model, config, tensors, ckpt)
    return Checkpoint(model=lora.merge(model).eval(), tokenizer=tok, config=config, path=ckpt, state=state)


def load(source: Source, device: Union[str, torch.device] = "cpu", which: str = "latest",
         dtype: str = "auto") -> Checkpoint:
    """Any model source (see `source_kind`) as a `Checkpoint` ready for inference on `device`; `which` picks a
    run's latest or best checkpoint; `dtype` int8 (a CPU only) decodes with 8-bit Linear weights, auto as the
    model is."""
    check_dtype(dtype, torch.device(device))  # before any reading: a wrong flag fails at once
    kind = source_kind(source)
    if kind == "hf":
        return _ready(hf.load_pretrained_checkpoint(source), device, dtype)
    if kind == "nanogpt":
        return _ready(nanogpt.load_nanogpt_checkpoint(source), device, dtype)
    if kind == "gguf":
        return _ready(gguf.load_gguf_checkpoint(source), device, dtype)
    return _ready(open_run(source, which), device, dtype)


# ----------------------------------------------------------------------------------------------
# For training and import


def load_init(source: Source, tokenizer: Optional[Tokenizer] = None, *, block_size: Optional[int] = None,
              dropout: float = 0.0, attention: str = "sdpa") -> tuple[torch.nn.Module, GPTConfig, Tokenizer]:
    """The weights of --train.init_from as (model on the CPU, its config, its tokenizer). The shape is the
    source's; dropout and attention are this run's; block_size may shorten a GPT-2 or nanoGPT context (learned
    positions are cropped). `tokenizer` (the run's data tokenizer) lets a vocabulary-only ckpt.pt decode."""
    kind = source_kind(source)
    if kind == "hf":
        return hf.load_pretrained(source, "cpu", block_size=block_size, dropout=dropout, attention=attention)
    if kind == "nanogpt":
        return nanogpt.load_init(source, tokenizer, block_size=block_size, dropout=dropout, attention=attention)
    if kind == "gguf":
        return gguf.load_gguf(source, block_size=block_size, dropout=dropout, attention=attention)
    ckpt = resolve_checkpoint(source)
    if is_adapter(ckpt):  # a LoRA run: its base with the adapters merged
        model = _open_adapter(ckpt, dropout=dropout, attention=attention).model
        return model, model.config, load_tokenizer(ckpt)
    model_cfg = dataclasses.replace(read_config(ckpt).model, dropout=dropout, attention=attention)
    return load_model(ckpt, model_cfg), model_cfg, load_tokenizer(ckpt)


def import_model(source: Source, out_dir: Source, *, data: Optional[Source] = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """`gptforge import`: a nanoGPT ckpt.pt (with `data`, the nanoGPT data directory holding its meta.pkl), a
    GGUF file or a GPT-2 name / Hugging Face directory, written as a gptforge checkpoint in `out_dir`. The result
    says which (`kind`: "nanogpt", "gguf" or "hf") with what was written."""
    kind = source_kind(source)
    if kind == "nanogpt":
        return {"kind": "nanogpt", **nanogpt.import_checkpoint(source, out_dir, data=data, overwrite=overwrite)}
    if data is not None:
        raise UserError("--data applies to importing a nanoGPT ckpt.pt")
    if kind == "gguf":
        return {"kind": "gguf", **gguf.import_gguf(source, out_dir, overwrite=overwrite)}
    return {"kind": "hf", **hf.import_hf(source, out_dir, overwrite=overwrite)}
