"""Continuous batching: one decode thread owns the model; requests join and leave the running batch step by step.

The server's event loop never touches the model. It hands a `Request` (prompt ids, sampling settings, limits)
to `Engine.submit`, which queues it; the engine's thread, at each step,
  1. drops the rows of requests that were cancelled (a client that went away frees its place at once),
  2. prefills at most one chunk of one waiting prompt (so a long prompt delays the running streams by one
     chunk's forward per step, never by its whole prefill), and when the prompt is done, samples each
     choice's first token from its logits and gives each choice a row of the batch,
  3. runs one decode step for every row together and samples every row at once (`sample_rows`: one filter
     pass per group of rows with the same settings; only the random draw is per row, from its own generator).
Text goes back through the request's `emit` callback (thread-safe on the server's side) as `Event`s.
A failure in one request's own work (its prefill, its seeds, its draws, its text) ends that request alone with
an "error" event; only a failed decode forward, shared by every row, ends every request in the batch.

The batch's keys and values live in a `BatchKVCache`: rows of different lengths side by side, each written at
its own position, with a mask that hides the unwritten tail of the shorter rows. A prompt is prefilled on a
plain one-row `KVCache` (gptforge.infer.sample) and copied into its rows. A single request at batch 1 runs exactly the
forwards of `gptforge sample` (same prefill, no mask when every row has the same length, the same per-request
`torch.Generator` and `sample_next`'s ops), so the same seed gives the same text.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from gptforge.device import autocast, check_memory, format_bytes
from gptforge.infer.sample import KVCache, TextStreamer, decode_step, filtered_probs, new_kv_cache

log = logging.getLogger("gptforge.serve")


class EngineFull(Exception):
    """The queue of waiting requests is full (the server answers 429)."""


# ----------------------------------------------------------------------------------------------
# The batch's KV cache


class BatchKVCache:
    """Keys and values of up to `max_rows` sequences of different lengths, rows 0..rows-1 in use.

    The model reads `row_pos` (each row's length: where its next token goes and that token's position) and
    `attn_mask` (None while every row has the same length, as for a single request); `pos` is the longest row.
    """

    @staticmethod
    def nbytes(max_rows: int, config, itemsize: int) -> int:
        """What the cache allocates: keys and values, (L, max_rows, nkv, block, hs) each."""
        return 2 * config.n_layer * max_rows * config.n_kv_head * config.block_size * config.head_dim * itemsize

    def __init__(self, max_rows: int, config, device, dtype):
        shape = (config.n_layer, max_rows, config.n_kv_head, config.block_size, config.head_dim)
        # zeros, not empty: a shorter row's masked tail is still multiplied in (by a weight of 0), and 0 * NaN
        # from uninitialised memory would poison it; what a finished row leaves behind is finite
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, R, nkv, block, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size, self.device = config.block_size, device
        self.lengths: list[int] = []  # tokens held by each row in use
        self.row_pos: Optional[torch.Tensor] = None
        self.attn_mask: Optional[torch.Tensor] = None
        self.pos = 0
        # made once: per step the engine only slices them, so a step builds no index tensors of its own
        self._keys = torch.arange(config.block_size, device=device)
        self._row_base = torch.arange(max_rows, device=device)[:, None] * (config.n_kv_head * config.block_size) \
            + torch.arange(config.n_kv_head, device=device) * config.block_size  # (R, nkv): flat offset of (row, head)
        self._flat: Optional[torch.Tensor] = None

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def add(self, src: KVCache, n: int) -> int:
        """Copy the one-row cache `src` into n new rows; returns the first new row's index."""
        first, T = self.rows, src.pos
        self.k[:, first:first + n, :, :T] = src.k[:, :1, :, :T]  # (L, n, nkv, T, hs), broadcast over the n rows
        self.v[:, first:first + n, :, :T] = src.v[:, :1, :, :T]
        self.lengths += [T] * n
        return first

    def remove(self, row: int) -> Optional[int]:
        """Free `row` by moving the last row into it; returns the index the last row had (None if it was `row`)."""
        last = self.rows - 1
        if row != last:
            T = self.lengths[last]
            self.k[:, row, :, :T] = self.k[:, last, :, :T]
            self.v[:, row, :, :T] = self.v[:, last, :, :T]
            self.lengths[row] = T
        self.lengths.pop()
        return last if row != last else None

    def begin_step(self) -> None:
        """Set the positions and mask that the next one-token forward over every row reads."""
        B = self.rows
        self.row_pos = torch.tensor(self.lengths, device=self.device)  # (B,)
        # where each (row, head)'s new key goes in the cache flattened to (R * nkv * block, hs): one index_copy_
        # per layer instead of an advanced-index write with two index tensors
        self._flat = (self._row_base[:B] + self.row_pos[:, None]).view(-1)  # (B * nkv,)
        self.pos = max(self.lengths)
        if min(self.lengths) == self.pos:
            self.attn_mask = None  # equal lengths: the plain path, bit for bit what one sequence alone computes
        else:  # key j is visible to row b when j <= row_pos[b] (its own new token included)
            keys = self._keys[:self.pos + 1]
            self.attn_mask = (keys[None, :] <= self.row_pos[:, None])[:, None, None, :]  # (B, 1, 1, Tk)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one new token per row, k, v (B, nkv, 1, hs), at each row's position; return (B, nkv, pos + 1, hs)."""
        B, hs = k.size(0), k.size(-1)
        k_all, v_all = self.k[layer_idx], self.v[layer_idx]  # (R, nkv, block, hs), contiguous
        k_all.view(-1, hs).index_copy_(0, self._flat, k.reshape(-1, hs).to(k_all.dtype))  # (B * nkv, hs)
        v_all.view(-1, hs).index_copy_(0, self._flat, v.reshape(-1, hs).to(v_all.dtype))
        return k_all[:B, :, :self.pos + 1], v_all[:B, :, :self.pos + 1]

    def advance(self, n: int) -> None:
        self.lengths = [t + n for t in self.lengths]


