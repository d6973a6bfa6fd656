"""LoRA: low-rank adapters on a frozen GPT (Hu et al. 2021), and what identifies the model they adapt.

`attach(model, cfg)` freezes every weight of `model` and gives it a `lora` submodule: for each targeted
projection W (out x in) of every block, an `Adapter` with A (rank x in, Kaiming-uniform, as PEFT) and B
(out x rank, zeros), so the model computes W x + (alpha / rank) B A dropout(x), which before the first step is
exactly W x. The adapters act through forward hooks on the projections, so the base model's code and its
parameter names are unchanged (a checkpoint's weights and the Hugging Face mapping stay as they are).

Our attention computes q, k and v in one matrix (`attn.c_attn`) and SwiGLU its gate and up projections in one
(`mlp.c_fc`, [gate | up]); an adapter belongs to one of those parts, a row range of the matrix, as in
Hugging Face's Llama (q_proj, k_proj, v_proj, gate_proj, up_proj). So an adapter of ours maps one to one onto
PEFT's for a Llama-shaped model, and onto a block of PEFT's fused `c_attn` adapter for GPT-2 (modelio.peft).

A chat fine-tune of a base model whose tokenizer lacks the chat markers also trains the markers' rows of the
embedding (and of an untied output layer): the base never learned them, and a frozen row of `<|end|>` could
never learn to end a reply. They are `TokenRows`, whose values replace the base's rows (PEFT's
`trainable_token_indices` does the same).

`merge(model)` folds the adapters into the weights (W[rows] += scale B A) and removes them: inference runs at
the base model's speed. `weights_sha256` is the base's identity that an adapter checkpoint records.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.config import GPTConfig, LoRAConfig

PREFIX = "lora."  # the adapter's tensors in a model's state_dict, and in an adapter checkpoint


@dataclass(frozen=True)
class Part:
    """What an adapter adapts: rows [start, end) of the Linear `module` (a path inside a block)."""

    name: str
    module: str
    start: int
    end: int


def parts(cfg: GPTConfig, targets: Sequence[str]) -> list[Part]:
    """The adapted parts of one block for the `targets` (LoRAConfig.target_list), in a fixed order."""
    q, kv, C, H = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_embd, cfg.mlp_hidden
    table = {
        "query": [Part("query", "attn.c_attn", 0, q)],
        "key": [Part("key", "attn.c_attn", q, q + kv)],
        "value": [Part("value", "attn.c_attn", q + kv, q + 2 * kv)],
        "attn_proj": [Part("attn_proj", "attn.c_proj", 0, C)],
        "mlp_fc": ([Part("gate", "mlp.c_fc", 0, H), Part("up", "mlp.c_fc", H, 2 * H)] if cfg.mlp == "swiglu"
                   else [Part("mlp_fc", "mlp.c_fc", 0, H)]),
        "mlp_proj": [Part("mlp_proj", "mlp.c_proj", 0, C)],
    }
    return [p for t in targets for p in table[t]]


def adapter_param_count(cfg: GPTConfig, lora_cfg: LoRAConfig) -> int:
    """The adapters' parameters for a model of shape `cfg`, counted from the shapes alone (token rows aside)."""
    width = {"attn.c_attn": cfg.n_embd, "attn.c_proj": cfg.n_head * cfg.head_dim, "mlp.c_fc": cfg.n_embd,
             "mlp.c_proj": cfg.mlp_hidden}
    per_block = sum(lora_cfg.rank * (width[p.module] + p.end - p.start) for p in parts(cfg, lora_cfg.target_list))
    return cfg.n_layer * per_block


def base_matrix_count(cfg: GPTConfig) -> int:
    """Elements of the blocks' projection matrices (what `keep_base_in` stores in 16 bits)."""
    C, hs = cfg.n_embd, cfg.head_dim
    fc = 2 * cfg.mlp_hidden if cfg.mlp == "swiglu" else cfg.mlp_hidden
    attn = C * (cfg.n_head + 2 * cfg.n_kv_head) * hs + cfg.n_head * hs * C
    return cfg.n_layer * (attn + C * fc + cfg.mlp_hidden * C)


