"""GGUF out: a checkpoint as one file that llama.cpp, Ollama and LM Studio run (`gptforge export --to gguf`).

Written with `gguf`, the package llama.cpp publishes for its own converters (`pip install 'gptforge[gguf]'`).
Each rung of the ladder goes to the llama.cpp architecture whose graph computes exactly what ours does:
  learned positions, LayerNorm, GELU (any n_kv_head)    -> gpt2    (fused qkv; zero biases where we have none)
  RoPE, RMSNorm, SwiGLU                                  -> llama   (q/k rows re-ordered: see below)
  RoPE, RMSNorm, SwiGLU, QK-norm, no biases              -> qwen3   (its q/k norms are ours, before RoPE)
  RoPE, RMSNorm, squared-ReLU MLP, no biases             -> arcee
and anything else is refused in one line with the reason (`gguf_architecture`). RoPE: we rotate the pairs
(i, i + hs/2) of each head (HF's rotate_half); llama.cpp's llama and arcee graphs rotate (2i, 2i + 1), qwen3's
ours. So for llama and arcee the rows of q and k are re-ordered within each head, which rotates the same pairs
and leaves every q.k product as it was.
The tokenizer becomes llama.cpp's byte-level BPE (`tokenizer.ggml.model = gpt2`, GPT-2's pre-tokenizer),
token for token with our ids: GPT-2's ranks and merges, our own BPE's merges, and for a char vocabulary one
token per character with merges that build the multi-byte ones from their bytes (so encoding is lossless on
every text of the vocabulary's characters). End-of-text and the chat markers are control tokens; a chat model
carries the Jinja template of `hf_chat_template` and stops at <|end|> (EOS and EOT); padded vocabulary rows
are unused tokens. 1-D tensors (norms, biases) and the position table stay float32; f16/bf16 store the
matrices in that type; q8_0 quantizes them with the gguf package's quantizer (blocks of 32 along a row; a
matrix whose rows are not a multiple of 32 long stays f16, as llama.cpp's converter does).
The file also carries our exact config and tokenizer (gptforge.* keys, which llama.cpp ignores), so that
`read_gguf` gives back the model it was exported from; another tool's file of these four architectures is read
from llama.cpp's own keys (`load_gguf`, behind the loader's "gguf" kind and `gptforge import model.gguf`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from gptforge import __version__
from gptforge.config import GPTConfig, RunConfig
from gptforge.device import check_memory, format_bytes
from gptforge.errors import UserError, one_line
from gptforge.files import atomic_path, check_apart, check_output_dir, path_problem
from gptforge.modelio.checkpoint import (Checkpoint, model_from_state, model_state, open_checkpoint, read_config,
                                        resolve_checkpoint, write_checkpoint)
from gptforge.modelio.hf import (check_fits, exportable_with, first_unmapped, hf_chat_template, merges_from_ranks,
                                 rope_architecture)
from gptforge.tokenizer import EOT_TEXT, USER, Tokenizer, byte_level_spelling, tokenizer_from_dict

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
INSTALL_HINT = "pip install 'gptforge[gguf]'"
GGUF_MAGIC = b"GGUF"
# gptforge's own keys: the exact model config and tokenizer, so `gptforge import` of our file gives back our model
OWN_CONFIG, OWN_TOKENIZER = "gptforge.model_config", "gptforge.tokenizer"
_NO_COUNTERPART = {
    "value_embeds": "value embeddings have no counterpart in any llama.cpp architecture",
    "unet_skips": "U-net skip connections have no counterpart in any llama.cpp architecture",
    "logit_softcap": "llama.cpp soft-caps logits only in Gemma's architectures, whose blocks differ from ours "
                     "(scaled embeddings, norms after attention and MLP)",
}
_INTERLEAVED_ROPE = ("llama", "arcee")  # llama.cpp rotates (2i, 2i+1) in these; (i, i+hs/2) as we do in qwen3


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError(f"GGUF export needs the gguf package: {INSTALL_HINT}") from None
    return gguf


# ----------------------------------------------------------------------------------------------
# Architecture and tensors


def gguf_architecture(cfg: GPTConfig) -> str:
    """The llama.cpp architecture that computes exactly what `cfg` does (gpt2, llama, qwen3 or arcee), or a
    UserError naming what none of them computes (and the one-flag change that would give one that does)."""
    try:
        return _gguf_architecture(cfg)
    except UserError as e:
        raise UserError(f"cannot export to GGUF: {e}{exportable_with(cfg, _gguf_architecture)}") from None


def _gguf_architecture(cfg: GPTConfig) -> str:
    for name, why in _NO_COUNTERPART.items():
        if getattr(cfg, name) not in (None, False):
            raise UserError(f"model.{name}: {why}")
    if unmapped := first_unmapped(cfg, _NO_COUNTERPART):  # a rung added after this module: refuse, never drop it
        raise UserError(f"model.{unmapped} is not mapped to a llama.cpp architecture")
    if cfg.pos == "learned":
        why = [w for bad, w in ((cfg.norm != "layernorm", "rmsnorm with learned positions (gpt2 has layernorm)"),
                                (cfg.mlp not in ("gelu", "gelu_tanh"),
                                 f"a {cfg.mlp} MLP with learned positions (gpt2 has a gelu MLP)"),
                                (cfg.qk_norm, "qk_norm with learned positions (gpt2 has none)")) if bad]
        if why:
            raise UserError("; ".join(why))
        return "gpt2"
    arch, why = rope_architecture(cfg)
    if arch is None:
        raise UserError(why)
    if cfg.bias and arch != "llama":
        raise UserError(f"biases with {'qk_norm' if arch == 'qwen3' else 'a relu2 MLP'}: llama.cpp's {arch} "
                        "architecture has none (train with --model.bias false)")
    return arch


def _interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q or k (n_heads * hs, ...) re-ordered within each head from (i, i + hs/2) pairs to (2i, 2i + 1)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _block_tensors(cfg: GPTConfig, arch: str, i: int, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Block i's tensors under llama.cpp's names (blk.i.*)."""
    p, out = f"transformer.h.{i}.", {}
    get = lambda k: sd[p + k]  # noqa: E731
    zero = lambda n: torch.zeros(n, dtype=torch.float32)  # noqa: E731: gpt2 needs biases; zero computes none
    bias = lambda k, n: get(k) if cfg.bias else zero(n)  # noqa: E731
    C, hs, kv = cfg.n_embd, cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    if arch == "gpt2":
        out.update({"attn_norm.weight": get("ln_1.weight"), "attn_norm.bias": bias("ln_1.bias", C),
                    "attn_qkv.weight": get("attn.c_attn.weight"),
                    "attn_qkv.bias": bias("attn.c_attn.bias", cfg.n_head * hs + 2 * kv),
                    "attn_output.weight": get("attn.c_proj.weight"), "attn_output.bias": bias("attn.c_proj.bias", C),
                    "ffn_norm.weight": get("ln_2.weight"), "ffn_norm.bias": bias("ln_2.bias", C),
                    "ffn_up.weight": get("mlp.c_fc.weight"), "ffn_up.bias": bias("mlp.c_fc.bias", cfg.mlp_hidden),
                    "ffn_down.weight": get("mlp.c_proj.weight"), "ffn_down.bias": bias("mlp.c_proj.bias", C)})
        return {f"blk.{i}.{k}": v for k, v in out.items()}
    out.update({"attn_norm.weight": get("ln_1.weight"), "ffn_norm.weight": get("ln_2.weight")})
    for s in ("weight", "bias") if cfg.bias else ("weight",):
        q, k, v = get(f"attn.c_attn.{s}").split([cfg.n_head * hs, kv, kv])
        if arch in _INTERLEAVED_ROPE:
            q, k = _interleave(q, cfg.n_head), _interleave(k, cfg.n_kv_head)
        out.update({f"attn_q.{s}": q, f"attn_k.{s}": k, f"attn_v.{s}": v, f"attn_output.{s}": get(f"attn.c_proj.{s}"),
                    f"ffn_down.{s}": get(f"mlp.c_proj.{s}")})
        if cfg.mlp == "swiglu":
            out[f"ffn_gate.{s}"], out[f"ffn_up.{s}"] = get(f"mlp.c_fc.{s}").split([cfg.mlp_hidden] * 2)
        else:
            out[f"ffn_up.{s}"] = get(f"mlp.c_fc.{s}")
    if cfg.qk_norm:
        out.update({"attn_q_norm.weight": get("attn.q_norm.weight"), "attn_k_norm.weight": get("attn.k_norm.weight")})
    return {f"blk.{i}.{k}": v for k, v in out.items()}


