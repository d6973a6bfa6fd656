"""Hugging Face interop: GPT-2 and Llama-family weights in, `transformers` model directories out.

This module owns the translation between our `GPT` and four `transformers` architectures:
  classic block (learned positions, LayerNorm, GELU, n_kv_head == n_head)  <->  GPT2LMHeadModel
  modern block (RoPE, RMSNorm, SwiGLU, any n_kv_head)                        <->  LlamaForCausalLM
  the modern block with QK-norm (no biases)                                  <->  Qwen3ForCausalLM
  RoPE, RMSNorm, a squared-ReLU MLP, no QK-norm                              <->  ArceeForCausalLM
- `load_pretrained(name_or_dir)`: a GPT-2 name (gpt2 ... gpt2-xl), a hub id or a local HF directory as
  (GPT, GPTConfig, Tokenizer); what `train --init-from` and `sample gpt2` use.
- `import_hf(src, out_dir)`: the same, written as a gptforge checkpoint directory.
- `export_hf(run_or_checkpoint, out_dir)`: a checkpoint as a `transformers` directory (safetensors).
Mapping notes. GPT-2 keeps its weights in Conv1D layers, (in, out): the transpose of nn.Linear; our
parameter names are GPT-2's, so that transpose is the whole conversion. Llama keeps q/k/v and gate/up
apart where we fuse them (c_attn = [q | k | v], c_fc = [gate | up]); both rotate the pairs (i, i + hs/2)
of each head (`rotate_half`), so the projections map row for row with no permutation.
Vocabulary sizes are never changed: an imported model keeps the HF vocabulary exactly (padding GPT-2's
50257 with zero rows would give the padded ids logit 0 and change the loss), and an export keeps our
padded one so HF computes the same logits and loss; `generation_config.json` suppresses the padded ids.
`transformers` is an optional extra (`pip install 'gptforge[hf]'`), imported only inside functions.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import urllib.parse
from pathlib import Path
from collections.abc import Collection
from typing import Any, Callable, Optional

import torch

from gptforge import __version__, network
from gptforge.chat_template import MARKERS
from gptforge.config import GPTConfig, RunConfig
from gptforge.errors import UserError, one_line
from gptforge.files import check_output_dir, path_problem
from gptforge.model import meta_model, stored_layers
from gptforge.modelio.checkpoint import (Checkpoint, model_from_state, model_state, open_checkpoint,
                                        resolve_checkpoint, umask_mode, write_checkpoint, write_dir_atomically)
from gptforge.tokenizer import (EOT_TEXT, BPETokenizer, GPT2Tokenizer, Tokenizer, byte_level_spelling,
                                load_tokenizer)

GPT2_HUB_IDS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
OWN_TOKENIZER = "gptforge_tokenizer.json"  # our tokenizer, complete, next to the HF files of an export
INSTALL_HINT = "pip install 'gptforge[hf]'"
_HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", OWN_TOKENIZER]
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
MAPPED_FIELDS = {"block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden", "dropout", "bias",
           "pos", "rope_theta", "norm", "norm_eps", "mlp", "qk_norm", "tie_embeddings", "attention",
           "zero_init_proj"}  # GPTConfig fields (zero_init_proj only sets the initial weights)
_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(f"Hugging Face interop needs the transformers package: {INSTALL_HINT}") from None
    return transformers


# ----------------------------------------------------------------------------------------------
# Where the weights are


def hub_id(name: str) -> str:
    """The hub repository of a model name: gpt2 -> openai-community/gpt2 (the ids transformers 5 uses)."""
    return GPT2_HUB_IDS.get(name, name)


def is_hf_source(name_or_dir: str | Path) -> bool:
    """True for a GPT-2 name that is not a local path, or a local directory holding an HF config.json
    (`sample` and `eval` use this to tell GPT-2 and HF directories from gptforge runs, with no imports)."""
    p = Path(name_or_dir)
    if p.is_dir():
        try:
            return "model_type" in json.loads((p / "config.json").read_text())
        except (OSError, ValueError, TypeError):
            return False
    return not p.exists() and str(name_or_dir) in GPT2_HUB_IDS


# names that only a file could have: model files, not hub repositories
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json", ".gguf")


def _looks_local(name: str) -> bool:
    """A path, not a hub id: absolute, relative with ./ ../ or ~, more than OWNER/NAME deep, or a file name."""
    return (name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.count("/") > 1
            or os.sep != "/" and os.sep in name or Path(name).suffix.lower() in _FILE_SUFFIXES)


def resolve_hf_source(name_or_dir: str | Path) -> Path:
    """A local HF model directory: the directory itself, or the hub files of a name, downloaded once
    into the Hugging Face cache (weights, config and tokenizer only)."""
    p = Path(name_or_dir)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{p} is not a Hugging Face model directory (no config.json)")
        return p
    repo, problem = hub_id(str(name_or_dir)), path_problem(p, "folder")
    if os.path.lexists(p) and problem != "does not exist":  # there, but not a folder: a path, never a download
        raise UserError(f"{name_or_dir} {problem}")
    if _looks_local(str(name_or_dir)) or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise UserError(f"{name_or_dir} is neither a local directory nor a model name "
                        f"({', '.join(GPT2_HUB_IDS)}, or OWNER/NAME on the Hugging Face hub)")
    if importlib.util.find_spec("transformers") is None:  # the hint, without the second an import costs
        require_transformers()
    where = "" if str(name_or_dir) in GPT2_HUB_IDS else f"{name_or_dir} is not a local directory, and "
    return _hub_snapshot(repo, where)


def _hub_snapshot(repo: str, where: str) -> Path:
    """`repo`'s files in the Hugging Face cache: fetched when the hub answers, the cached copy when it does
    not (asked first and briefly: offline, huggingface_hub waits on DNS and retries for 10-15 s)."""
    from huggingface_hub import constants, snapshot_download

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    if constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE=1 in the environment
        offline = "HF_HUB_OFFLINE is set"
    else:
        offline = "" if network.reachable(host) else f"{host} cannot be reached (no network?)"
    try:
        return Path(snapshot_download(repo, allow_patterns=_HUB_FILES, local_files_only=bool(offline)))
    except Exception as e:
        raise UserError(where + _hub_failure(e, repo, host, offline)) from None


def _hub_failure(e: Exception, repo: str, host: str, offline: str) -> str:
    """Our sentence for a failed hub download: what was tried and what to do (the library's run to
    hundreds of characters and name its internals)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    local = "pass a local directory saved with save_pretrained instead"
    once = (f"download it once with network (later runs, HF_HUB_OFFLINE=1 ones too, use that copy), or {local}")
    if offline:
        return (f"cannot download {repo} from the Hugging Face hub: {offline}, and the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}) holds no copy of it; {once}")
    if isinstance(e, GatedRepoError):
        return (f"{repo} is gated on the Hugging Face hub: accept its terms on {constants.ENDPOINT}/{repo} and "
                f"log in with `hf auth login`, or {local}")
    if isinstance(e, RepositoryNotFoundError):
        return f"there is no model {repo} on the Hugging Face hub (or it is private: log in with `hf auth login`)"
    if isinstance(e, LocalEntryNotFoundError):  # the hub answered the check, then the connection failed
        return f"the connection to {host} failed while downloading {repo} ({type(e).__name__}); {once}"
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        return f"the Hugging Face hub refused the download of {repo} (HTTP {status}); try again later, or {local}"
    if isinstance(e, OSError) and e.strerror:  # disk full, no permission: the cache, not the hub
        return (f"cannot write {repo} into the Hugging Face cache {constants.HF_HUB_CACHE} ({e.strerror}); "
                f"set HF_HOME to a folder with room, or {local}")
    return f"cannot download {repo} from the Hugging Face hub ({one_line(e, with_type=True)}); {local}"


