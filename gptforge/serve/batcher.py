"""Continuous batching: one thread owns the model; requests join and leave the running batch step by step.

The server's event loop never touches the model. It hands a `Request` (prompt ids, `SamplingParams`, limits) to
`Batcher.submit`, which queues it; the batcher's thread, at each step,
  1. drops the rows of requests that were cancelled (a client that went away frees its place at once),
  2. prefills at most one chunk of one waiting prompt (so a long prompt delays the running streams by one
     chunk's forward per step, never by its whole prefill), and when the prompt is done, samples each
     choice's first token from its logits and gives each choice a row of the batch,
  3. runs one decode step for every row together and samples every row at once
     (gptforge.infer.sampling.sample_rows: one filter pass per group of rows with the same settings; only the
     random draw is per row, from its own generator).
Both forwards are the engine's `step` on the engine's `KVCache` (gptforge.infer.engine): a prompt goes onto a
one-row cache, then into rows of the batch's cache, whose rows differ in length. A single request at batch 1
runs exactly the forwards of `gptforge sample` (same prefill, no mask when every row has the same length, the
same per-request generator and filters), so the same seed gives the same text.
Text goes back through the request's `emit` callback (thread-safe on the server's side) as `Event`s.
A failure in one request's own work (its prefill, its seeds, its draws, its text) ends that request alone with
an "error" event; only a failed decode forward, shared by every row, ends every request in the batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from gptforge.device import autocast, check_memory, format_bytes
from gptforge.infer.engine import KVCache, new_kv_cache, step
from gptforge.infer.prefix_cache import PrefixCache
from gptforge.infer.sampling import SamplingParams, sample_rows
from gptforge.infer.scoring import Scored, TokenLogprob, rank_tokens, score
from gptforge.infer.text import TextStreamer

log = logging.getLogger("gptforge.serve")


class QueueFull(Exception):
    """The queue of waiting requests is full (the server answers 429)."""


# ----------------------------------------------------------------------------------------------
# Requests and their sequences


@dataclass
class Event:
    """What one choice has produced since the last event: new text, and when it ends, why."""
    index: int
    text: str = ""
    finish_reason: Optional[str] = None  # "stop" or "length" on a choice's last event
    completion_tokens: int = 0  # tokens generated so far (the end-of-turn token counts)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens of this event, when asked for


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]  # called from the batcher's thread
    n: int = 1
    params: SamplingParams = SamplingParams()
    stop_ids: frozenset = frozenset()
    logprobs: Optional[int] = None  # report each generated token's logprob and this many top ones (None: off)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (set before the first event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class ScoreJob:
    """Prompts to score (a prefill, never a decode loop): each prompt's `Scored` goes to `emit(i, scored)`, or
    `emit(i, None)` if scoring failed. `then[i]`, if given, is prompt i's generation request: one of
    max_tokens 1 is answered from the scoring forward's last logits; a longer one is queued after its scores."""
    prompts: list[list[int]]
    top_n: int
    emit: Callable[[int, Optional[Scored]], None]  # called from the batcher's thread
    then: list[Request] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: int = 0  # prompts scored so far

    def cancel(self) -> None:
        self.cancelled.set()
        for r in self.then:
            r.cancel()

    def fail(self) -> None:
        """End the job: cancelled, with a failure (None) for each prompt not yet scored."""
        self.cancel()
        for i in range(self.done, len(self.prompts)):
            self.emit(i, None)


