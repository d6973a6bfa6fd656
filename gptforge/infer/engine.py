"""The inference engine: one KV cache, one `step`, and the decode loop every verb runs.

`KVCache` holds the keys and values of up to `rows` sequences, each with its own length, in buffers allocated
once. The model asks it, at the start of every forward, where the new tokens go (`KVCache.begin`: their
positions, and the attention mask when rows differ in length) and writes each layer's keys and values into it
(`update`). A single sequence, or a batch of equal-length prompts decoding together, is the case where every
row has the same length: no mask, and a contiguous write per layer. The server's batch (gptforge.serve.batcher)
is the same class with rows that join, leave and differ in length.

`step(model, idx, cache)` is one forward of new tokens on a cache, returning the logits that follow: a prefill
when each row brings several tokens, a decode step when it brings one (run single-threaded on a CPU for a few
rows, see DECODE_ONE_THREAD_ROWS). `stream` (and `generate` on top) decodes a batch of prompts with it;
`gptforge sample`, `gptforge chat`, the chat evaluation and the server all decode through `step`.

The cached decode gives exactly the tokens of the plain one, which re-runs the model on the last
`block_size` tokens at every step: positions cannot slide, so once the window is full both paths
run that same full-window forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Union

import torch

from gptforge.config import GPTConfig
from gptforge.infer.sampling import SamplingError, SamplingParams, sample
from gptforge.quantize import is_int8

# ----------------------------------------------------------------------------------------------
# The KV cache


class KVCache:
    """Keys and values of every layer for up to `rows` sequences of their own lengths; rows 0..len(lengths)-1
    are in use (`used`, default all of them: a batch that decodes together).

    `zeroed` allocates zeros: a cache whose rows will differ in length needs them, because the masked tail of a
    shorter row is still multiplied in (by a weight of 0), and 0 * NaN from uninitialised memory would poison
    it. Otherwise the buffers are left empty: positions at or past a row's length are never read, and zeroing
    GPT-2's 75 MB for 1024 positions took a fifth of a 64-token prefill on a CPU.
    """

    @staticmethod
    def nbytes(rows: int, config: GPTConfig, itemsize: int) -> int:
        """What a cache of `rows` rows allocates: keys and values, (L, rows, nkv, block, hs) each."""
        return 2 * config.n_layer * rows * config.n_kv_head * config.block_size * config.head_dim * itemsize

    def __init__(self, rows: int, config: GPTConfig, device=None, dtype: Optional[torch.dtype] = None, *,
                 used: Optional[int] = None, zeroed: bool = False):
        shape = (config.n_layer, rows, config.n_kv_head, config.block_size, config.head_dim)
        alloc = torch.zeros if zeroed else torch.empty
        self.k = alloc(shape, device=device, dtype=dtype)  # (L, R, nkv, block, hs)
        self.v = alloc(shape, device=device, dtype=dtype)  # (L, R, nkv, block, hs)
        self._k_layers, self._v_layers = self.k.unbind(0), self.v.unbind(0)  # views, so update indexes once
        self.batch_size, self.block_size, self.device = rows, config.block_size, self.k.device
        self.lengths: list[int] = [0] * (rows if used is None else used)  # tokens held by each row in use
        self.pos = 0  # the longest row's length
        self._ragged = False  # rows in use differ in length
        # made once: a forward over rows of different lengths only slices them
        self._keys = torch.arange(config.block_size, device=self.device)
        self._row_base = (torch.arange(rows, device=self.device)[:, None] * (config.n_kv_head * config.block_size)
                          + torch.arange(config.n_kv_head, device=self.device) * config.block_size)  # (R, nkv)
        self._flat: Optional[torch.Tensor] = None  # where the current forward's keys go, flattened

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _lengths_changed(self) -> None:
        self.pos = max(self.lengths, default=0)
        self._ragged = min(self.lengths, default=0) != self.pos

    # ---- what the model calls

    def begin(self, T: int) -> tuple[Union[slice, torch.Tensor], Optional[torch.Tensor]]:
        """The positions of T new tokens in every row in use, and the attention mask they need: (slice, None)
        while every row has the same length (a plain causal forward after `pos` tokens), else positions (B, T)
        and a mask (B, 1, T, pos + T) that shows each new token its own row's keys up to itself."""
        if self.pos + T > self.block_size:
            raise ValueError(f"sequence of {self.pos + T} tokens exceeds block_size {self.block_size}")
        if not self._ragged:
            return slice(self.pos, self.pos + T), None
        B = self.rows
        offsets = torch.tensor(self.lengths, device=self.device)[:, None] + self._keys[:T]  # (B, T)
        # each (row, head, token)'s key in the cache flattened to (R * nkv * block, hs): one index_copy_ per layer
        self._flat = (self._row_base[:B, :, None] + offsets[:, None, :]).reshape(-1)  # (B * nkv * T,)
        mask = self._keys[:self.pos + T][None, None, :] <= offsets[:, :, None]  # (B, T, Tk)
        return offsets, mask[:, None]  # (B, T), (B, 1, T, Tk)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) after each row's tokens; return every row's keys and values so far,
        (B, nkv, pos + T, hs) (a shorter row's tail is hidden by the mask `begin` gave)."""
        B, T = k.size(0), k.size(2)
        k_all, v_all = self._k_layers[layer_idx], self._v_layers[layer_idx]  # (R, nkv, block, hs)
        if B != self.batch_size:  # the rows in use
            k_all, v_all = k_all[:B], v_all[:B]
        if self._ragged:
            hs = k.size(-1)
            k_flat, v_flat = self._k_layers[layer_idx].view(-1, hs), self._v_layers[layer_idx].view(-1, hs)
            k_flat.index_copy_(0, self._flat, k.reshape(-1, hs).to(k_flat.dtype))  # (B * nkv * T, hs)
            v_flat.index_copy_(0, self._flat, v.reshape(-1, hs).to(v_flat.dtype))
        else:
            k_all.narrow(2, self.pos, T).copy_(k)  # narrow: one view op per write, this runs once per layer per token
            v_all.narrow(2, self.pos, T).copy_(v)
        return k_all.narrow(2, 0, self.pos + T), v_all.narrow(2, 0, self.pos + T)

    def advance(self, n: int) -> None:
        """After a forward: every row in use holds n more tokens."""
        self.lengths = [t + n for t in self.lengths]
        self.pos += n

    # ---- rows

    def reset(self) -> None:
        """Forget every token of every row in use; the buffers are kept (stale entries are never read)."""
        self.lengths = [0] * self.rows
        self._lengths_changed()

    def add(self, src: "KVCache", n: int) -> int:
        """Copy the tokens of the one-row cache `src` into n new rows; returns the first new row's index."""
        first, T = self.rows, src.pos
        if first + n > self.batch_size:
            raise ValueError(f"{first + n} rows do not fit in a cache of {self.batch_size}")
        self.k[:, first:first + n, :, :T] = src.k[:, :1, :, :T]  # (L, n, nkv, T, hs), broadcast over the n rows
        self.v[:, first:first + n, :, :T] = src.v[:, :1, :, :T]
        self.lengths += [T] * n
        self._lengths_changed()
        return first

    def row_kv(self, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the keys and values of the first n tokens of `row`: (L, nkv, n, hs) each."""
        return self.k[:, row, :, :n], self.v[:, row, :, :n]

    def load(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """A one-row cache now holds the tokens whose keys and values are k, v (L, nkv, n, hs), and nothing else."""
        n = k.size(2)
        self.k[:, 0, :, :n] = k
        self.v[:, 0, :, :n] = v
        self.lengths = [n]
        self._lengths_changed()

    def remove(self, row: int) -> Optional[int]:
        """Free `row` by moving the last row into it; returns the index the last row had (None if it was `row`)."""
        last = self.rows - 1
        if row != last:
            T = self.lengths[last]
            self.k[:, row, :, :T] = self.k[:, last, :, :T]
            self.v[:, row, :, :T] = self.v[:, last, :, :T]
            self.lengths[row] = T
        self.lengths.pop()
        self._lengths_changed()
        return last if row != last else None

    def clear(self) -> None:
        """No row in use."""
        self.lengths = []
        self._lengths_changed()


def _cache_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype the model's keys will have: autocast's when it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def new_kv_cache(model: torch.nn.Module, rows: int, device: torch.device, *, used: Optional[int] = None,
                 zeroed: bool = False) -> KVCache:
    """An empty cache for `model`, in the dtype its keys will have (call it inside the autocast you decode in)."""
    return KVCache(rows, model.config, device, _cache_dtype(model, device), used=used, zeroed=zeroed)


# ----------------------------------------------------------------------------------------------
# One step

# A step that decodes a few rows reads every weight once and computes little, and one core reads them as
# fast as two here (AMD EPYC, 2 threads: a one-row product reads 13.8 GB/s with 1 thread or 2). A second
# OpenMP thread only adds a hand-off to each of the ~200 small ops of a step, and while anything else runs
# on the machine every hand-off waits for the OS to schedule the helper: GPT-2 124M decoded 3.2 tok/s with
# 2 threads and 14 with 1 at load average 4 (same run). Bigger batches have real arithmetic to share, unless
# the model is so small that even many rows make every product tiny: the server's 16-row batch of a 4 x 128
# model decoded 3,371 tok/s with one thread and 2,078 with two, GPT-2 124M's 99 with two and 86 with one (batcher
# alone, greedy, same run). The same holds for a short prefill of a small model (the 4 x 128 model's 16-token
# prompt took 4.3 ms on two threads beside 2.1 ms for a 16-row decode step), and a helper thread that just ran
# a parallel region keeps spinning on the other core for a while after it. So a forward stays on one thread
# while its tokens (rows x new tokens) are at most DECODE_ONE_THREAD_ROWS or its tokens x the block matrices'
# weights (12 L C^2, the multiply-adds per token) at most DECODE_ONE_THREAD_WORK.
# A model in 8-bit weights (gptforge.quantize) is judged by the work alone: its int8 products are arithmetic-
# bound on one core, and GPT-2 124M's batch-1 step took 8.5 ms on two threads against 10.9 on one (10.1 with
# only the int8 products on two; quiet machine, same run; fp32's is no faster on two).
DECODE_ONE_THREAD_ROWS = 4
DECODE_ONE_THREAD_WORK = 1 << 26


def _matrix_weights(config: Optional[GPTConfig]) -> int:
    return 0 if config is None else 12 * config.n_layer * config.n_embd ** 2


@contextmanager
def decode_threads(device: torch.device, rows: int, config: Optional[GPTConfig] = None, int8: bool = False):
    """Run a forward of `rows` tokens of a model of `config` single-threaded on a CPU when it is small enough
    (see DECODE_ONE_THREAD_ROWS; `int8`: a model in 8-bit weights, judged by the work alone); the caller's thread
    count is back on exit, so longer prefills, training and the caller's own code keep theirs."""
    n = torch.get_num_threads()
    few = ((rows <= DECODE_ONE_THREAD_ROWS and not int8)
           or rows * _matrix_weights(config) <= DECODE_ONE_THREAD_WORK)
    if device.type != "cpu" or not few or n == 1:
        yield
        return
    torch.set_num_threads(1)  # 0.3 us a switch, nothing next to a step
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.inference_mode()
def step(model: torch.nn.Module, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Write the keys and values of idx (B, T), the new tokens of each row in use, onto `cache` after the
    tokens it holds, and return the logits (B, V) that follow the last of them. T > 1 is a prefill (a
    conversation's next turn goes onto the cache of the turns before it instead of re-running them); T == 1
    is a decode step. Single-threaded on a CPU for a few tokens or a small model (`decode_threads`)."""
    B, T = idx.shape
    if cache.pos + T > cache.block_size:
        raise SamplingError(f"{T} new tokens do not fit after the {cache.pos} in the cache "
                            f"(block_size {cache.block_size})")
    with decode_threads(idx.device, B * T, getattr(model, "config", None), is_int8(model)):
        return model(idx, kv_cache=cache, last_only=True)[:, -1]


def _prefill_rows(model: torch.nn.Module, idx: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
    """A new cache holding the prompts idx (B, T), and the logits (B, V) after them. B copies of one prompt
    (`--num-samples`) are run once and their keys and values copied to every row. A row's numbers do not
    depend on the rows beside it (each is its own product over the same weights; tests check the tokens are
    the same), so the samples are those of B prefills, for the price of one: a 200-token prompt for 8 samples
    of GPT-2 124M took 6.6 s batched and 2.4 s so (CPU, 2 threads, a loaded machine; same run)."""
    B = idx.size(0)
    if B == 1 or not bool((idx == idx[:1]).all()):
        cache = new_kv_cache(model, B, idx.device)
        return cache, step(model, idx, cache)
    one = new_kv_cache(model, 1, idx.device)  # untouched positions are never committed
    logits = step(model, idx[:1], one)  # (1, V)
    cache = new_kv_cache(model, B, idx.device, used=0)
    cache.add(one, B)
    return cache, logits.expand(B, -1).contiguous()  # (B, V): filters and the sampler write rows of their own


# ----------------------------------------------------------------------------------------------
# The decode loop


def _check_args(idx: torch.Tensor, max_new_tokens: int, vocab_size: Optional[int], model_vocab: int) -> None:
    if idx.dim() != 2 or idx.size(1) == 0:
        raise SamplingError(f"the prompt must be a (batch, length >= 1) tensor of ids, got shape {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if vocab_size is not None and not 0 < vocab_size <= model_vocab:
        raise SamplingError(f"vocab_size must be in [1, {model_vocab}], got {vocab_size}")


def _first_logits(model, idx: torch.Tensor, max_new_tokens: int, use_kv_cache: bool,
                  kv_cache: Optional[KVCache]) -> tuple[Optional[KVCache], torch.Tensor]:
    """The cache the decode continues on (None: the plain path) and the logits after the prompt."""
    block_size = model.config.block_size
    B, T = idx.shape
    if kv_cache is not None:
        if kv_cache.rows != B or kv_cache.pos + T + max_new_tokens - 1 > block_size:
            raise SamplingError(f"{T} new tokens and {max_new_tokens} to generate do not fit after the "
                                f"{kv_cache.pos} in the cache (batch {kv_cache.rows}, block_size {block_size})")
        return kv_cache, step(model, idx, kv_cache)
    if use_kv_cache and T < block_size:  # a cache only pays while the window has room
        return _prefill_rows(model, idx)
    return None, model(idx[:, -block_size:], last_only=True)[:, -1]


@torch.inference_mode()  # on a generator, torch enters the mode at every resume, not around the caller
def stream(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    *,
    eot_id: Optional[int] = None,
    vocab_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    use_kv_cache: bool = True,
    kv_cache: Optional[KVCache] = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token id of every sequence, (B,), step by step, for up to max_new_tokens steps.

    idx (B, T) holds B prompts of equal length; they decode together. temperature, top_k and top_p are a
    `SamplingParams`' filters (`stream(model, idx, n, *params.filters, ...)`). With eot_id set, a sequence
    that has produced it keeps yielding eot_id, and the stream ends once every sequence has.
    Prompts longer than block_size are cut to their last block_size tokens, as is the context at
    every step. The model is put in eval mode for the duration and restored afterwards.
    Each yielded tensor is a row of the stream's token buffer, never written again (clone it to modify it).

    With `kv_cache` (a cache that already holds kv_cache.pos tokens before idx, such as the earlier turns
    of a chat), idx holds only the new tokens and the stream continues on that cache, leaving in it every
    token but the last one yielded. The whole decode must fit in it: kv_cache.pos + T + max_new_tokens - 1
    <= block_size (the last token is yielded, never fed back).

    A batch of identical prompts (several samples of one prompt) is prefilled once and its cache copied to
    every row. The loop is lean because a small model's decode step costs little more than its Python:
    tokens go into a buffer allocated once, greedy decoding is a bare argmax written in place, and the only
    host sync per step is the end-of-text check, made only when eot_id is given.
    """
    params = SamplingParams(temperature, top_k, top_p).validate()
    _check_args(idx, max_new_tokens, vocab_size, model.config.vocab_size)
    if max_new_tokens == 0:
        return
    block_size = model.config.block_size
    B, T = idx.shape
    # Row t holds token t of every sequence: a step writes one contiguous row and reads it back as the
    # next input, (1, B) transposed to (B, 1), with no copy.
    tokens = torch.empty(T + max_new_tokens, B, dtype=torch.long, device=idx.device)  # (T + n, B)
    tokens[:T] = idx.t()
    done = torch.zeros(B, dtype=torch.bool, device=idx.device) if eot_id is not None else None
    was_training = model.training
    model.eval()
    try:
        cache, logits = _first_logits(model, idx, max_new_tokens, use_kv_cache, kv_cache)  # (B, V)
        for i in range(max_new_tokens):
            t = T + i
            row = tokens[t]  # (B,)
            x = logits if vocab_size is None else logits[:, :vocab_size]  # the padded ids are never chosen
            if params.greedy:
                torch.argmax(x, dim=-1, out=row)
            else:
                row.copy_(sample(x, params, generator))
            if done is not None:
                row.masked_fill_(done, eot_id)
                done |= row == eot_id
            yield row
            if i == max_new_tokens - 1 or (done is not None and bool(done.all())):
                return
            if cache is not None and cache.pos < block_size:
                logits = step(model, tokens[t:t + 1].t(), cache)  # (B, V)
            else:
                cache = None  # full: from here on the plain path, which the cached one must equal exactly
                logits = model(tokens[max(0, t + 1 - block_size):t + 1].t(), last_only=True)[:, -1]
    finally:
        model.train(was_training)


def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    *,
    eot_id: Optional[int] = None,
    vocab_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    use_kv_cache: bool = True,
    kv_cache: Optional[KVCache] = None,
) -> torch.Tensor:
    """idx (B, T) with the new tokens appended: (B, T + n), n <= max_new_tokens (fewer only when
    every sequence reached eot_id). Arguments as for `stream`."""
    new = list(stream(model, idx, max_new_tokens, temperature, top_k, top_p, eot_id=eot_id,
                      vocab_size=vocab_size, generator=generator, use_kv_cache=use_kv_cache, kv_cache=kv_cache))
    if not new:
        return idx.clone()
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1)