def gguf_tensors(cfg: GPTConfig, arch: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict as llama.cpp's tensors for `arch`, float32, in our (out, in) layout: GGUF lists the
    dimensions fastest first, so an (out, in) array is llama.cpp's {in, out} matrix as it expects."""
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in sd.items()}
    out = {"token_embd.weight": sd["transformer.wte.weight"], "output_norm.weight": sd["transformer.ln_f.weight"]}
    if arch == "gpt2":
        out["position_embd.weight"] = sd["transformer.wpe.weight"]
        out["output_norm.bias"] = sd.get("transformer.ln_f.bias", torch.zeros(cfg.n_embd))
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        out.update(_block_tensors(cfg, arch, i, sd))
    return {k: v.contiguous() for k, v in out.items()}


def _stored(gguf, name: str, t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) of one tensor as stored for `dtype`."""
    a = t.numpy()
    Q = gguf.GGMLQuantizationType
    if dtype == "f32" or a.ndim == 1 or name == "position_embd.weight":
        return a, None
    if dtype == "bf16":
        return gguf.quants.quantize(a, Q.BF16), Q.BF16
    if dtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0
    return a.astype(np.float16), None


# ----------------------------------------------------------------------------------------------
# The tokenizer


def _char_merges(tok: Tokenizer) -> list[str]:
    """Merges that build each multi-byte character of a char vocabulary from its bytes, prefix by prefix
    (UTF-8 is prefix-free, so a merge can never join two characters); shorter prefixes first."""
    special = tok.special_ids()
    chains: list[list[str]] = []
    for i in range(tok.vocab_size):
        if i not in special:
            spelled = byte_level_spelling(tok.piece(i))
            chains.append([f"{spelled[:k]} {spelled[k]}" for k in range(1, len(spelled))])
    depth = max((len(c) for c in chains), default=0)
    merges = list(dict.fromkeys(c[k] for k in range(depth) for c in chains if k < len(c)))  # shared prefixes
    # llama.cpp refuses a BPE vocabulary without merges (an ASCII one has none): one between two words no
    # text's bytes can form, so it never applies
    return merges or [f"{EOT_TEXT} {EOT_TEXT}"]


def _merges(tok: Tokenizer) -> list[str]:
    """The BPE merges, "left right" in byte-level spelling, best first."""
    if tok.kind == "gpt2":
        pairs = merges_from_ranks(tok.tokens_by_rank())
        return [f"{byte_level_spelling(a)} {byte_level_spelling(b)}" for a, b in pairs]
    if tok.kind == "bpe":
        merges = tok.to_dict()["hf_tokenizer"]["model"]["merges"]
        return [m if isinstance(m, str) else " ".join(m) for m in merges]
    return _char_merges(tok)


def gguf_vocab(tok: Tokenizer, n_rows: int) -> dict[str, Any]:
    """llama.cpp's view of `tok` for a model of `n_rows` vocabulary rows: tokens, their types, merges and the
    special ids (bos, eos, eot), all by our ids."""
    from gguf import TokenType

    if tok.vocab_size > n_rows:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model only {n_rows} rows")
    special = tok.special_ids()
    tokens, types = [], []
    for i in range(tok.vocab_size):
        piece = tok.piece(i)
        tokens.append(piece.decode("utf-8") if i in special else byte_level_spelling(piece))
        types.append(TokenType.CONTROL if i in special else TokenType.NORMAL)
    eot = tok.eot_id
    if eot is None:  # a char vocabulary of one document: its first spare row stands in as end-of-text
        if n_rows == tok.vocab_size:
            raise UserError("cannot export to GGUF: the tokenizer has no end-of-text token and the model no "
                            "spare vocabulary row to hold one, and llama.cpp needs one to stop generating")
        eot = tok.vocab_size
    for i in range(tok.vocab_size, n_rows):
        tokens.append(EOT_TEXT if i == eot else f"[PAD{i}]")
        types.append(TokenType.CONTROL if i == eot else TokenType.UNUSED)
    chat = getattr(tok, "chat", None)
    return {"tokens": tokens, "types": types, "merges": _merges(tok),
            "bos": chat.bos_id if chat else eot, "eos": chat.end_id if chat else eot,
            "eot": chat.end_id if chat else None, "chat_template": hf_chat_template(tok) if chat else None,
            # llama.cpp stops at eos, eot, eom and tokens it knows by their text (<|end|>, <|endoftext|>): eom makes
            # <|user|> one too, where a model that runs on starts a turn of its own (gptforge stops at every marker)
            "eom": chat.ids[USER] if chat else None}


# ----------------------------------------------------------------------------------------------
# Writing


def _add_hparams(w, cfg: GPTConfig, arch: str) -> None:
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)


def _add_vocab(w, vocab: dict[str, Any]) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer regex: our BPE's ByteLevel uses the same
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    if vocab["eot"] is not None:
        w.add_eot_token_id(vocab["eot"])
    if vocab["eom"] is not None:
        w.add_eom_token_id(vocab["eom"])
    w.add_add_bos_token(False)  # GPT-2 starts with no token; a chat template writes its own <|bos|>
    w.add_add_eos_token(False)
    if vocab["chat_template"] is not None:
        w.add_chat_template(vocab["chat_template"])


def _check_out(out: Path, sources: tuple[Path, ...], overwrite: bool) -> None:
    """Refuse an output path that is a source, a folder, or an existing file without --overwrite; with it,
    only a GGUF file is replaced (never a file of another kind the user named by mistake)."""
    check_apart(out, sources)
    if out.is_dir():
        raise UserError(f"{out} is a folder; name the .gguf file to write (e.g. {out / 'model.gguf'})")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise UserError(f"{out} already exists; choose another path or pass --overwrite")
        if (problem := path_problem(out)) is not None:
            raise UserError(f"{out} {problem}")
        with open(out, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise UserError(f"{out} exists and is not a GGUF file; --overwrite replaces only a GGUF file")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if (problem := path_problem(parent, "folder")) is not None:
        raise UserError(f"cannot write {out}: {parent} {problem}")


def _write(gguf, path: Path, name: str, cfg: GPTConfig, arch: str, vocab: dict[str, Any], tok_dict: dict[str, Any],
           tensors: dict[str, torch.Tensor], dtype: str) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_description(f"exported by gptforge {__version__}")
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(w, cfg, arch)
    _add_vocab(w, vocab)
    w.add_string(OWN_CONFIG, json.dumps(dataclasses.asdict(cfg)))
    w.add_string(OWN_TOKENIZER, json.dumps(tok_dict))
    for tensor_name in list(tensors):
        data, raw = _stored(gguf, tensor_name, tensors.pop(tensor_name), dtype)
        w.add_tensor(tensor_name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export_gguf(run_or_checkpoint: str | Path, out: str | Path, *, which: str = "latest", dtype: str = "f32",
                overwrite: bool = False, opener: Callable[[Path], Checkpoint] = open_checkpoint) -> dict[str, Any]:
    """Write a checkpoint as one GGUF file for llama.cpp, Ollama and LM Studio (see the module docstring).
    Everything is checked (the path, the architecture, the tokenizer, memory) before anything is written, and
    the file appears whole or not at all. `opener` reads the checkpoint directory (see hf.export_hf)."""
    if dtype not in GGUF_TYPES:
        raise UserError(f"--dtype must be one of {', '.join(GGUF_TYPES)} for GGUF, got {dtype!r}")
    gguf = require_gguf()
    out = Path(out)
    ckpt = resolve_checkpoint(run_or_checkpoint, which)
    _check_out(out, (Path(run_or_checkpoint), ckpt), overwrite)
    cfg = read_config(ckpt).model
    arch = gguf_architecture(cfg)  # before a weight is read
    n = cfg.param_count()
    check_memory(n * (4 + {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 1}[dtype]), torch.device("cpu"),
                 f"converting this {n:,}-parameter model to GGUF", "export on a machine with more memory")
    ck = opener(ckpt)
    tok = ck.tokenizer
    vocab = gguf_vocab(tok, cfg.vocab_size)
    tensors = gguf_tensors(cfg, arch, model_state(ck.model))
    del ck
    own = ckpt.name.lstrip(".").removesuffix(".old") in ("latest", "best")  # a run's own checkpoint
    name = ckpt.resolve().parent.name if own else ckpt.resolve().name
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        _write(gguf, tmp, name, cfg, arch, vocab, tok.to_dict(), tensors, dtype)
    size = out.stat().st_size
    notes = ["llama.cpp's gpt2 computes GPT-2's tanh GELU where this model has the exact one; on a CPU it reads "
             "GELU from a float16 table: logits agree to about 5e-4 of the largest"] if cfg.mlp == "gelu" else []
    return {"path": str(out), "architecture": arch, "dtype": dtype, "bytes": size, "size": format_bytes(size),
            "vocab_size": cfg.vocab_size, "tokenizer": tok.kind, "chat": vocab["chat_template"] is not None,
            "notes": notes}


# ----------------------------------------------------------------------------------------------
# Reading a GGUF file back (`gptforge import model.gguf`, and any verb given a .gguf file, through the loader)


def _read_meta(r) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, f in r.fields.items():
        try:
            meta[key] = f.contents()
        except Exception:  # noqa: BLE001: a field this reader cannot render is one we do not read
            meta[key] = None
    return meta


def _tensor(gguf, t) -> torch.Tensor:
    """One tensor of a GGUFReader as float32 in our (out, in) layout (GGUF lists dimensions fastest first)."""
    shape = tuple(int(d) for d in reversed(t.shape))
    Q = gguf.GGMLQuantizationType
    if t.tensor_type in (Q.F32, Q.F16):
        data = np.array(t.data, dtype=np.float32)
    else:
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(data.reshape(shape)))


def _config_from_meta(meta: dict[str, Any], arch: str, tensors: dict[str, torch.Tensor]) -> GPTConfig:
    """Our config for a GGUF file written by another tool, from llama.cpp's hyperparameters; a UserError names
    what gptforge cannot compute."""
    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise UserError(f"cannot import this GGUF file: it has no {arch}.{name}")
        return value

    def f32(name: str, default: Optional[float] = None) -> float:  # stored as float32: its shortest decimal, 1e-5 not 9.99e-6
        return float(str(np.float32(key(name, default))))

    n_head, n_embd = int(key("attention.head_count")), int(key("embedding_length"))
    if isinstance(meta.get(f"{arch}.attention.head_count"), list) or int(key("expert_count", 0)):
        raise UserError("cannot import this GGUF file: per-layer head counts or experts (gptforge's blocks are alike)")
    for name in ("attention.key_length", "rope.dimension_count"):
        if arch != "gpt2" and int(key(name, n_embd // n_head)) != n_embd // n_head:
            raise UserError(f"cannot import this GGUF file: {arch}.{name} is not the head size n_embd / n_head "
                            "(partial rotary or wider heads)")
    if meta.get(f"{arch}.rope.scaling.type") not in (None, "none") or "rope_freqs.weight" in tensors:
        raise UserError("cannot import this GGUF file: RoPE scaling (gptforge's RoPE is plain)")
    common = dict(block_size=int(key("context_length")), n_layer=int(key("block_count")), n_head=n_head,
                  n_kv_head=int(key("attention.head_count_kv", n_head)), n_embd=n_embd,
                  mlp_hidden=int(key("feed_forward_length")), vocab_size=tensors["token_embd.weight"].shape[0],
                  tie_embeddings="output.weight" not in tensors, dropout=0.0)
    if arch == "gpt2":  # llama.cpp's gpt2 computes GPT-2's tanh GELU
        return GPTConfig(**common, norm_eps=f32("attention.layer_norm_epsilon"), mlp="gelu_tanh", bias=True)
    biases = [n for n in tensors if n.startswith("blk.") and n.endswith(".bias")]
    if arch != "llama" and biases:
        raise UserError(f"cannot import this GGUF file: {biases[0]} (gptforge's {arch} rung has no biases)")
    if biases and len(biases) != 7 * common["n_layer"]:  # q, k, v, output, gate, up, down
        raise UserError("cannot import this GGUF file: biases on some projections only (gptforge's bias is all or none)")
    return GPTConfig(**common, pos="rope", norm="rmsnorm", norm_eps=f32("attention.layer_norm_rms_epsilon"),
                     rope_theta=f32("rope.freq_base", 10000.0), mlp="relu2" if arch == "arcee" else "swiglu",
                     qk_norm=arch == "qwen3", bias=bool(biases))


def _block_state(cfg: GPTConfig, arch: str, i: int, g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `_block_tensors`: block i's tensors under our names."""
    get = lambda k: g[f"blk.{i}.{k}"]  # noqa: E731
    p, out = f"transformer.h.{i}.", {}
    suffixes = ("weight", "bias") if cfg.bias else ("weight",)
    if arch == "gpt2":
        pairs = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                 "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
        return {f"{p}{ours}.{s}": get(f"{theirs}.{s}") for ours, theirs in pairs.items() for s in suffixes}
    out.update({p + "ln_1.weight": get("attn_norm.weight"), p + "ln_2.weight": get("ffn_norm.weight")})
    for s in suffixes:
        q, k = get(f"attn_q.{s}"), get(f"attn_k.{s}")
        if arch in _INTERLEAVED_ROPE:
            q, k = _deinterleave(q, cfg.n_head), _deinterleave(k, cfg.n_kv_head)
        out[p + f"attn.c_attn.{s}"] = torch.cat([q, k, get(f"attn_v.{s}")])
        out[p + f"attn.c_proj.{s}"] = get(f"attn_output.{s}")
        up = [get(f"ffn_gate.{s}"), get(f"ffn_up.{s}")] if cfg.mlp == "swiglu" else [get(f"ffn_up.{s}")]
        out[p + f"mlp.c_fc.{s}"] = torch.cat(up)
        out[p + f"mlp.c_proj.{s}"] = get(f"ffn_down.{s}")
    if cfg.qk_norm:
        out.update({p + "attn.q_norm.weight": get("attn_q_norm.weight"), p + "attn.k_norm.weight": get("attn_k_norm.weight")})
    return out