# ----------------------------------------------------------------------------------------------
# Architecture and weight names


def first_unmapped(cfg: GPTConfig, also: Collection[str] = ()) -> Optional[str]:
    """The first GPTConfig field off its default that neither MAPPED_FIELDS nor `also` covers: a rung an exporter
    written before it was added would silently drop."""
    return next((f.name for f in dataclasses.fields(cfg)
                 if f.name not in MAPPED_FIELDS and f.name not in also and getattr(cfg, f.name) != f.default), None)


# the RoPE blocks transformers and llama.cpp both compute: (mlp, qk_norm) -> architecture
ROPE_FAMILY = {("swiglu", False): "llama", ("swiglu", True): "qwen3", ("relu2", False): "arcee"}
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "arcee": "ArceeForCausalLM"}
# one-field changes tried when a model cannot be exported, to say which flag gives one that can
_NEAR_CHANGES = (("qk_norm", False), ("mlp", "swiglu"), ("mlp", "relu2"), ("mlp", "gelu"), ("norm", "rmsnorm"),
                 ("norm", "layernorm"), ("bias", False), ("n_kv_head", None))


def rope_architecture(cfg: GPTConfig) -> tuple[Optional[str], str]:
    """The architecture (llama, qwen3 or arcee) computing `cfg`'s RoPE block, or (None, why none does)."""
    if cfg.norm != "rmsnorm":
        return None, "rope with layernorm (Llama, Qwen3 and Arcee have rmsnorm)"
    arch = ROPE_FAMILY.get((cfg.mlp, cfg.qk_norm))
    if arch is None:
        what = "qk_norm with a relu2 MLP" if cfg.mlp == "relu2" else f"rope with a {cfg.mlp} MLP"
        return None, f"{what}: no architecture computes it (llama has swiglu, qwen3 swiglu with qk_norm, arcee " \
                     "relu2 without qk_norm)"
    return arch, ""


