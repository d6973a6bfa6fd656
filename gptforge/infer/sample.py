"""Generation in token ids: the sampling filters, the KV cache, and the decode loop.

This module owns everything between a model's logits and the next token: temperature, top-k and
top-p (nucleus) filtering as pure functions on logits, a preallocated `KVCache` that the model
writes its keys and values into, and `stream`/`generate`, which decode a batch of sequences
together. It deals only in token ids; `TextStreamer` turns a growing list of ids into printable
text for whoever holds the tokenizer (the CLI, a server).

The cached decode gives exactly the tokens of the plain one, which re-runs the model on the last
`block_size` tokens at every step: positions cannot slide, so once the window is full both paths
run that same full-window forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from gptforge.config import GPTConfig
from gptforge.errors import UserError, one_line
from gptforge.files import path_problem


class SamplingError(UserError, ValueError):
    """A bad sampling setting (temperature, top_k, top_p, vocab_size, an empty prompt)."""


# ----------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of every layer for the tokens seen so far, in buffers allocated once.

    The model calls `update(layer, k, v)` in each attention layer with the new tokens' keys and
    values and gets back all keys and values so far; after its last block it calls `advance(T)`.
    """

    def __init__(self, batch_size: int, config: GPTConfig, device=None, dtype: Optional[torch.dtype] = None):
        shape = (config.n_layer, batch_size, config.n_kv_head, config.block_size, config.head_dim)
        # empty, not zeros: positions at or past pos are never read, and zeroing GPT-2's 75 MB for 1024
        # positions took a fifth of a 64-token prefill on a CPU; pages never written are never committed
        self.k = torch.empty(shape, device=device, dtype=dtype)  # (L, B, nkv, block, hs)
        self.v = torch.empty(shape, device=device, dtype=dtype)  # (L, B, nkv, block, hs)
        self._k_layers, self._v_layers = self.k.unbind(0), self.v.unbind(0)  # views, so update indexes once
        self.batch_size, self.block_size = batch_size, config.block_size
        self.pos = 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) at positions pos..pos+T-1; return all (B, nkv, pos + T, hs)."""
        T = k.size(2)
        k_all, v_all = self._k_layers[layer_idx], self._v_layers[layer_idx]  # (B, nkv, block, hs)
        k_all.narrow(2, self.pos, T).copy_(k)  # narrow: one view op per write, this runs once per layer per token
        v_all.narrow(2, self.pos, T).copy_(v)
        return k_all.narrow(2, 0, self.pos + T), v_all.narrow(2, 0, self.pos + T)

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        """Forget every token; the buffers are kept (stale entries are never read: reads stop at pos)."""
        self.pos = 0


# ----------------------------------------------------------------------------------------------
# Filters: pure functions from logits (..., V) to logits with the excluded ids set to -inf.


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by temperature: below 1 sharpens the distribution, above 1 flattens it."""
    if temperature <= 0:
        raise SamplingError(f"temperature must be > 0 to scale logits (0 means greedy), got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row. Ids tied with the k-th largest are all kept, so the
    kept set never depends on how ties happen to be ordered."""
    if k < 1:
        raise SamplingError(f"top_k must be at least 1, got {k}")
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1): the k-th largest per row
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely ids whose probability mass is >= p.

    The most likely id is always kept; ids tied with the least likely kept id are all kept;
    p = 1 keeps everything (even ids of probability that rounds to zero).
    """
    if not 0.0 < p <= 1.0:
        raise SamplingError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:
        return logits
    sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (..., V): mass of the ids ranked above each id
    # an id is needed while the ids above it hold less than p; always at least the top one
    n_keep = (mass_before < p).sum(dim=-1, keepdim=True).clamp_(min=1)  # (..., 1)
    threshold = sorted_logits.gather(-1, n_keep - 1)  # (..., 1): the smallest kept logit
    return logits.masked_fill(logits < threshold, float("-inf"))


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                   top_p: Optional[float] = None) -> torch.Tensor:
    """Next-token probabilities after temperature, top-k and top-p (temperature > 0): (B, V) -> (B, V)."""
    x = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        x = top_k_filter(x, top_k)
    if top_p is not None:
        x = top_p_filter(x, top_p)
    return torch.softmax(x, dim=-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """The next token id (B,) for each row of logits (B, V).

    temperature 0 is greedy (argmax, no randomness). vocab_size is the tokenizer's real vocabulary:
    the model's vocabulary is padded (to a multiple of 64) and ids >= vocab_size are never chosen.
    Pass a seeded `generator` (on the logits' device) for reproducible samples.
    """
    if vocab_size is not None:
        if not 0 < vocab_size <= logits.size(-1):
            raise SamplingError(f"vocab_size must be in [1, {logits.size(-1)}], got {vocab_size}")
        logits = logits[..., :vocab_size]  # dropping the padded ids is cheaper than masking them
    if temperature < 0:
        raise SamplingError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, temperature, top_k, top_p)  # (B, V)
    # Exponential race: argmax of p_i / E_i with E_i ~ Exp(1) picks id i with probability p_i.
    # Same distribution as torch.multinomial, a few times cheaper per step, and no host sync on GPU.
    # The clamp guards against a backend drawing an exact 0 (0/0 would make argmax pick a filtered id).
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    return probs.div_(race).argmax(dim=-1)  # (B,)