def _deinterleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `_interleave`."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _state_from_gguf(cfg: GPTConfig, arch: str, g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {"transformer.wte.weight": g["token_embd.weight"], "transformer.ln_f.weight": g["output_norm.weight"]}
    if arch == "gpt2":
        sd["transformer.wpe.weight"] = g["position_embd.weight"]
        if cfg.bias:
            sd["transformer.ln_f.bias"] = g["output_norm.bias"]
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = g["output.weight"]
    for i in range(cfg.n_layer):
        sd.update(_block_state(cfg, arch, i, g))
    return sd


def _tokenizer_from_meta(meta: dict[str, Any], n_rows: int) -> Tokenizer:
    """A byte-level BPE (our bpe kind) from a GGUF file's tokens and merges: the kind llama.cpp's `gpt2` model
    with GPT-2's pre-tokenizer is. Control tokens become special added tokens; unused ones at the end are the
    model's padded rows."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    from gptforge.tokenizer import BPETokenizer

    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if model != "gpt2" or pre != "gpt-2":
        raise UserError(f"cannot import this GGUF file's tokenizer ({model}, pre-tokenizer {pre}): gptforge reads "
                        "byte-level BPE with GPT-2's pre-tokenizer (tokenizer.ggml.model gpt2, pre gpt-2)")
    tokens, types = meta.get("tokenizer.ggml.tokens") or [], meta.get("tokenizer.ggml.token_type") or []
    merges = meta.get("tokenizer.ggml.merges") or []
    used = next((i for i, t in enumerate(types) if t == 5), len(tokens))  # 5: unused (our padded rows)
    if (len(tokens) != len(types) or len(tokens) > n_rows or any(t != 5 for t in types[used:])
            or any(t not in (1, 3, 4) for t in types[:used])):  # normal, control, user-defined
        raise UserError("cannot import this GGUF file's tokenizer: its tokens are not normal and control tokens "
                        "followed by unused padding rows, as a byte-level BPE's are")
    vocab = {t: i for i, t in enumerate(tokens[:used])}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if bad := next((m for m, p in zip(merges, pairs) if len(p) != 2 or not {p[0], p[1], p[0] + p[1]} <= vocab.keys()),
                   None):  # the tokenizers library panics on such a merge
        raise UserError(f"cannot import this GGUF file's tokenizer: its merge {bad!r} joins or makes a token that "
                        "is not in its vocabulary")
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in range(used) if types[i] != 1])
    return BPETokenizer(json.loads(hf.to_str()))


def read_gguf(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer, bool]:
    """A GGUF file of the architectures gptforge exports as (config, float32 state dict, tokenizer, ours). A
    file gptforge wrote (ours) carries its exact config and tokenizer (gptforge.* keys); another tool's is read
    from llama.cpp's hyperparameters and vocabulary. q8_0/f16/bf16 weights are widened to float32."""
    gguf = require_gguf()
    if (problem := path_problem(path)) is not None:
        raise UserError(f"{path} {problem}")
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001: a truncated or foreign file, in one line
        raise UserError(f"{path} is not a readable GGUF file: {one_line(e, 200, with_type=True)}") from None
    meta = _read_meta(r)
    arch = meta.get("general.architecture")
    if arch not in ("gpt2", "llama", "qwen3", "arcee"):
        raise UserError(f"cannot import the {arch} architecture from GGUF: gptforge reads gpt2, llama, qwen3 "
                        "and arcee, the ones it exports")
    n = sum(int(np.prod([int(d) for d in t.shape])) for t in r.tensors)
    check_memory(2 * 4 * n, torch.device("cpu"), f"reading {path} ({n:,} weights, widened to float32, then the model)",
                 "use a machine with more memory")
    try:
        tensors = {t.name: _tensor(gguf, t) for t in r.tensors}
    except (ValueError, NotImplementedError) as e:
        raise UserError(f"cannot read the tensors of {path}: {one_line(e, 200)}") from None
    cfg, tok = _config_and_tokenizer(path, meta, arch, tensors)
    if cfg.pos == "rope" and 2 * 4 * cfg.block_size * cfg.head_dim > max(16 * n, 1 << 30):  # RoPE tables
        raise UserError(f"{path} asks for a context of {cfg.block_size:,} tokens, whose RoPE tables alone would "
                        f"outweigh its {n:,} weights many times; is it corrupt?")
    try:
        sd = _state_from_gguf(cfg, arch, tensors)
    except KeyError as e:
        raise UserError(f"cannot import {path}: tensor {e.args[0]} is missing") from None
    check_fits(cfg, sd)
    return cfg, sd, tok, OWN_CONFIG in meta