def exportable_with(cfg: GPTConfig, architecture: Callable[[GPTConfig], str]) -> str:
    """'; a model trained with --model.qk_norm false (arcee) would export': the one-flag changes that give a model
    `architecture` accepts, to end a refusal with ('' when none does). A different model: it must be trained."""
    found = []
    for field, value in _NEAR_CHANGES:
        value = cfg.n_head if field == "n_kv_head" else value
        if getattr(cfg, field) == value:
            continue
        try:
            arch = architecture(dataclasses.replace(cfg, **{field: value}))
        except UserError:
            continue
        found.append(f"--model.{field} {str(value).lower()} ({arch})")
    return f"; a model trained with {' or '.join(found)} would export" if found else ""


def hf_architecture(cfg: GPTConfig) -> str:
    """'gpt2', 'llama', 'qwen3' or 'arcee': the `transformers` architecture that computes exactly what `cfg`
    does, or a UserError naming what has no counterpart there (and the one-flag change that would have one)."""
    if unmapped := first_unmapped(cfg):  # a rung added to the ladder after this module was written: refuse it
        raise UserError(f"cannot export to Hugging Face: model.{unmapped} is not mapped to transformers")
    arch, why = _hf_architecture(cfg)
    if arch is None:
        raise UserError(f"cannot export to Hugging Face: {why}{exportable_with(cfg, _hf_or_refuse)}")
    return arch


def _hf_or_refuse(cfg: GPTConfig) -> str:
    arch, why = _hf_architecture(cfg)
    if arch is None or first_unmapped(cfg):
        raise UserError(why)
    return arch


def _hf_architecture(cfg: GPTConfig) -> tuple[Optional[str], str]:
    if cfg.pos == "learned":
        why = [w for bad, w in ((cfg.norm != "layernorm", "rmsnorm with learned positions (GPT-2 has layernorm)"),
                                (cfg.mlp not in ("gelu", "gelu_tanh"),
                                 f"{cfg.mlp} with learned positions (GPT-2 has a gelu MLP)"),
                                (cfg.qk_norm, "qk_norm with learned positions (GPT-2 has none)"),
                                (cfg.n_kv_head != cfg.n_head, "grouped-query attention with learned positions "
                                 "(GPT-2 has n_kv_head == n_head)")) if bad]
        return (None, "; ".join(why)) if why else ("gpt2", "")
    arch, why = rope_architecture(cfg)
    if arch == "qwen3" and cfg.bias:
        return None, "biases with qk_norm (Qwen3's MLP has none; train with --model.bias false)"
    return arch, why


def _gpt2_keys(cfg: GPTConfig) -> list[str]:
    """GPT2LMHeadModel's tensors; ours have the same names (biases only with cfg.bias)."""
    keys = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(cfg.n_layer):
        for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            keys += [f"transformer.h.{i}.{m}.weight", f"transformer.h.{i}.{m}.bias"]
    keys += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    return keys + ([] if cfg.tie_embeddings else ["lm_head.weight"])


def _llama_pairs(cfg: GPTConfig) -> list[tuple[str, list[str]]]:
    """(our key, Llama/Qwen3/Arcee keys): one key, or the parts our fused tensor concatenates on dim 0."""
    pairs = [("transformer.wte.weight", ["model.embed_tokens.weight"])]
    fc = [f"mlp.{x}_proj" for x in (("gate", "up") if cfg.mlp == "swiglu" else ("up",))]
    for i in range(cfg.n_layer):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        pairs += [(ours + "ln_1.weight", [hf + "input_layernorm.weight"]),
                  (ours + "ln_2.weight", [hf + "post_attention_layernorm.weight"])]
        if cfg.qk_norm:
            pairs += [(ours + f"attn.{x}_norm.weight", [hf + f"self_attn.{x}_norm.weight"]) for x in "qk"]
        for s in ("weight", "bias") if cfg.bias else ("weight",):
            pairs += [(ours + f"attn.c_attn.{s}", [hf + f"self_attn.{x}_proj.{s}" for x in "qkv"]),
                      (ours + f"attn.c_proj.{s}", [hf + f"self_attn.o_proj.{s}"]),
                      (ours + f"mlp.c_fc.{s}", [hf + f"{x}.{s}" for x in fc]),
                      (ours + f"mlp.c_proj.{s}", [hf + f"mlp.down_proj.{s}"])]
    pairs.append(("transformer.ln_f.weight", ["model.norm.weight"]))
    return pairs + ([] if cfg.tie_embeddings else [("lm_head.weight", ["lm_head.weight"])])