# ----------------------------------------------------------------------------------------------
# Decoding


# A step that decodes a few rows reads every weight once and computes little, and one core reads them as
# fast as two here (AMD EPYC, 2 threads: a one-row product reads 13.8 GB/s with 1 thread or 2). A second
# OpenMP thread only adds a hand-off to each of the ~200 small ops of a step, and while anything else runs
# on the machine every hand-off waits for the OS to schedule the helper: GPT-2 124M decoded 3.2 tok/s with
# 2 threads and 14 with 1 at load average 4 (same run). Bigger batches have real arithmetic to share.
DECODE_ONE_THREAD_ROWS = 4


@contextmanager
def decode_threads(device: torch.device, rows: int):
    """Run a decode step of `rows` rows single-threaded on a CPU (see DECODE_ONE_THREAD_ROWS); the caller's
    thread count is back on exit, so prefill, training and the caller's own code keep theirs."""
    n = torch.get_num_threads()
    if device.type != "cpu" or rows > DECODE_ONE_THREAD_ROWS or n == 1:
        yield
        return
    torch.set_num_threads(1)  # 0.3 us a switch, nothing next to a step
    try:
        yield
    finally:
        torch.set_num_threads(n)


def decode_step(model: torch.nn.Module, idx: torch.Tensor, kv_cache) -> torch.Tensor:
    """Logits (B, V) after one new token per row, idx (B, 1), on `kv_cache`: the step `stream` and the
    server's engine both run."""
    with decode_threads(idx.device, idx.size(0)):
        return model(idx, kv_cache=kv_cache, last_only=True)[:, -1]


def _cache_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype the model's keys will have: autocast's when it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def new_kv_cache(model: torch.nn.Module, batch_size: int, device: torch.device) -> KVCache:
    """An empty cache for `model`, in the dtype its keys will have (call it inside the autocast you decode in)."""
    return KVCache(batch_size, model.config, device, _cache_dtype(model, device))