def _config_and_tokenizer(path, meta: dict[str, Any], arch: str,
                          tensors: dict[str, torch.Tensor]) -> tuple[GPTConfig, Tokenizer]:
    """Our config and tokenizer of a GGUF file: its gptforge.* keys, or else llama.cpp's; UserError otherwise."""
    if OWN_CONFIG in meta:
        try:
            cfg = GPTConfig(**json.loads(meta[OWN_CONFIG]))
            tok = tokenizer_from_dict(json.loads(meta[OWN_TOKENIZER]))
        except (TypeError, ValueError, KeyError) as e:
            raise UserError(f"{path}: its gptforge config or tokenizer cannot be read: {one_line(e, 200)}") from None
        if gguf_vocab(tok, cfg.vocab_size)["tokens"] != meta.get("tokenizer.ggml.tokens"):
            raise UserError(f"{path}: its gptforge tokenizer disagrees with its token list; was it edited?")
    else:
        try:
            cfg = _config_from_meta(meta, arch, tensors)
        except KeyError as e:
            raise UserError(f"cannot import {path}: tensor {e.args[0]} is missing") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"cannot import {path}: a hyperparameter is malformed ({one_line(e, 120)})") from None
        tok = _tokenizer_from_meta(meta, cfg.vocab_size)
    if gguf_architecture(cfg) != arch:
        raise UserError(f"{path}: its gptforge config is not a {arch} model")
    return cfg, tok