def _to_ours(cfg: GPTConfig, arch: str, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if arch == "gpt2":
        keys = [k for k in _gpt2_keys(cfg) if cfg.bias or not k.endswith(".bias")]
        return {k: hf[k].t().contiguous() if k.endswith(_CONV1D) else hf[k] for k in keys}
    return {ours: torch.cat([hf[k] for k in parts]) for ours, parts in _llama_pairs(cfg)}


def _to_hf(cfg: GPTConfig, arch: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if arch == "gpt2":
        for k in _gpt2_keys(cfg):
            if k in sd:
                out[k] = sd[k].t().contiguous() if k.endswith(_CONV1D) else sd[k].contiguous()
            else:  # bias=False: a zero bias computes the same as none
                out[k] = torch.zeros(sd[k[:-len("bias")] + "weight"].shape[0], dtype=sd["transformer.wte.weight"].dtype)
        return out
    hs, kv = cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for ours, parts in _llama_pairs(cfg):
        sizes = {1: [sd[ours].shape[0]], 2: [cfg.mlp_hidden] * 2, 3: [cfg.n_head * hs, kv, kv]}[len(parts)]
        out.update({k: t.contiguous() for k, t in zip(parts, sd[ours].split(sizes))})
    return out


def check_fits(cfg: GPTConfig, sd: dict[str, torch.Tensor]) -> None:
    """The converted tensors have exactly the names and shapes of GPT(cfg) (built on the meta device: free)."""
    ref = meta_model(cfg, stored_layers(sd)).state_dict()
    if cfg.tie_embeddings:
        ref.pop("lm_head.weight")
    bad = sorted(set(ref) ^ set(sd)) + [k for k in ref if k in sd and ref[k].shape != sd[k].shape]
    if bad:
        raise UserError(f"the Hugging Face weights do not fit the model of their config (first mismatch: {bad[0]})")


# ----------------------------------------------------------------------------------------------
# Configs


def _config_from_hf(c: Any) -> tuple[GPTConfig, str]:
    """Our GPTConfig for a transformers config object, or a UserError naming what we cannot compute."""
    def refuse(why: str):
        raise UserError(f"cannot import this {c.model_type} model: {why}")

    if c.model_type == "gpt2":
        mlp = _GPT2_ACT.get(c.activation_function) or refuse(f"activation_function {c.activation_function!r}")
        if c.scale_attn_by_inverse_layer_idx or not c.scale_attn_weights or c.add_cross_attention:
            refuse("its attention scaling or cross-attention differs from GPT-2's")
        cfg = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                        n_embd=c.n_embd, mlp_hidden=c.n_inner or 4 * c.n_embd, bias=True, pos="learned",
                        norm="layernorm", norm_eps=c.layer_norm_epsilon, mlp=mlp,
                        tie_embeddings=bool(c.tie_word_embeddings))
        return cfg, "gpt2"
    if c.model_type in ("llama", "qwen3", "arcee"):
        return _rope_config_from_hf(c, refuse), c.model_type
    raise UserError(f"cannot import model_type {c.model_type!r}: gptforge reads GPT-2 (gpt2), Llama (llama), "
                    "Qwen3 (qwen3) and Arcee (arcee) models")


def _rope_config_from_hf(c: Any, refuse: Callable[[str], Any]) -> GPTConfig:
    """A Llama, Qwen3 or Arcee config as ours: the RoPE block, with qk_norm (Qwen3) or a relu2 MLP (Arcee)."""
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0),
                                                   **(getattr(c, "rope_scaling", None) or {})}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse(f"rope_type {rope.get('rope_type')!r} (only plain RoPE, rope_type 'default', is supported)")
    act = "relu2" if c.model_type == "arcee" else "silu"
    if c.hidden_act != act:
        refuse(f"hidden_act {c.hidden_act!r} (its MLP needs {act})")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        refuse("head_dim * num_attention_heads != hidden_size")
    if bool(c.attention_bias) != bool(getattr(c, "mlp_bias", False)):
        refuse("attention_bias and mlp_bias differ (gptforge's bias covers both)")
    if getattr(c, "use_sliding_window", False):
        refuse("sliding-window attention (gptforge attends to the whole context)")
    return GPTConfig(block_size=c.max_position_embeddings, vocab_size=c.vocab_size, n_layer=c.num_hidden_layers,
                     n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads or c.num_attention_heads,
                     n_embd=c.hidden_size, mlp_hidden=c.intermediate_size, bias=bool(c.attention_bias),
                     pos="rope", rope_theta=float(rope["rope_theta"]), norm="rmsnorm", norm_eps=c.rms_norm_eps,
                     mlp="relu2" if c.model_type == "arcee" else "swiglu", qk_norm=c.model_type == "qwen3",
                     tie_embeddings=bool(c.tie_word_embeddings))