# ----------------------------------------------------------------------------------------------
# Requests and their sequences


@dataclass
class Event:
    """What one choice has produced since the last event: new text, and when it ends, why."""
    index: int
    text: str = ""
    finish_reason: Optional[str] = None  # "stop" or "length" on a choice's last event
    completion_tokens: int = 0  # tokens generated so far (the end-of-turn token counts)


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]  # called from the engine's thread
    n: int = 1
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop_ids: frozenset = frozenset()
    stop: tuple[str, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Sequence:
    """One choice of a request: its generated ids, its generator, and the text not yet sent."""

    def __init__(self, req: Request, index: int, decode, vocab_size: int, device):
        self.req, self.index, self.vocab_size = req, index, vocab_size
        seed = req.seed + index if req.seed is not None else None
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.ids: list[int] = []
        self.streamer = TextStreamer(decode)
        self.text, self.sent = "", 0  # text decoded so far; characters of it already emitted
        self.last: Optional[int] = None  # the token to feed at the next decode step
        self.finished = False  # set by the engine when take() says so: the row leaves the batch

    def take(self, token: int) -> bool:
        """Account for a new token and emit what text is safe to send; True when the choice is finished."""
        self.ids.append(token)
        r, reason = self.req, None
        if token in r.stop_ids:
            reason = "stop"
        else:
            self.text += self.streamer(self.ids)
            hit = self._find_stop()
            if hit is not None:
                self.text, reason = self.text[:hit], "stop"
            elif len(self.ids) >= r.max_tokens:
                self.text += self.streamer.flush()
                reason = "length"
        end = len(self.text) if reason else len(self.text) - self._held_back()
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        if delta or reason:
            r.emit(Event(self.index, delta, reason, len(self.ids)))
        self.last = token
        return reason is not None

    def _find_stop(self) -> Optional[int]:
        """Where the earliest stop string starts in the text, looking only where a new one can be."""
        if not self.req.stop:
            return None
        longest = max(map(len, self.req.stop))
        start = max(0, self.sent - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.req.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Characters at the end of the unsent text that could begin a stop string: not sent until it is known."""
        tail = self.text[self.sent:]
        for n in range(min(len(tail), max(map(len, self.req.stop), default=0)), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.req.stop):
                return n
        return 0


def sample_rows(logits: torch.Tensor, seqs: list[Sequence], vocab_size: int) -> list[int]:
    """One next token per row of logits (B, V) for seqs[b], the same ids as `sample_next` row by row.

    Rows that share temperature, top-k and top-p are filtered and soft-maxed as one batch (every op is row-wise,
    so each row's numbers are the ones it gets alone); only the random draw stays per row, from each choice's
    own generator, so a seed gives the same text whoever else is in the batch.
    """
    logits = logits[:, :vocab_size]  # the padded ids are never chosen
    groups: dict[tuple, list[int]] = {}
    for b, s in enumerate(seqs):
        r = s.req
        groups.setdefault((r.temperature, r.top_k, r.top_p), []).append(b)
    out = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
    for (temperature, top_k, top_p), rows in groups.items():
        whole = len(rows) == len(seqs)
        x = logits if whole else logits[rows]
        if temperature == 0:
            ids = x.argmax(dim=-1)
        else:
            ids = _race(x, temperature, top_k, top_p, [seqs[b].generator for b in rows])
        if whole:
            return ids.tolist()
        out[rows] = ids
    return out.tolist()  # one move to Python per step


def _race(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
          generators: list[torch.Generator]) -> torch.Tensor:
    """`sample_next`'s filters and exponential race over rows (G, V) that share their settings; (G,) ids."""
    probs = filtered_probs(logits, temperature, top_k, top_p)  # (G, V)
    race = torch.empty_like(probs)
    for row, g in zip(race, generators):  # each row's draw consumes its own generator exactly as alone
        row.exponential_(generator=g)
    race.clamp_(min=torch.finfo(probs.dtype).tiny)
    return probs.div_(race).argmax(dim=-1)


# ----------------------------------------------------------------------------------------------
# The engine


class Engine:
    """The decode loop over `model` (a gptforge GPT in eval mode) in a background thread."""

    def __init__(self, model, tokenizer, device: torch.device, dtype: torch.dtype, *, max_seqs: int = 16,
                 max_queue: int = 64, prefill_chunk: int = 256):
        self.model, self.tok, self.device, self.dtype = model, tokenizer, device, dtype
        self.block_size = model.config.block_size
        self.max_seqs, self.max_queue, self.prefill_chunk = max_seqs, max_queue, prefill_chunk
        self._waiting: "queue.Queue[Request]" = queue.Queue()
        self._pending: list[Request] = []  # taken off the queue, not yet prefilled
        self._prefilling: Optional[tuple[Request, int]] = None  # the request whose prompt is going in, tokens done
        self._rows: list[Sequence] = []  # row b of the batch cache decodes _rows[b]
        self._stop = threading.Event()
        with torch.inference_mode(), autocast(device, dtype):
            self._scratch = new_kv_cache(model, 1, device)
            self._check_memory(self._scratch.k.element_size())
            self._cache = BatchKVCache(max_seqs, model.config, device, self._scratch.k.dtype)
        self._thread = threading.Thread(target=self._run, name="gptforge-engine", daemon=True)
        self.steps = 0

    def _check_memory(self, itemsize: int) -> None:
        """Refuse, before allocating, a batch that cannot fit beside the loaded model (already out of the free
        memory): the batch's KV cache, and a step's float32 logits, probabilities and draws over every row."""
        cfg = self.model.config
        per_row = BatchKVCache.nbytes(1, cfg, itemsize) + 3 * 4 * cfg.vocab_size
        check_memory(self.max_seqs * per_row, self.device, f"a batch of {self.max_seqs} sequences (--max-seqs)",
                     f"lower --max-seqs: each sequence takes about {format_bytes(per_row)}")

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._waiting.put(None)  # wake the loop if it is idle
        self._thread.join(timeout=10)

    @property
    def active(self) -> int:
        return len(self._rows)

    def submit(self, req: Request) -> None:
        """Queue `req`; raises EngineFull when max_queue requests are already waiting."""
        if self._waiting.qsize() + len(self._pending) >= self.max_queue:
            raise EngineFull(f"{self.max_queue} requests are already waiting; try again shortly")
        self._waiting.put(req)

    # ---- the loop

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                self._take_new(block=not (self._rows or self._pending or self._prefilling))
                with torch.inference_mode(), autocast(self.device, self.dtype):
                    self._drop_cancelled()
                    self._prefill_step()
                    if self._rows:
                        self._decode_step()
                self.steps += 1
            except Exception:  # a bug outside any one request's work: fail what is in flight, keep serving
                log.exception("engine step failed; ending the requests in flight")
                self._fail_all()

    def _take_new(self, block: bool) -> None:
        try:
            req = self._waiting.get(timeout=0.5) if block else self._waiting.get_nowait()
            while True:
                if req is not None:
                    self._pending.append(req)
                req = self._waiting.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        self._pending = [r for r in self._pending if not r.cancelled.is_set()]
        if self._prefilling and self._prefilling[0].cancelled.is_set():
            self._prefilling = None
        for b in reversed(range(len(self._rows))):
            if self._rows[b].req.cancelled.is_set():
                self._free_row(b)

    def _free_row(self, b: int) -> None:
        moved = self._cache.remove(b)
        seq = self._rows.pop()
        if moved is not None:
            self._rows[b] = seq

    def _prefill_step(self) -> None:
        """One chunk of one waiting prompt; once it is all in, its choices join the batch. Whatever fails here
        (its forward, its seeds, its first tokens) is this request's alone: it ends with an error, the rest go on."""
        if self._prefilling is None:
            if not self._pending or self._pending[0].n + len(self._rows) > self.max_seqs:
                return  # wait until enough rows are free
            self._prefilling = (self._pending.pop(0), 0)
            self._scratch.reset()
        req, done = self._prefilling
        try:
            chunk = req.prompt[done:done + self.prefill_chunk]
            logits = self.model(torch.tensor([chunk], device=self.device), kv_cache=self._scratch,
                                last_only=True)[:, -1]
            done += len(chunk)
            if done < len(req.prompt):
                self._prefilling = (req, done)
                return
            self._prefilling = None
            self._admit(req, logits)
        except Exception:
            self._prefilling = None
            self._fail(req, "while starting (its prefill, seeds or first tokens)")

    def _admit(self, req: Request, logits: torch.Tensor) -> None:
        """Give req's choices their first tokens from the prompt's logits (1, V) and rows of the batch."""
        seqs = [Sequence(req, i, self.tok.decode, self.tok.vocab_size, self.device) for i in range(req.n)]
        first = sample_rows(logits.expand(len(seqs), -1), seqs, self.tok.vocab_size)  # (1, V) shared by the choices
        alive = [s for s, t in zip(seqs, first) if not s.take(t)]
        if alive:
            self._cache.add(self._scratch, len(alive))
            self._rows += alive

    def _decode_step(self) -> None:
        cache = self._cache
        cache.begin_step()
        idx = torch.tensor([[s.last] for s in self._rows], device=self.device)  # (B, 1)
        try:
            logits = decode_step(self.model, idx, cache)  # (B, V), as `stream` steps (single-threaded for few rows)
        except Exception:  # one forward for every row: no one request to blame, so every row ends
            log.exception("the batch's decode step failed; ending the requests in it")
            self._fail_rows()
            return
        tokens = self._sample(logits)
        for s, t in zip(self._rows, tokens):
            if t is not None and not s.req.cancelled.is_set():
                try:
                    s.finished = s.take(t)
                except Exception:
                    self._fail(s.req, "while decoding its text")
        # descending, so the last row that _free_row moves into a freed place is never one still to free
        for b in reversed(range(len(self._rows))):
            if self._rows[b].finished or self._rows[b].req.cancelled.is_set():
                self._free_row(b)

    def _sample(self, logits: torch.Tensor) -> list[Optional[int]]:
        """Every row's next token; if the batched draw fails, row by row, so only the failing rows' requests
        end (their rows get None)."""
        try:
            return sample_rows(logits, self._rows, self.tok.vocab_size)
        except Exception:  # rows drawn before the failure drew again below: a rare failure may change their text
            pass
        tokens: list[Optional[int]] = []
        for b, s in enumerate(self._rows):
            try:
                tokens.append(None if s.req.cancelled.is_set() else
                              sample_rows(logits[b:b + 1], [s], self.tok.vocab_size)[0])
            except Exception:
                self._fail(s.req, "while sampling its next token")
                tokens.append(None)
        return tokens

    @staticmethod
    def _end_with_error(req: Request) -> None:
        """An error event for each of req's choices; cancelled, so its rows leave the batch at the next step."""
        req.cancel()
        for i in range(req.n):
            req.emit(Event(i, "", "error", 0))

    def _fail(self, req: Request, when: str) -> None:
        """End `req` alone (call it from an except block: the traceback goes to the log)."""
        log.exception("a request failed in the engine %s; ending it alone", when)
        self._end_with_error(req)

    def _fail_rows(self) -> None:
        """End every request in the batch (not those still waiting) and empty it."""
        reqs = {id(s.req): s.req for s in self._rows}
        self._rows, self._cache.lengths = [], []
        for r in reqs.values():
            self._end_with_error(r)

    def _fail_all(self) -> None:
        reqs = {id(s.req): s.req for s in self._rows}
        reqs.update({id(r): r for r in self._pending})
        if self._prefilling:
            reqs[id(self._prefilling[0])] = self._prefilling[0]
        self._rows, self._pending, self._prefilling = [], [], None
        self._cache.lengths = []
        for r in reqs.values():
            self._end_with_error(r)