class Sequence:
    """One choice of a request: its generated ids, its generator, and the text not yet sent."""

    def __init__(self, req: Request, index: int, decode, vocab_size: int, device):
        self.req, self.index, self.vocab_size = req, index, vocab_size
        self.generator = req.params.generator(device, index)  # choice i draws from seed + i
        self.ids: list[int] = []
        self.streamer = TextStreamer(decode)
        self.text, self.sent = "", 0  # text decoded so far; characters of it already emitted
        self.last: Optional[int] = None  # the token to feed at the next decode step
        self.finished = False  # set by the batcher when take() says so: the row leaves the batch
        self.logprobs: list[TokenLogprob] = []  # of the tokens not yet emitted

    def take(self, token: int, logprob: Optional[TokenLogprob] = None) -> bool:
        """Account for a new token and emit what text is safe to send; True when the choice is finished.
        `logprob` (when the request asks for them) goes out with the event that carries its text."""
        self.ids.append(token)
        r, reason = self.req, None
        if token in r.stop_ids:  # not part of the text, so not of the logprobs either
            reason = "stop"
        else:
            if logprob is not None:
                self.logprobs.append(logprob)
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
            r.emit(Event(self.index, delta, reason, len(self.ids), self.logprobs))
            self.logprobs = []
        self.last = token
        return reason is not None

    def _find_stop(self) -> Optional[int]:
        """Where the earliest stop string starts in the text, looking only where a new one can be."""
        if not self.req.params.stop:
            return None
        longest = max(map(len, self.req.params.stop))
        start = max(0, self.sent - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.req.params.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Characters at the end of the unsent text that could begin a stop string: not sent until it is known."""
        tail = self.text[self.sent:]
        for n in range(min(len(tail), max(map(len, self.req.params.stop), default=0)), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.req.params.stop):
                return n
        return 0


# ----------------------------------------------------------------------------------------------
# The batcher


class Batcher:
    """The decode loop over `model` (a gptforge GPT in eval mode) in a background thread."""

    def __init__(self, model, tokenizer, device: torch.device, dtype: torch.dtype, *, max_seqs: int = 16,
                 max_queue: int = 64, prefill_chunk: int = 256, prefix_cache_bytes: int = 0):
        self.model, self.tok, self.device, self.dtype = model, tokenizer, device, dtype
        self.prefix = PrefixCache(prefix_cache_bytes)  # KV of earlier prompts and replies, reused by later ones
        self.block_size = model.config.block_size
        self.max_seqs, self.max_queue, self.prefill_chunk = max_seqs, max_queue, prefill_chunk
        self._waiting: "queue.Queue[Request]" = queue.Queue()
        self._pending: list[Request] = []  # taken off the queue, not yet prefilled
        self._prefilling: Optional[tuple[Request, int]] = None  # the request whose prompt is going in, tokens done
        self._scoring: list[ScoreJob] = []  # taken off the queue, prompts still to score
        # tokens per scoring forward: a prefill chunk, or one whole context (the longest prompt), if larger
        self.score_tokens = max(prefill_chunk, self.block_size)
        self._rows: list[Sequence] = []  # row b of the batch cache decodes _rows[b]
        self._next: Optional[tuple[torch.nn.Module, Callable[[], None]]] = None  # weights to switch to (swap)
        self._stop = threading.Event()
        with torch.inference_mode(), autocast(device, dtype):
            self._scratch = new_kv_cache(model, 1, device)
            self._check_memory(self._scratch.k.element_size())
            self._cache = new_kv_cache(model, max_seqs, device, used=0, zeroed=True)  # rows of their own lengths
        self._thread = threading.Thread(target=self._run, name="gptforge-batcher", daemon=True)

    def _check_memory(self, itemsize: int) -> None:
        """Refuse, before allocating, a batch that cannot fit beside the loaded model (already out of the free
        memory): the batch's KV cache, and the larger of a step's float32 logits, probabilities and draws over
        every row and a scoring forward's logits (model dtype) and float32 log-probabilities."""
        cfg = self.model.config
        per_row = KVCache.nbytes(1, cfg, itemsize) + 3 * 4 * cfg.vocab_size
        scoring = self.score_tokens * cfg.vocab_size * (itemsize + 2 * 4)
        need = max(self.max_seqs * per_row, self.max_seqs * KVCache.nbytes(1, cfg, itemsize) + scoring)
        what, fix = f"a batch of {self.max_seqs} sequences (--max-seqs)", "lower --max-seqs"
        if self.prefix.max_bytes:
            what += f" and a prefix cache of {format_bytes(self.prefix.max_bytes)} (--prefix-cache-mb)"
            fix = "lower --max-seqs or --prefix-cache-mb"
        check_memory(need + self.prefix.max_bytes, self.device, what,
                     f"{fix}: each sequence takes about {format_bytes(per_row)}")

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._waiting.put(None)  # wake the loop if it is idle
        self._thread.join(timeout=10)

    @property
    def active(self) -> int:
        """Sequences decoding now."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests not yet decoding: queued, taken but not prefilled, prefilling, or scoring jobs."""
        return self._waiting.qsize() + len(self._pending) + bool(self._prefilling) + len(self._scoring)

    def swap(self, model: torch.nn.Module, on_switch: Callable[[], None] = lambda: None) -> None:
        """Decode with `model` (the same shape and tokenizer) from now on, never mid-answer: the batch takes no new
        prompt until every running sequence and scoring job has finished on the old weights, then switches, empties
        the prefix cache (its KV is the old weights') and calls `on_switch` on its thread."""
        self._next = (model, on_switch)
        self._waiting.put(None)  # wake the loop if it is idle

    def submit(self, *reqs: "Request | ScoreJob") -> None:
        """Queue `reqs`, all or none; raises QueueFull when they do not fit beside the max_queue waiting."""
        if self._waiting.qsize() + len(self._pending) + len(self._scoring) + len(reqs) > self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are already waiting; try again shortly")
        for r in reqs:
            self._waiting.put(r)

    # ---- the loop

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                self._take_new(block=not (self._rows or self._pending or self._prefilling or self._scoring))
                with torch.inference_mode(), autocast(self.device, self.dtype):
                    self._drop_cancelled()
                    self._switch_when_idle()
                    self._score_step()
                    self._prefill_step()
                    if self._rows:
                        self._decode_step()
            except Exception:  # a bug outside any one request's work: fail what is in flight, keep serving
                log.exception("batcher step failed; ending the requests in flight")
                self._fail_all()

    def _switch_when_idle(self) -> None:
        """Switch to the weights `swap` gave once nothing is decoding or scoring on the old ones."""
        if self._next is None or self._rows or self._prefilling or (self._scoring and self._scoring[0].done):
            return
        (self.model, on_switch), self._next = self._next, None
        self.prefix.clear()
        try:
            on_switch()
        except Exception:
            log.exception("the callback after switching weights failed")

    def _take_new(self, block: bool) -> None:
        try:
            req = self._waiting.get(timeout=0.5) if block else self._waiting.get_nowait()
            while True:
                if isinstance(req, ScoreJob):
                    self._scoring.append(req)
                elif req is not None:
                    self._pending.append(req)
                req = self._waiting.get_nowait()
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        self._pending = [r for r in self._pending if not r.cancelled.is_set()]
        self._scoring = [j for j in self._scoring if not j.cancelled.is_set()]
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
            if not self._pending or self._pending[0].n + len(self._rows) > self.max_seqs or self._next is not None:
                return  # wait until enough rows are free (or the weights have switched)
            self._start_prefill(self._pending.pop(0))
        req, done = self._prefilling
        try:
            chunk = req.prompt[done:done + self.prefill_chunk]
            logits = step(self.model, torch.tensor([chunk], device=self.device), self._scratch)  # (1, V)
            done += len(chunk)
            if done < len(req.prompt):
                self._prefilling = (req, done)
                return
            self._prefilling = None
            self._admit(req, logits)
        except Exception:
            self._prefilling = None
            self._fail(req, "while starting (its prefill, seeds or first tokens)")

    def _start_prefill(self, req: Request) -> None:
        """req's prompt starts going in, after the longest prefix of it the prefix cache holds."""
        self._scratch.reset()
        n, kv = self.prefix.match(req.prompt)
        if kv is not None:
            self._scratch.load(*kv)
        req.cached_tokens = n
        self._prefilling = (req, n)

    def _admit(self, req: Request, logits: torch.Tensor) -> None:
        """Give req's choices their first tokens from the prompt's logits (1, V) and rows of the batch."""
        self.prefix.put(req.prompt, *self._scratch.row_kv(0, len(req.prompt)))
        seqs = self._first_tokens(req, logits)
        if seqs:
            self._cache.add(self._scratch, len(seqs))
            self._rows += seqs

    def _first_tokens(self, req: Request, logits: torch.Tensor) -> list[Sequence]:
        """req's choices, each with its first token drawn from the prompt's logits (1, V); those not finished."""
        seqs = [Sequence(req, i, self.tok.decode, self.tok.vocab_size, self.device) for i in range(req.n)]
        logits = logits.expand(len(seqs), -1)  # shared by the choices
        first = self._draw(logits, seqs)
        return [s for s, t, lp in zip(seqs, first, self._logprobs(logits, seqs, first)) if not s.take(t, lp)]

    def _score_step(self) -> None:
        """Score the next prompts of the first scoring job, as many as fit one forward of score_tokens tokens.
        A failure ends that job (its scores and its generations) alone."""
        if not self._scoring or (self._next is not None and not self._scoring[0].done):  # one begun is finished
            return
        job = self._scoring[0]
        take = self._next_prompts(job)
        try:
            # with_next: a one-token prompt has nothing to score but still has logits to draw from
            scored = score(self.model, [job.prompts[i] for i in take], vocab_size=self.tok.vocab_size,
                           top_n=job.top_n, with_next=True, max_batch_tokens=None)
            for i, sc in zip(take, scored):
                job.emit(i, sc)
                gen = job.then[i] if i < len(job.then) else None
                if gen is not None and gen.max_tokens == 1:
                    self._first_tokens(gen, sc.next_logits[None])
                elif gen is not None:
                    self._pending.append(gen)
        except Exception:
            log.exception("a scoring job failed in the batcher; ending it alone")
            self._scoring.pop(0)
            job.fail()
            return
        job.done += len(take)
        if job.done == len(job.prompts):
            self._scoring.pop(0)

    def _next_prompts(self, job: ScoreJob) -> list[int]:
        """The indices of job's next prompts whose rows x longest length fit score_tokens (at least one)."""
        take, longest = [job.done], len(job.prompts[job.done])
        for i in range(job.done + 1, len(job.prompts)):
            longest = max(longest, len(job.prompts[i]))
            if (len(take) + 1) * longest > self.score_tokens:
                break
            take.append(i)
        return take

    def _decode_step(self) -> None:
        idx = torch.tensor([[s.last] for s in self._rows], device=self.device)  # (B, 1)
        try:
            logits = step(self.model, idx, self._cache)  # (B, V), as `stream` steps (single-threaded for few rows)
        except Exception:  # one forward for every row: no one request to blame, so every row ends
            log.exception("the batch's decode step failed; ending the requests in it")
            self._fail_rows()
            return
        tokens = self._sample(logits)
        logprobs = self._logprobs(logits, self._rows, tokens)
        for s, t, lp in zip(self._rows, tokens, logprobs):
            if t is not None and not s.req.cancelled.is_set():
                try:
                    s.finished = s.take(t, lp)
                except Exception:
                    self._fail(s.req, "while decoding its text")
        # descending, so the last row that _free_row moves into a freed place is never one still to free
        for b in reversed(range(len(self._rows))):
            s = self._rows[b]
            if s.finished and not s.req.cancelled.is_set():
                self._keep_prefix(b)
            if s.finished or s.req.cancelled.is_set():
                self._free_row(b)

    def _keep_prefix(self, b: int) -> None:
        """Row b's prompt and reply, as far as its cache holds them (the last token drawn was never fed), go
        into the prefix cache: the conversation's next turn starts with them."""
        if not self.prefix.max_bytes:
            return
        s, n = self._rows[b], self._cache.lengths[b]
        self.prefix.put(s.req.prompt + s.ids[:n - len(s.req.prompt)], *self._cache.row_kv(b, n))

    def _sample(self, logits: torch.Tensor) -> list[Optional[int]]:
        """Every row's next token; if the batched draw fails, row by row, so only the failing rows' requests
        end (their rows get None)."""
        try:
            return self._draw(logits, self._rows)
        except Exception:  # rows drawn before the failure drew again below: a rare failure may change their text
            pass
        tokens: list[Optional[int]] = []
        for b, s in enumerate(self._rows):
            try:
                tokens.append(None if s.req.cancelled.is_set() else
                              self._draw(logits[b:b + 1], [s])[0])
            except Exception:
                self._fail(s.req, "while sampling its next token")
                tokens.append(None)
        return tokens

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """The next token of each of `seqs` from its row of logits (B, V), each from its own generator."""
        return sample_rows(logits, [s.req.params for s in seqs], [s.generator for s in seqs], self.tok.vocab_size)

    def _logprobs(self, logits: torch.Tensor, seqs: list[Sequence],
                  tokens: list[Optional[int]]) -> list[Optional[TokenLogprob]]:
        """The logprob entry of each drawn token whose request asks for them (None for the others): one
        log-softmax over those rows of the raw logits (B, V). If it fails, those requests end, the rest go on."""
        out: list[Optional[TokenLogprob]] = [None] * len(seqs)
        rows = [b for b, (s, t) in enumerate(zip(seqs, tokens)) if s.req.logprobs is not None and t is not None]
        if not rows:
            return out
        try:
            top_n = max(seqs[b].req.logprobs for b in rows)
            chosen, _, tops = rank_tokens(logits[rows], [tokens[b] for b in rows], self.tok.vocab_size, top_n)
            for b, lp, top in zip(rows, chosen, tops):
                out[b] = TokenLogprob(tokens[b], lp, top[:seqs[b].req.logprobs])
        except Exception:
            for req in {id(seqs[b].req): seqs[b].req for b in rows}.values():
                self._fail(req, "while computing its logprobs")
        return out

    @staticmethod
    def _end_with_error(req: Request) -> None:
        """An error event for each of req's choices; cancelled, so its rows leave the batch at the next step."""
        req.cancel()
        for i in range(req.n):
            req.emit(Event(i, "", "error", 0))

    def _fail(self, req: Request, when: str) -> None:
        """End `req` alone (call it from an except block: the traceback goes to the log)."""
        log.exception("a request failed in the batcher %s; ending it alone", when)
        self._end_with_error(req)

    def _fail_rows(self) -> None:
        """End every request in the batch (not those still waiting) and empty it."""
        reqs = {id(s.req): s.req for s in self._rows}
        self._rows = []
        self._cache.clear()
        for r in reqs.values():
            self._end_with_error(r)

    def _fail_all(self) -> None:
        reqs = {id(s.req): s.req for s in self._rows}
        reqs.update({id(r): r for r in self._pending})
        if self._prefilling:
            reqs[id(self._prefilling[0])] = self._prefilling[0]
        jobs, self._scoring = self._scoring, []
        self._rows, self._pending, self._prefilling = [], [], None
        self._cache.clear()
        for r in reqs.values():
            self._end_with_error(r)
        for job in jobs:
            job.fail()