class Adapter(nn.Module):
    """(alpha / rank) B A dropout(x): A (rank x d_in), B (d_out x rank), B starting at zero."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's init, as PEFT and litgpt use
        self.scale = alpha / rank
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.drop(x), self.A), self.B) * self.scale

    def delta(self) -> torch.Tensor:
        """The update to the weight rows, (d_out x d_in)."""
        return (self.B @ self.A) * self.scale


class TokenRows(nn.Module):
    """Trained rows of the token embedding (and of an untied output layer) for the ids in `ids`, replacing
    the base's rows (initialised to them)."""

    def __init__(self, model: nn.Module, ids: Sequence[int]):
        super().__init__()
        ids_t = torch.tensor(sorted(ids), dtype=torch.long)
        self.register_buffer("ids", ids_t)
        slot = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
        slot[ids_t] = torch.arange(len(ids_t))
        self.register_buffer("slot", slot, persistent=False)  # id -> its row here, or -1
        self.wte = nn.Parameter(model.transformer.wte.weight.detach()[ids_t].clone().float())
        tied = model.config.tie_embeddings
        self.head = None if tied else nn.Parameter(model.lm_head.weight.detach()[ids_t].clone().float())

    def embed(self, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        slot = self.slot[idx]
        rows = self.wte[slot.clamp(min=0)].to(out.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), rows, out)

    def logits(self, head: nn.Linear, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The output layer's logits with these rows in place of the head's: what the head gave plus what the
        rows' difference from its rows adds (zero while the rows are the base's, so exactly the base's logits)."""
        rows = self.wte if self.head is None else self.head
        change = rows.to(head.weight.dtype) - head.weight[self.ids]
        return out.index_add(-1, self.ids, F.linear(x, change.to(x.dtype)).to(out.dtype))


class LoRA(nn.Module):
    """Every adapter of a model: `h[i][part]` for block i, and the trained token rows (or None)."""

    def __init__(self, model: nn.Module, cfg: LoRAConfig, token_ids: Sequence[int] = ()):
        super().__init__()
        self.parts = parts(model.config, cfg.target_list)
        self.h = nn.ModuleList()
        for block in model.transformer.h:
            adapters = nn.ModuleDict()
            for p in self.parts:
                linear = block.get_submodule(p.module)
                adapters[p.name] = Adapter(linear.in_features, p.end - p.start, cfg.rank, cfg.alpha, cfg.dropout)
            self.h.append(adapters)
        self.tokens = TokenRows(model, token_ids) if token_ids else None
        self._handles: list = []


def _projection_hook(spans: list[tuple[int, int, Adapter]], width: int):
    """A forward hook adding the adapters' outputs to their rows of a Linear's output."""

    def hook(module, args, out):
        x, pieces, at = args[0], [], 0
        for start, end, adapter in spans:
            if start > at:
                pieces.append(out.new_zeros(*out.shape[:-1], start - at))
            pieces.append(adapter(x).to(out.dtype))
            at = end
        if at < width:
            pieces.append(out.new_zeros(*out.shape[:-1], width - at))
        return out + (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1))

    return hook


def attach(model: nn.Module, cfg: LoRAConfig, token_ids: Sequence[int] = ()) -> LoRA:
    """Freeze every weight of `model` and add the adapters (`model.lora`, fresh: B = 0, so the logits are the
    base's) and trained token rows for `token_ids`; returns the LoRA module."""
    if hasattr(model, "lora"):
        raise RuntimeError("the model has adapters already")
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoRA(model, cfg, token_ids).train(model.training)  # adapter dropout follows the model's mode
    lora.to(model.transformer.wte.weight.device)
    model.add_module("lora", lora)
    for block, adapters in zip(model.transformer.h, lora.h):
        by_module: dict[str, list] = {}
        for p in lora.parts:
            by_module.setdefault(p.module, []).append((p.start, p.end, adapters[p.name]))
        for name, spans in by_module.items():
            linear = block.get_submodule(name)
            hook = _projection_hook(sorted(spans, key=lambda s: s[0]), linear.out_features)
            lora._handles.append(linear.register_forward_hook(hook))
    if lora.tokens is not None:
        rows = lora.tokens
        lora._handles.append(model.transformer.wte.register_forward_hook(lambda m, a, out: rows.embed(a[0], out)))
        lora._handles.append(model.lm_head.register_forward_hook(lambda m, a, out: rows.logits(m, a[0], out)))
    return lora


