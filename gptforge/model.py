"""The GPT model, top to bottom: norms, rotary embeddings, attention, MLP, Block, GPT.

One model whose block is a ladder from classic GPT-2 (learned positions, LayerNorm, GELU, tied
embeddings) to a modern block (RoPE, RMSNorm, SwiGLU, grouped-query attention, QK-norm); each rung
is a typed field of `GPTConfig`. Parameter names follow GPT-2 (`transformer.h.0.attn.c_attn.weight`...)
so GPT-2 weights load by a key copy. Generation (the KV cache, sampling) lives in `sample.py`; the
model only accepts an optional cache object with `pos`, `update(layer, k, v)` and `advance(n)` (and, for a
batch of rows of different lengths, `row_pos` and `attn_mask`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.config import GPTConfig


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop only the bias)."""

    def __init__(self, dim: int, bias: bool, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return LayerNorm(dim, config.bias, config.norm_eps)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (length, head_dim); the half-split layout of HF Llama."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (hs/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + hs/2) of x (B, nh, T, hs) by the angles of their positions."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, nh, T, hs)
    return (x * cos + rotated * sin).to(x.dtype)


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where attending is allowed; the queries are the last q_len keys."""
    offset = k_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    return torch.arange(k_len, device=device)[None, :] <= q_pos


def manual_attention(q, k, v, mask: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    """Attention written out step by step; gives the same numbers as F.scaled_dot_product_attention."""
    scale = 1.0 / math.sqrt(q.size(-1))
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, Tq, Tk): how much each query matches each key
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # a token may not look at the future
    weights = F.softmax(scores.float(), dim=-1).to(q.dtype)  # each row sums to 1
    weights = F.dropout(weights, p=dropout_p)
    return weights @ v  # (B, nh, Tq, hs): a weighted average of the values


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # one projection for queries, keys and values: n_head + 2 * n_kv_head heads of head_dim each
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_sdpa = config.attention == "sdpa"

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]], kv_cache=None,
                value_embed: Optional[torch.Tensor] = None, rows_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, C = x.size()
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([q_size, kv_size, kv_size], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if value_embed is not None:  # (B, T, nkv * hs): this layer's learned vector for each token
            v = v + value_embed
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, T_past + T, hs)
        if self.n_kv_head != self.n_head:  # grouped-query: each kv head serves n_head / n_kv_head query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, nh, Tk, hs)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, nh, Tk, hs)
        Tk = k.size(2)
        # Without past keys the mask is the plain causal one; one new query may see every key;
        # a chunk of new queries after past keys needs an explicit offset mask.
        is_causal, mask = Tk == T and T > 1, None
        if Tk != T and T > 1:
            mask = causal_mask(T, Tk, x.device)
        if rows_mask is not None:  # (B, 1, T, Tk): a batch of rows of different lengths (the cache's)
            is_causal, mask = False, rows_mask
        dropout_p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        else:
            if is_causal:
                mask = causal_mask(T, Tk, x.device)
            y = manual_attention(q, k, v, mask, dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, q_size)  # (B, T, nh * hs): heads side by side
        y = self.c_proj(y)
        return self.resid_dropout(y) if self.training else y  # dropout is the identity in eval: skip the call


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        self.squared_relu = config.mlp == "relu2"
        self.gelu_approx = "tanh" if config.mlp == "gelu_tanh" else "none"  # GPT-2 used the tanh form
        # swiglu: c_fc computes the gate and the up projection in one matmul, [gate | up]
        fc_out = 2 * config.mlp_hidden if self.gated else config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, fc_out)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)  # (B, T, hidden) each
            h = F.silu(gate) * up
        elif self.squared_relu:
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate=self.gelu_approx)
        h = self.c_proj(h)
        return self.dropout(h) if self.training else h


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope=None, kv_cache=None, value_embed=None, rows_mask=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache, value_embed, rows_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size must be set to build a model (e.g. 50304 for GPT-2's tokenizer)")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        ))
        if config.pos == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:
            cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # derived, never saved
            self.register_buffer("rope_sin", sin, persistent=False)
        if config.value_embeds:  # looked up by token id, like wte: AdamW trains them as it trains the embeddings
            kv_size = config.n_kv_head * config.head_dim
            self.value_embeds = nn.ModuleList(nn.Embedding(config.vocab_size, kv_size) for _ in range(config.n_layer))
        if config.unet_skips:  # block n_layer-1-i adds skip_weights[i] x the output of block i, for i < n_layer // 2
            self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of the projections into the residual stream by 1/sqrt(2 * n_layer);
        # or start them at zero, so that each block begins as the identity
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    torch.nn.init.zeros_(p)
                else:
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def compile_blocks(self) -> None:
        """torch.compile each transformer block in place: block by block, so it works the same bare,
        under DDP and under FSDP (which wraps blocks), and one compiled graph serves every layer."""
        for block in self.transformer.h:
            block.compile()

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the lookup tables that are not also a matmul: the position
        embeddings (GPT-2's convention) and the value embeddings. Weights converted to int8 for decoding
        (gptforge.quantize) count as the parameters they were."""
        n = sum(p.numel() for p in self.parameters()) + sum(getattr(m, "int8_params", 0) for m in self.modules())
        if non_embedding and self.config.pos == "learned":
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and self.config.value_embeds:
            n -= sum(e.weight.numel() for e in self.value_embeds)
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 N plus attention's 12 L H T (PaLM appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size

    def _blocks(self, x: torch.Tensor, idx: torch.Tensor, rope, kv_cache, rows_mask) -> torch.Tensor:
        """The transformer blocks in order, with the value embeddings and U-net skips when the config has them."""
        c = self.config
        if not (c.value_embeds or c.unet_skips):
            for block in self.transformer.h:
                x = block(x, rope, kv_cache, None, rows_mask)
            return x
        skips, half = [], c.n_layer // 2
        for i, block in enumerate(self.transformer.h):
            if c.unet_skips and i >= c.n_layer - half:
                x = x + self.skip_weights[c.n_layer - 1 - i] * skips.pop()
            x = block(x, rope, kv_cache, self.value_embeds[i](idx) if c.value_embeds else None, rows_mask)
            if c.unet_skips and i < half:
                skips.append(x)
        return x

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, kv_cache=None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for idx (B, T); with targets, the mean cross-entropy loss instead.

        With a kv_cache (gptforge.infer.engine.KVCache), idx holds only the new tokens of each row; the cache
        says where they go (`begin`: positions after the row's own tokens, and a mask when rows differ in
        length). Targets equal to -1 are ignored. last_only computes logits for the last position only,
        (B, 1, vocab): all that sampling needs, and the output layer is a large share of the FLOPs.
        """
        B, T = idx.size()
        if kv_cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            pos, rows_mask = slice(0, T), None
        else:
            pos, rows_mask = kv_cache.begin(T)  # a slice, or (B, T) positions with a (B, 1, T, Tk) mask
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe.weight[pos]  # (T, C) or (B, T, C)
        else:
            rope = (self.rope_cos[pos].to(x.dtype), self.rope_sin[pos].to(x.dtype))  # (T, hs) or (B, T, hs)
            if rows_mask is not None:
                rope = (rope[0].unsqueeze(1), rope[1].unsqueeze(1))  # (B, 1, T, hs): the same angles for every head
        if self.training:
            x = self.transformer.drop(x)
        x = self._blocks(x, idx, rope, kv_cache, rows_mask)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        if last_only and targets is None:
            x = x[:, -1:]  # (B, 1, C)
        logits = self.lm_head(x)  # (B, T, vocab)
        if self.config.logit_softcap is not None:  # bounded logits: no token grows confident faster than the rest learn
            cap = self.config.logit_softcap
            logits = torch.tanh(logits / cap) * cap
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)




def grow_vocab(model: GPT, rows: int) -> GPT:
    """Give `model` `rows` vocabulary rows (more than it has), the new ones the mean of the old (a token never
    seen starts as the average token; HF's resize_token_embeddings starts near it too); returns the model.
    For fine-tuning with tokens the base lacks: the chat markers after GPT-2's 50,257 tokens."""
    old = model.config.vocab_size
    if rows <= old:
        return model

    def grown(w: torch.Tensor) -> nn.Parameter:
        extra = w.detach().mean(dim=0, keepdim=True).expand(rows - old, -1)
        return nn.Parameter(torch.cat([w.detach(), extra]), requires_grad=w.requires_grad)

    model.transformer.wte.weight = grown(model.transformer.wte.weight)
    model.transformer.wte.num_embeddings = rows
    model.lm_head.weight = model.transformer.wte.weight if model.config.tie_embeddings else grown(model.lm_head.weight)
    model.lm_head.out_features = rows
    if model.config.value_embeds:
        for e in model.value_embeds:
            e.weight, e.num_embeddings = grown(e.weight), rows
    model.config = dataclasses.replace(model.config, vocab_size=rows)
    return model


def meta_model(config: GPTConfig, stored_layers: Optional[int] = None) -> GPT:
    """GPT(config) on the meta device: every name, shape and buffer, and no memory for any of them.

    Building 100,000 blocks (a hostile config.json) takes minutes and gigabytes even on the meta device, so with
    `stored_layers` (the blocks a weights file holds) at most one block more than that is built: enough to
    name the first tensor the file lacks, which is all a comparison with that file can say."""
    if stored_layers is not None and config.n_layer > stored_layers + 1:
        config = dataclasses.replace(config, n_layer=stored_layers + 1)
    with torch.device("meta"):
        return GPT(config)


def stored_layers(names: Iterable[str]) -> int:
    """How many blocks a state dict's tensor names hold (transformer.h.0. ... transformer.h.N-1.)."""
    found = {int(m.group(1)) for m in map(_BLOCK_KEY.match, names) if m}
    return max(found) + 1 if found else 0


_BLOCK_KEY = re.compile(r"transformer\.h\.(\d+)\.")