@torch.inference_mode()
def prefill(model: torch.nn.Module, idx: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
    """Write the keys and values of idx (B, T) onto `kv_cache`, after the kv_cache.pos tokens it holds,
    and return the logits (B, V) that follow the last of them: a conversation's next turn goes onto the
    cache of the turns before it instead of re-running them."""
    if kv_cache.pos + idx.size(1) > kv_cache.block_size:
        raise SamplingError(f"{idx.size(1)} new tokens do not fit after the {kv_cache.pos} in the cache "
                            f"(block_size {kv_cache.block_size})")
    return model(idx, kv_cache=kv_cache, last_only=True)[:, -1]


def _prefill_rows(model: torch.nn.Module, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """`prefill` of idx (B, T) onto an empty cache; B copies of one prompt (`--num-samples`) are run once
    and their keys and values copied to every row. A row's numbers do not depend on the rows beside it
    (each is its own product over the same weights; tests check the tokens are the same), so the samples
    are those of B prefills, for the price of one: a 200-token prompt for 8 samples of GPT-2 124M took
    6.6 s batched and 2.4 s so (CPU, 2 threads, a loaded machine; same run)."""
    B, T = idx.shape
    if B == 1 or not bool((idx == idx[:1]).all()):
        return prefill(model, idx, cache)
    one = KVCache(1, model.config, idx.device, cache.k.dtype)  # untouched positions are never committed
    logits = prefill(model, idx[:1], one)  # (1, V)
    cache.k[:, :, :, :T] = one.k[:, :, :, :T]  # (L, 1, nkv, T, hs) broadcast to every row
    cache.v[:, :, :, :T] = one.v[:, :, :, :T]
    cache.advance(T)
    return logits.expand(B, -1).contiguous()  # (B, V): filters and the sampler write rows of their own


def _check_args(idx: torch.Tensor, max_new_tokens: int) -> None:
    if idx.dim() != 2 or idx.size(1) == 0:
        raise SamplingError(f"the prompt must be a (batch, length >= 1) tensor of ids, got shape {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


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

    idx (B, T) holds B prompts of equal length; they decode together. With eot_id set, a sequence
    that has produced it keeps yielding eot_id, and the stream ends once every sequence has.
    Prompts longer than block_size are cut to their last block_size tokens, as is the context at
    every step. The model is put in eval mode for the duration and restored afterwards.
    Each yielded tensor is a row of the stream's token buffer, never written again (clone it to modify it).

    With `kv_cache` (a cache that already holds kv_cache.pos tokens before idx, such as the earlier turns
    of a chat), idx holds only the new tokens and the stream continues on that cache, leaving in it every
    token but the last one yielded. The whole decode must fit in it: kv_cache.pos + T + max_new_tokens - 1
    <= block_size (the last token is yielded, never fed back).

    A batch of identical prompts (several samples of one prompt) is prefilled once and its cache copied to
    every row; steps of a few rows run single-threaded on a CPU (`decode_threads`).
    The loop is lean because a small model's decode step costs little more than its Python: tokens go
    into a buffer allocated once, greedy decoding is a bare argmax written in place, and the only host
    sync per step is the end-of-text check, made only when eot_id is given.
    """
    _check_args(idx, max_new_tokens)
    if max_new_tokens == 0:
        return
    block_size = model.config.block_size
    B, T = idx.shape
    # Row t holds token t of every sequence: a step writes one contiguous row and reads it back as the
    # next input, (1, B) transposed to (B, 1), with no copy.
    tokens = torch.empty(T + max_new_tokens, B, dtype=torch.long, device=idx.device)  # (T + n, B)
    tokens[:T] = idx.t()
    done = torch.zeros(B, dtype=torch.bool, device=idx.device) if eot_id is not None else None
    greedy = temperature == 0
    was_training = model.training
    model.eval()
    try:
        # A cache only pays while the window has room; a prompt that fills it gets full-window forwards.
        cache = kv_cache
        if cache is not None:
            if cache.batch_size != B or cache.pos + T + max_new_tokens - 1 > block_size:
                raise SamplingError(f"{T} new tokens and {max_new_tokens} to generate do not fit after the "
                                    f"{cache.pos} in the cache (batch {cache.batch_size}, block_size {block_size})")
            logits = prefill(model, idx, cache)  # (B, V)
        elif use_kv_cache and T < block_size:
            cache = new_kv_cache(model, B, idx.device)
            logits = _prefill_rows(model, idx, cache)  # (B, V)
        else:
            logits = model(idx[:, -block_size:], last_only=True)[:, -1]  # (B, V)
        for step in range(max_new_tokens):
            t = T + step
            row = tokens[t]  # (B,)
            if greedy and step > 0:  # sample_next has checked the settings at step 0
                torch.argmax(logits if vocab_size is None else logits[:, :vocab_size], dim=-1, out=row)
            else:
                row.copy_(sample_next(logits, temperature, top_k, top_p, generator, vocab_size))
            if done is not None:
                row.masked_fill_(done, eot_id)
                done |= row == eot_id
            yield row
            if step == max_new_tokens - 1 or (done is not None and bool(done.all())):
                return
            if cache is not None and cache.pos < block_size:
                logits = decode_step(model, tokens[t:t + 1].t(), cache)  # (B, V)
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


# ----------------------------------------------------------------------------------------------
# Text


class TextStreamer:
    """Newly printable text of one growing sequence of ids, one call per generated token.

    A character whose UTF-8 bytes are split over several tokens decodes to a trailing "\\ufffd"
    until its last byte arrives; that tail is held back and printed once complete. Only the ids
    since the last complete character are decoded (plus `context` ids before them, whose text is
    cut off again, so decoders that treat the first token specially, such as dropping a leading
    space, still give the right text), so each call costs the same however long the sequence grows.

        streamer = TextStreamer(tokenizer.decode)
        for next_ids in stream(model, idx, 200):
            ids.append(int(next_ids[0])); print(streamer(ids), end="", flush=True)
        print(streamer.flush())
    """

    MAX_PENDING = 8  # a UTF-8 character spans at most 4 byte tokens; beyond that the bytes are just invalid

    def __init__(self, decode: Callable[[Sequence[int]], str], context: int = 4):
        self.decode = decode
        self.context = context
        self._ids: Sequence[int] = ()
        self._done = 0  # the text of ids[:_done] has been printed in full
        self._printed = 0  # characters of the text of ids[_done:] printed already

    def __call__(self, ids: Sequence[int]) -> str:
        """The text not yet returned, less a trailing partial character. ids: the whole sequence so far."""
        self._ids = ids
        return self._take(final=False)

    def flush(self) -> str:
        """Whatever is held back (the generation ended mid-character: it prints as "\\ufffd")."""
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        ids, start = self._ids, self._done
        if len(ids) <= start:
            return ""
        ctx = max(0, start - self.context)
        prefix = self.decode(ids[ctx:start]) if ctx < start else ""
        text = self.decode(ids[ctx:])[len(prefix):]  # the text of ids[start:]
        end = len(text)
        if not final and len(ids) - start < self.MAX_PENDING:
            end = len(text.rstrip("\ufffd"))
        out = text[self._printed:end]
        if end == len(text):  # everything printed: a clean boundary to decode from next time
            self._done, self._printed = len(ids), 0
        else:
            self._printed = max(self._printed, end)
        return out


# ----------------------------------------------------------------------------------------------
# The `gptforge sample` verb: a checkpoint and a prompt in, text out

# The verb holds every sample's tokens (and, per sample, a KV cache) in memory at once, so it refuses
# requests that could only end in an out-of-memory crash: far beyond what any machine here holds.
MAX_SAMPLES = 1024
MAX_TOTAL_NEW_TOKENS = 2**24  # num_samples x max_new_tokens


def read_prompt(prompt: str) -> str:
    """The prompt text of `--prompt`: the text itself, or the contents of a UTF-8 file for FILE:path."""
    if not prompt.startswith("FILE:"):
        return prompt
    path = Path(prompt[5:])
    if problem := path_problem(path, "file"):
        raise UserError(f"prompt file {path} {problem}")
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read prompt file {path}: {e.strerror or one_line(e)}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def _check_request(num_samples: int, max_new_tokens: int) -> None:
    if num_samples < 1:
        raise SamplingError(f"--num-samples must be at least 1, got {num_samples}")
    if num_samples > MAX_SAMPLES:
        raise SamplingError(f"--num-samples must be at most {MAX_SAMPLES} (they are decoded together as one batch), "
                            f"got {num_samples:,}")
    if max_new_tokens < 0:
        raise SamplingError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if num_samples * max_new_tokens > MAX_TOTAL_NEW_TOKENS:
        raise SamplingError(f"--max-new-tokens {max_new_tokens:,} x --num-samples {num_samples} is more than the "
                            f"{MAX_TOTAL_NEW_TOKENS:,} new tokens one command holds in memory; ask for fewer")


def sample_checkpoint(run, prompt: str = "\n", *, num_samples: int = 1, max_new_tokens: int = 500,
                      temperature: float = 0.8, top_k: Optional[int] = 200, top_p: Optional[float] = None,
                      seed: int = 1337, use_kv_cache: bool = True, which: str = "latest", device: str = "auto",
                      out=None) -> list[str]:
    """Sample `num_samples` continuations of `prompt` (decoded together as one batch) from a checkpoint.

    With `out` (a text stream), the first sample is written as it is generated and the others follow
    when the batch is done, separated by a line of dashes. Returns the samples, prompt included.
    """
    from gptforge.device import autocast, check_seed, pick_device, pick_dtype
    from gptforge.modelio.load import load

    _check_request(num_samples, max_new_tokens)  # bad settings fail before any work or output
    sample_next(torch.zeros(1, 2), temperature, top_k, top_p)
    check_seed(seed)
    dev = pick_device(device)
    ck = load(run, dev, which)  # on a CPU, in the decode layout
    tok = ck.tokenizer
    ids = tok.encode(prompt)
    if not ids:
        if tok.eot_id is None:
            raise SamplingError("the prompt is empty; give some text to start from (the default is a newline)")
        ids = [tok.eot_id]  # an empty prompt starts a fresh document
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    generator = torch.Generator(device=dev).manual_seed(seed)
    new_ids: list[list[int]] = [[] for _ in range(num_samples)]
    finished = [False] * num_samples
    streamer = TextStreamer(tok.decode)
    if out is not None:
        out.write(prompt)
        out.flush()
    with autocast(dev, pick_dtype(ck.config.train.dtype, dev)):
        for step_ids in stream(ck.model, idx, max_new_tokens, temperature, top_k, top_p, eot_id=tok.eot_id,
                               vocab_size=tok.vocab_size, generator=generator, use_kv_cache=use_kv_cache):
            for b, t in enumerate(step_ids.tolist()):
                if t == tok.eot_id:
                    finished[b] = True  # end of text: the sample stops here, without the token
                elif not finished[b]:
                    new_ids[b].append(t)
            if out is not None:
                out.write(streamer(new_ids[0]))
                out.flush()
    samples = [prompt + tok.decode(seq) for seq in new_ids]
    if out is not None:
        out.write(streamer.flush())
        for text in samples[1:]:
            out.write("\n---------------\n" + text)
        out.write("\n")
        out.flush()
    return samples