def _hf_config(cfg: GPTConfig, arch: str, eot_id: Optional[int]):
    tf = require_transformers()
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eot_id,
                  eos_token_id=eot_id, pad_token_id=None)
    if arch == "gpt2":
        extra = {} if cfg.bias else {"gptforge": {"bias": False}}  # tells import_hf the zero biases are "none"
        # n_ctx: transformers 5 no longer writes it, but readers older than it still need it (llama.cpp's
        # convert_hf_to_gguf.py stops with KeyError: 'n_ctx' without it)
        return tf.GPT2Config(architectures=["GPT2LMHeadModel"], n_positions=cfg.block_size, n_ctx=cfg.block_size,
                             n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.mlp_hidden,
                             activation_function="gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
                             layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                             attn_pdrop=cfg.dropout, **common, **extra)
    # rope_theta as a keyword: transformers 5 files it under rope_parameters, 4.x kept it as is
    rope = dict(architectures=[HF_CLASSES[arch]], hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, attention_bias=cfg.bias, attention_dropout=cfg.dropout, **common)
    if arch == "qwen3":  # no MLP biases (hf_architecture refuses biases here), no sliding window
        return tf.Qwen3Config(hidden_act="silu", use_sliding_window=False, **rope)
    if arch == "arcee":
        return tf.ArceeConfig(hidden_act="relu2", mlp_bias=cfg.bias, **rope)
    return tf.LlamaConfig(hidden_act="silu", mlp_bias=cfg.bias, **rope)


# ----------------------------------------------------------------------------------------------
# Tokenizers


def _gpt2_vocab(tok: GPT2Tokenizer) -> tuple[dict[str, int], list[bytes]]:
    """GPT-2's vocabulary in HF's byte-level spelling, from the ranks our tokenizer embeds."""
    tokens = tok.tokens_by_rank()
    return {byte_level_spelling(t): rank for rank, t in enumerate(tokens)}, tokens


def merges_from_ranks(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The merge that made each multi-byte token, in rank order: BPE over its bytes with only the
    lower-ranked tokens stops at exactly two parts (tiktoken stores ranks, HF wants merges)."""
    rank = {t: r for r, t in enumerate(tokens)}
    merges = []
    for r, t in enumerate(tokens):
        if len(t) < 2:
            continue
        parts = [t[i:i + 1] for i in range(len(t))]
        while len(parts) > 2:
            i = min(range(len(parts) - 1), key=lambda j: rank.get(parts[j] + parts[j + 1], len(tokens)))
            if rank.get(parts[i] + parts[i + 1], len(tokens)) >= r:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise UserError(f"cannot derive a BPE merge for token {r}; the tokenizer's ranks are not BPE ranks")
        merges.append((parts[0], parts[1]))
    return merges


def gpt2_hf_tokenizer_json(tok: GPT2Tokenizer) -> str:
    """A `tokenizers` JSON equal to GPT-2's HF tokenizer, built from our embedded ranks (no network)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

    vocab, tokens = _gpt2_vocab(tok)
    vocab[EOT_TEXT] = tok.eot_id  # in the vocabulary too, as in OpenAI's encoder.json
    spell = byte_level_spelling
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(spell(a), spell(b)) for a, b in merges_from_ranks(tokens)]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # its regex is GPT-2's pattern
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.add_special_tokens([AddedToken(EOT_TEXT, special=True)])  # id 50256, right after the ranks
    if tok.chat is not None:  # the chat markers, in GPT-2's padded slots 50257.. as in our tokenizer
        hf.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in MARKERS])
        if any(hf.token_to_id(m) != i for m, i in tok.chat.ids.items()):
            raise RuntimeError("the exported chat markers do not have our ids")  # a bug of ours, not the user's
    return hf.to_str()


def hf_chat_template(tok: Tokenizer) -> str:
    """The Jinja chat template of transformers' apply_chat_template: the same layout, so the same ids, as
    gptforge.chat_template.render_conversation (markers as text, which the HF tokenizer reads as its
    special tokens; with add_generation_prompt, the <|assistant|> a reply continues). One difference no template
    can remove: transformers reads a marker typed inside a message as the marker, gptforge as plain text."""
    t = {m.strip("<|>"): m for m in tok.chat.ids}
    return ("{{ '" + t["bos"] + "' }}"
            "{% for message in messages %}"
            "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('roles are system, user and assistant, not ' + message['role']) }}{% endif %}"
            "{{ '<|' + message['role'] + '|>' + message['content'] + '" + t["end"] + "' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '" + t["assistant"] + "' }}{% endif %}")