def merge(model: nn.Module) -> nn.Module:
    """Fold `model.lora` into the weights it adapts and remove it (hooks and parameters); returns the model,
    which then computes what it computed with the adapters (eval mode: no adapter dropout), a plain GPT whose
    weights are all trainable again. Weights kept in 16 bits (`keep_base_in`) take the sum rounded to them."""
    lora: LoRA = model.lora
    with torch.no_grad():
        for block, adapters in zip(model.transformer.h, lora.h):
            for p in lora.parts:
                w = block.get_submodule(p.module).weight
                w[p.start:p.end] += adapters[p.name].delta().to(w.device, w.dtype)
        if lora.tokens is not None:
            rows = lora.tokens
            model.transformer.wte.weight[rows.ids] = rows.wte.to(model.transformer.wte.weight.dtype)
            if rows.head is not None:
                model.lm_head.weight[rows.ids] = rows.head.to(model.lm_head.weight.dtype)
    for handle in lora._handles:
        handle.remove()
    del model.lora
    for p in model.parameters():  # a plain model again, trainable as any loaded model is
        p.requires_grad_(True)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors of a model state dict (names under `lora.`), on the CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith(PREFIX)}


def token_ids_of(state: dict[str, torch.Tensor]) -> list[int]:
    """The trained token rows' ids recorded in an adapter state dict (none: [])."""
    ids = state.get(PREFIX + "tokens.ids")
    return [] if ids is None else [int(i) for i in ids]


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def base_count(model: nn.Module) -> int:
    """Parameters of the model without its adapters (a tied matrix once)."""
    lora = getattr(model, "lora", None)
    own = {id(p) for p in lora.parameters()} if lora is not None else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in own)


def training_flops_per_token(model: nn.Module) -> float:
    """A training step's FLOPs per token (MFU's numerator): GPT.flops_per_token's 6 per parameter, less the 2 of
    the weight gradient that backward skips for every frozen matrix parameter of a LoRA model."""
    flops = model.flops_per_token()
    if getattr(model, "lora", None) is None:
        return flops
    return flops - 2 * (model.num_params() - trainable_count(model))


def weights_sha256(model: nn.Module) -> str:
    """A hash of the base model's weights (every tensor of its state dict but the adapter's: names, shapes,
    dtypes and bytes, a tied matrix once), the identity an adapter checkpoint records of its base."""
    h, seen = hashlib.sha256(), set()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(PREFIX) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def keep_base_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen matrices of the blocks' projections in `dtype` (bf16 on a GPU halves the base's memory;
    autocast computes in it anyway); embeddings, norms, biases and the adapters stay float32. Returns the bytes saved."""
    saved = 0
    for block in model.transformer.h:
        for m in block.modules():
            if isinstance(m, nn.Linear) and not m.weight.requires_grad and m.weight.dtype != dtype:
                saved += m.weight.numel() * (m.weight.element_size() - torch.finfo(dtype).bits // 8)
                m.weight.data = m.weight.data.to(dtype)
    return saved


def describe(cfg: LoRAConfig, model: nn.Module) -> str:
    """One line for a run's start: the adapters of `model` and the share of its parameters they train."""
    trained, base, tokens = trainable_count(model), base_count(model), model.lora.tokens
    rows = f" + the rows of {len(tokens.ids)} tokens the base lacked" if tokens is not None else ""
    return (f"lora: rank {cfg.rank}, alpha {cfg.alpha:g}, dropout {cfg.dropout:g}, on {', '.join(cfg.target_list)}"
            f"{rows} | trainable {trained:,} of {base:,} parameters ({100 * trained / base:.2f}%)")