def load_gguf(path: str | Path, *, block_size: Optional[int] = None, dropout: float = 0.0,
              attention: str = "sdpa") -> tuple[torch.nn.Module, GPTConfig, Tokenizer]:
    """A GGUF file (see `read_gguf`) as our GPT on the CPU (eval mode, float32), its config and tokenizer. As for
    the source it was exported from, a file gptforge wrote keeps its own block_size (as a run does for
    --train.init_from); in another tool's, block_size may shorten the context (learned positions are cut)."""
    cfg, sd, tok, ours = read_gguf(path)
    model = model_from_state(cfg, sd, block_size=None if ours else block_size, dropout=dropout, attention=attention)
    return model, model.config, tok


def load_gguf_checkpoint(path: str | Path) -> Checkpoint:
    """`load_gguf` as a `Checkpoint`, for the loader (sample, chat, eval, serve)."""
    model, cfg, tok = load_gguf(path)
    return Checkpoint(model=model, tokenizer=tok, config=RunConfig(model=cfg), path=Path(path),
                      state={"source": str(path)})


def import_gguf(path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """`gptforge import model.gguf --out CKPT`: the file as a gptforge checkpoint directory."""
    out = Path(out_dir)
    check_output_dir(out, overwrite, (Path(path),))
    cfg, sd, tok, _ = read_gguf(path)
    write_checkpoint(out, sd, RunConfig(model=cfg), tok, {"step": 0, "source": str(path), "imported_from": "gguf"},
                     keep_other_files=True)
    return {"path": str(out), "source": str(path), "architecture": gguf_architecture(cfg),
            "model": dataclasses.asdict(cfg), "tokenizer": tok.kind, "vocab_size": cfg.vocab_size,
            "tokenizer_vocab_size": tok.vocab_size}