def _hf_tokenizer_json(src: Path) -> Optional[dict[str, Any]]:
    """The directory's tokenizer as `tokenizers` JSON: tokenizer.json, or vocab.json + merges.txt (GPT-2's layout)."""
    if (src / "tokenizer.json").is_file():
        return json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        hf = HFTokenizer(models.BPE.from_file(str(src / "vocab.json"), str(src / "merges.txt")))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        return json.loads(hf.to_str())
    return None


def _is_byte_level_bpe(j: dict[str, Any]) -> bool:
    def types(node) -> list[str]:
        if not node:
            return []
        subs = node.get("pretokenizers", node.get("decoders", []))  # a Sequence's members
        return [node.get("type")] + [t for sub in subs for t in types(sub)]
    return (j.get("model", {}).get("type") == "BPE" and not j["model"].get("byte_fallback")
            and "ByteLevel" in types(j.get("pre_tokenizer")) and "ByteLevel" in types(j.get("decoder")))


def _looks_like_gpt2(j: dict[str, Any]) -> bool:
    ids = {**j["model"]["vocab"], **{t["content"]: t["id"] for t in j.get("added_tokens", [])}}
    if len(ids) != 50257 or ids.get(EOT_TEXT) != 50256:  # cheap: only then ask tiktoken for the real thing
        return False
    vocab, _ = _gpt2_vocab(GPT2Tokenizer())
    return all(ids.get(s) == r for s, r in vocab.items())


def _tokenizer_from_hf(src: Path, cfg: GPTConfig, arch: str) -> Tokenizer:
    """gptforge's own tokenizer if we exported this directory; GPT-2's (tiktoken) for GPT-2's vocabulary;
    any other byte-level BPE wrapped as our bpe kind; anything else refused."""
    if (src / OWN_TOKENIZER).is_file():
        return load_tokenizer(src / OWN_TOKENIZER)
    j = _hf_tokenizer_json(src)
    if j is None:
        if arch == "gpt2" and cfg.vocab_size == 50257:
            return GPT2Tokenizer()  # OpenAI's GPT-2 vocabulary size: its tokenizer
        raise UserError(f"{src} has no tokenizer.json (or vocab.json + merges.txt); "
                        "gptforge needs a byte-level BPE tokenizer")
    if not _is_byte_level_bpe(j):
        raise UserError(f"the tokenizer in {src} is not a byte-level BPE (model {j.get('model', {}).get('type')}, "
                        f"pre-tokenizer {(j.get('pre_tokenizer') or {}).get('type')}); gptforge can only use "
                        "GPT-2-style byte-level BPE tokenizers (SentencePiece ones are not supported)")
    if not j["model"].get("vocab"):  # transformers 5's GPT2TokenizerFast(vocab_file=...) saves one so
        raise UserError(f"the tokenizer in {src} has an empty vocabulary (tokenizer.json's model.vocab is empty) for "
                        f"a model of {cfg.vocab_size:,} rows; save a complete one there (a vocab.json + merges.txt "
                        "pair works too, without tokenizer.json)")
    tok: Tokenizer = GPT2Tokenizer() if _looks_like_gpt2(j) else BPETokenizer(j)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer in {src} has {tok.vocab_size} tokens but the model only {cfg.vocab_size} rows")
    return tok


def vocab_note(cfg: GPTConfig, tok: Tokenizer) -> Optional[str]:
    """A warning when the tokenizer covers much less than the model's rows (more than padding to a multiple of 128
    leaves): probably not the tokenizer the model was trained with."""
    if cfg.vocab_size <= -(-tok.vocab_size // 128) * 128:
        return None
    return (f"the tokenizer has {tok.vocab_size:,} tokens for the model's {cfg.vocab_size:,} rows: rows "
            f"{tok.vocab_size:,}.. are never produced; check that this is the tokenizer the model was trained with")


# ----------------------------------------------------------------------------------------------
# Import


def _read_hf(name_or_dir: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer, Path]:
    src = resolve_hf_source(name_or_dir)
    tf = require_transformers()
    try:
        hf_cfg = tf.AutoConfig.from_pretrained(src)
    except Exception as e:
        raise UserError(f"cannot read the config of {src}: {one_line(e, 240, with_type=True)}") from None
    cfg, arch = _config_from_hf(hf_cfg)
    tok = _tokenizer_from_hf(src, cfg, arch)  # before the weights: a refusal should be quick
    try:
        hf, info = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, output_loading_info=True)
    except Exception as e:
        raise UserError(f"cannot load the weights in {src}: {one_line(e, 240, with_type=True)}") from None
    if info.get("missing_keys"):
        raise UserError(f"the weights in {src} are incomplete (missing {sorted(info['missing_keys'])[0]}, ...)")
    hf_sd = hf.state_dict()
    del hf
    if arch == "gpt2" and (getattr(hf_cfg, "gptforge", None) or {}).get("bias") is False:
        # exported by us from a model without biases: the zeros stand for none (unless trained since)
        cfg.bias = any(bool(t.any()) for k, t in hf_sd.items() if k.endswith(".bias"))
    sd = _to_ours(cfg, arch, hf_sd)
    check_fits(cfg, sd)
    return cfg, sd, tok, src


def load_pretrained(name_or_dir: str | Path, device: str | torch.device = "cpu", *, block_size: Optional[int] = None,
                    dropout: float = 0.0, attention: str = "sdpa") -> tuple[torch.nn.Module, GPTConfig, Tokenizer]:
    """GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a hub id, or a local HF directory as our GPT
    (eval mode, float32), its config and its tokenizer. block_size shortens the context (learned
    position embeddings are cut to it; they cannot be lengthened); dropout and attention are ours to pick."""
    cfg, sd, tok, _ = _read_hf(name_or_dir)
    model = model_from_state(cfg, sd, block_size=block_size, dropout=dropout, attention=attention)
    return model.to(device), model.config, tok


def load_pretrained_checkpoint(name_or_dir: str | Path, device: str | torch.device = "cpu"):
    """`load_pretrained` as a `gptforge.modelio.checkpoint.Checkpoint`, for `sample` and `eval`."""
    model, cfg, tok = load_pretrained(name_or_dir, device)
    return Checkpoint(model=model, tokenizer=tok, config=RunConfig(model=cfg), path=Path(str(name_or_dir)),
                      state={"source": str(name_or_dir)})


def import_hf(name_or_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write a GPT-2 or Llama-family model (name, hub id or local HF directory) as a gptforge
    checkpoint directory that `load_checkpoint`, `gptforge sample` and `gptforge eval` read."""
    out = Path(out_dir)
    check_output_dir(out, overwrite, (Path(name_or_dir),) if Path(name_or_dir).exists() else ())
    cfg, sd, tok, src = _read_hf(name_or_dir)
    arch = "GPT2LMHeadModel" if cfg.pos == "learned" else "LlamaForCausalLM"
    write_checkpoint(out, sd, RunConfig(model=cfg), tok, {"step": 0, "source": str(name_or_dir), "imported_from": arch},
                     keep_other_files=True)
    return {"path": str(out), "source": str(src), "architecture": arch, "model": dataclasses.asdict(cfg),
            "tokenizer": tok.kind, "vocab_size": cfg.vocab_size, "tokenizer_vocab_size": tok.vocab_size,
            "warning": vocab_note(cfg, tok)}


# ----------------------------------------------------------------------------------------------
# Export


# every file export_hf writes: --overwrite replaces or removes these names only, the user's other files stay
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", OWN_TOKENIZER, "README.md")


HF_TOKENIZER_KINDS = ("gpt2", "bpe")  # the tokenizer kinds transformers has a counterpart of


def write_hf_tokenizer(directory: Path, tok: Tokenizer, model_max_length: int) -> None:
    """Our tokenizer as gptforge_tokenizer.json, and for gpt2 and bpe kinds the tokenizer.json and
    tokenizer_config.json `AutoTokenizer` reads (a chat model's with its markers and chat template)."""
    tok.save(directory)
    (directory / "tokenizer.json").rename(directory / OWN_TOKENIZER)
    if tok.kind not in HF_TOKENIZER_KINDS:
        return
    text = gpt2_hf_tokenizer_json(tok) if tok.kind == "gpt2" else json.dumps(tok.to_dict()["hf_tokenizer"])
    (directory / "tokenizer.json").write_text(text, encoding="utf-8")
    special = EOT_TEXT if tok.eot_id is not None else None
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                  "bos_token": special, "eos_token": special, "add_prefix_space": False,
                  "clean_up_tokenization_spaces": False}
    if tok.chat is not None:  # a chat model: its turn markers, and the template that lays them out
        tok_config.update(bos_token="<|bos|>", eos_token="<|end|>", chat_template=hf_chat_template(tok))
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")


def export_hf(run_or_checkpoint: str | Path, out_dir: str | Path, *, which: str = "latest",
              overwrite: bool = False, opener: Callable[[Path], Checkpoint] = open_checkpoint) -> dict[str, Any]:
    """Write a checkpoint as a `transformers` directory: config.json, model.safetensors,
    generation_config.json, a tokenizer `AutoTokenizer` reads (gpt2 and bpe kinds), our own tokenizer
    as gptforge_tokenizer.json, and README.md. Refuses architectures HF cannot compute exactly. `opener` reads
    the checkpoint directory (`gptforge.modelio.load.open_run` also opens a LoRA run's, merged)."""
    from safetensors.torch import save_file


    require_transformers()
    out = Path(out_dir)
    check_output_dir(out, overwrite, (Path(run_or_checkpoint), resolve_checkpoint(run_or_checkpoint, which)))
    ck = opener(resolve_checkpoint(run_or_checkpoint, which))
    cfg, tok = ck.config.model, ck.tokenizer
    arch = hf_architecture(cfg)
    hf_config = _hf_config(cfg, arch, tok.eot_id)
    weights = _to_hf(cfg, arch, model_state(ck.model))
    padded = list(range(tok.vocab_size, cfg.vocab_size))
    notes = []
    if padded:
        notes.append(f"The model has {cfg.vocab_size} vocabulary rows for the tokenizer's {tok.vocab_size} tokens "
                     f"(padded to a multiple of 64, as trained). Ids {tok.vocab_size}..{cfg.vocab_size - 1} were never "
                     "targets; generation_config.json suppresses them, and logits and loss equal gptforge's.")
    if arch == "gpt2" and cfg.mlp == "gelu":
        notes.append("The MLP computes the exact GELU (activation_function \"gelu\"), as transformers does; llama.cpp's "
                     "gpt2 architecture (convert_hf_to_gguf.py, or `gptforge export --to gguf`) computes GPT-2's tanh "
                     "approximation instead, which moves the logits slightly. A model trained with --model.mlp "
                     "gelu_tanh exports as \"gelu_new\" and computes the same everywhere.")
    if tok.kind in HF_TOKENIZER_KINDS:
        notes.append(f"tokenizer.json holds the {tok.kind} tokenizer for transformers' AutoTokenizer.")
        if tok.chat is not None:
            notes.append("A chat model: tokenizer_config.json holds its chat template, so "
                         "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` gives the ids it "
                         "was fine-tuned on; a reply ends at <|end|>, or at any other marker, where gptforge stops "
                         "too (generation_config.json's eos_token_id lists them).")
    else:
        notes.append(f"No Hugging Face tokenizer: gptforge's {tok.kind} tokenizer has no transformers counterpart. "
                     f"Encode and decode with gptforge.tokenizer.load_tokenizer('{OWN_TOKENIZER}').")
    name = HF_CLASSES[arch]

    def write(tmp: Path) -> None:
        hf_config.save_pretrained(tmp)
        # where gptforge stops: end-of-text, and for a chat model every marker (<|end|>, and a turn of its own)
        stop = tok.eot_id if tok.chat is None else [tok.chat.end_id, *sorted(tok.special_ids() - {tok.chat.end_id})]
        require_transformers().GenerationConfig(bos_token_id=tok.eot_id, eos_token_id=stop,
                                         suppress_tokens=padded or None).save_pretrained(tmp)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        umask_mode(tmp / "model.safetensors")
        write_hf_tokenizer(tmp, tok, cfg.block_size)
        (tmp / "README.md").write_text(
            f"# Exported by gptforge {__version__}\n\nFrom `{ck.path}`: a `{name}` for `transformers`.\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{out}\")\n"
            + (f"tokenizer = AutoTokenizer.from_pretrained(\"{out}\")\n" if tok.kind in HF_TOKENIZER_KINDS else "")
            + "```\n\n" + "\n\n".join(notes) + "\n\n"
            f"`gptforge import {out} CHECKPOINT_DIR` turns it back into a gptforge checkpoint.\n")

    write_dir_atomically(out, write, EXPORT_FILES)
    return {"path": str(out), "architecture": name, "vocab_size": cfg.vocab_size,
            "tokenizer": tok.kind if tok.kind in HF_TOKENIZER_KINDS else None, "notes": notes}


def to_hf_model(model: torch.nn.Module, eot_id: Optional[int] = None):
    """Our GPT as an in-memory `transformers` model with the same weights (float32, eval mode, on the
    CPU): the conversion `export_hf` writes to disk, for side-by-side runs that need no files."""
    tf = require_transformers()
    cfg = model.config
    arch = hf_architecture(cfg)
    weights = _to_hf(cfg, arch, {k: v.float() for k, v in model_state(model).items()})
    hf = getattr(tf, HF_CLASSES[arch])(_hf_config(cfg, arch, eot_id))
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]  # tied to the embedding
    if missing or unexpected:  # the mapping is ours: a mismatch is a bug, not the user's mistake
        raise RuntimeError(f"Hugging Face conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf.float().eval()
