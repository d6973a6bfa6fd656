"""The HTTP routes of `gptforge serve`: OpenAI's chat completions, completions and models, /health, the web page.

The routes only parse, check limits, tokenize and format: generation happens on the batcher's thread
(gptforge.serve.batcher), which sends each choice's text back through an asyncio queue, so the event loop never
waits on the model and /health answers at once during generation. Every error a client can cause is a JSON
`{"error": {...}}` in OpenAI's shape with a 4xx status (validation errors are 400, not FastAPI's 422); an
unexpected failure is a 500 with no traceback in the body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from gptforge.chat_template import render_conversation
from gptforge.errors import UserError, one_line
from gptforge.infer.scoring import Scored, TokenLogprob
from gptforge.serve.batcher import Batcher, Event, QueueFull, ScoreJob
from gptforge.serve.batcher import Request as BatchRequest
from gptforge.serve.follow import Served
from gptforge.serve.metrics import Metrics, Observed, Timing
from gptforge.serve.logprobs import Offsets, chat_logprobs, completion_logprobs
from gptforge.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SamplingFields,
                                     TokenizeRequest, error_body)

STATIC = Path(str(resources.files("gptforge") / "serve" / "static"))
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 411: "invalid_request_error", 429: "rate_limit_error"}


@dataclass
class Limits:
    context_length: int  # prompt + completion tokens, at most the model's block_size
    max_tokens: int = 1024  # the most tokens one choice may ask for (and the default when it does not say)
    max_request_bytes: int = 1 << 20  # request body size


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, ERROR_TYPES.get(self.status, "server_error"), self.param,
                                       self.code), status_code=self.status)


# ----------------------------------------------------------------------------------------------
# Building batcher requests from HTTP ones


def _fits(prompt_len: int, limits: Limits, prompt_param: str) -> None:
    if prompt_len > limits.context_length:
        raise ApiError(400, f"the prompt is {prompt_len} tokens; the model's context is {limits.context_length}: "
                            "send a shorter prompt", prompt_param, "context_length_exceeded")


def _max_tokens(asked: Optional[int], prompt_len: int, limits: Limits, prompt_param: str) -> int:
    room = limits.context_length - prompt_len
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_len} tokens; the model's context is {limits.context_length}, "
                            "which leaves no room for a reply: send a shorter prompt", prompt_param,
                       "context_length_exceeded")
    if asked is None:
        return min(room, limits.max_tokens)
    if asked > limits.max_tokens:
        raise ApiError(400, f"max_tokens is {asked}; this server allows at most {limits.max_tokens}",
                       "max_tokens", "max_tokens_too_large")
    if asked > room:
        raise ApiError(400, f"the prompt is {prompt_len} tokens and max_tokens {asked}; together they exceed the "
                            f"model's context of {limits.context_length}: ask for at most {room}", "max_tokens",
                       "context_length_exceeded")
    return asked


@dataclass
class Scores:
    """A scoring job's answer for one prompt (None: scoring failed)."""
    prompt: int
    scored: Optional[Scored]


@dataclass
class Work:
    """What one HTTP request asked of the batcher: `n` choices for each of its prompts (choice i * n + j is
    prompt i's choice j), the scores of `scored` prompts, all answered on one queue."""
    events: "asyncio.Queue[Event | Scores]"
    reqs: list[BatchRequest]
    job: Optional[ScoreJob] = None
    timing: Timing = field(default_factory=lambda: Timing(None, 0))

    @property
    def choices(self) -> int:
        return sum(r.n for r in self.reqs)

    @property
    def scored(self) -> int:
        return len(self.job.prompts) if self.job else 0

    @property
    def cached(self) -> int:
        """Prompt tokens the prefix cache held (known once each request has begun)."""
        return sum(r.cached_tokens for r in self.reqs)

    def observe(self, ev: "Event | Scores") -> None:
        """Time an answer for the metrics, as it leaves for the client."""
        if isinstance(ev, Event):
            self.timing.event(ev.index, ev.completion_tokens, ev.finish_reason)

    def cancel(self) -> None:
        """The client went away (or an answer failed): the batcher drops the rest; unfinished choices count as aborted."""
        for r in self.reqs:
            r.cancel()
        if self.job:
            self.job.cancel()
        m = self.timing.metrics
        if m:
            m.success.labels("abort").inc(max(0, self.choices - self.timing.finished))


# How long the batcher's thread may hold a stream's middle tokens before it wakes the event loop: each wake-up
# takes the GIL from the forward that is running (a tiny model's 0.60 ms decode step took 0.70 ms while an event
# loop woke once a step to do almost nothing, and 0.82 ms under the HTTP server's per-token work). Within this
# interval a step's tokens join the next wake-up or the loop's own sweep, so at most one wake-up per interval;
# a stream's first token, its last and every non-stream answer still wake the loop at once. 5 ms is well under what
# a reader sees, and longer than a step of any model where the hand-off mattered.
STREAM_INTERVAL_S = 0.005


class _Mailbox:
    """Answers from the batcher's thread to one event loop, in batches: an answer wakes the loop
    (call_soon_threadsafe writes to its self-pipe), the others posted before it runs join it, and the loop hands
    them all to their queues in one callback; answers that are not urgent (a stream's middle) wait up to
    STREAM_INTERVAL_S for the next wake-up or the loop's sweep. One wake-up per step or per interval instead of one
    per row and token: the loop and the batcher would otherwise contend for the GIL each time."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock, self.items = loop, threading.Lock(), []
        self.scheduled = self.sweeping = False  # a delivery is queued on the loop; a sweep is set on its clock
        self.woke = 0.0  # when the loop was last woken (time.monotonic)

    def post(self, queue: asyncio.Queue, item, urgent: bool = True) -> None:
        now = time.monotonic()
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled or (self.sweeping and not urgent and now - self.woke < STREAM_INTERVAL_S):
                return
            self.scheduled, self.woke = True, now
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
            arm = bool(items) and not self.sweeping
            self.sweeping |= arm
        self._hand_out(items, arm)

    def _sweep(self) -> None:
        """On the loop's clock, every interval while answers keep coming: what waited for a wake-up."""
        with self.lock:
            items, self.items, self.woke = self.items, [], time.monotonic()
            self.sweeping = bool(items)
        self._hand_out(items, bool(items))

    def _hand_out(self, items: list, arm: bool) -> None:
        if arm:
            self.loop.call_later(STREAM_INTERVAL_S, self._sweep)
        for queue, item in items:
            queue.put_nowait(item)


_MAILBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox]" = weakref.WeakKeyDictionary()


def _emitter(events: asyncio.Queue, shift=lambda ev: ev):
    """A callback for the batcher's thread that puts what it is given, shifted, on `events` in the event loop."""
    loop = asyncio.get_running_loop()
    box = _MAILBOXES.get(loop) or _MAILBOXES.setdefault(loop, _Mailbox(loop))

    def emit(*args) -> None:
        item = shift(*args)
        urgent = not isinstance(item, Event) or item.finish_reason is not None or item.completion_tokens <= 1
        box.post(events, item, urgent)
    return emit


def _submit_work(body: SamplingFields, prompts: list[list[int]], max_tokens: Optional[int], stop_ids: frozenset,
                 limits: Limits, batcher: Batcher, *, logprobs: Optional[int] = None,
                 score_top: Optional[int] = None, metrics: Optional[Metrics] = None) -> Work:
    """Queue each prompt's generation (none if max_tokens is 0) and, with `score_top` set, a scoring job for
    the prompts (top `score_top` per token) that answers the generations of max_tokens 1 from its forward."""
    if body.n > batcher.max_seqs:
        raise ApiError(400, f"n is {body.n}; this server decodes at most {batcher.max_seqs} sequences at once", "n")
    param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    try:
        params = body.sampling_params()
    except UserError as e:  # the fields' own validators have already said most of it
        raise ApiError(400, one_line(e), code="invalid_value") from None
    events: asyncio.Queue = asyncio.Queue()
    work = Work(events, [])
    for i, prompt in enumerate(prompts):
        if max_tokens == 0:
            _fits(len(prompt), limits, param)
            continue
        emit = _emitter(events, lambda ev, k=i * body.n: replace(ev, index=ev.index + k))
        work.reqs.append(BatchRequest(prompt, _max_tokens(max_tokens, len(prompt), limits, param), emit, n=body.n,
                                      params=params, stop_ids=stop_ids, logprobs=logprobs))
    if score_top is not None:
        work.job = ScoreJob(prompts, score_top, _emitter(events, Scores), then=work.reqs)
    try:
        if work.job or work.reqs:
            batcher.submit(*([work.job] if work.job else work.reqs))
    except QueueFull as e:
        raise ApiError(429, str(e), code="server_busy") from None
    work.timing = Timing(metrics, sum(map(len, prompts)))  # queued: from here on, it is timed and counted
    return work


def _chat_prompt(tok, body: ChatCompletionRequest) -> list[int]:
    if getattr(tok, "chat", None) is None:
        raise ApiError(400, "this model has no chat template (it was not fine-tuned on conversations): use "
                            "/v1/completions for plain text", "messages", "no_chat_template")
    messages = []
    for i, m in enumerate(body.messages):
        text = m.text()
        if text is None:
            raise ApiError(400, f"message {i + 1} has content this model cannot read (only text)", "messages")
        if tok.kind == "char":  # only a char vocabulary can lack a character (byte-level BPEs encode any text)
            _encode(tok, text, "messages", f"message {i + 1}: ")
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    try:
        return render_conversation(tok, messages, for_generation=True)[0]
    except UserError as e:
        raise ApiError(400, one_line(e), "messages") from None


def _encode(tok, text: str, param: str, where: str = "") -> list[int]:
    """tok.encode(text), or a 400 naming the character a char vocabulary lacks: there is no unknown token to
    map it to, and quietly dropping or changing the client's text would be worse."""
    try:
        return tok.encode(text)
    except UserError as e:
        raise ApiError(400, where + one_line(e), param, "unknown_character") from None


def _completion_prompts(tok, body: CompletionRequest) -> list[tuple[list[int], str]]:
    """Each prompt of the request as (token ids, text): a text, a list of texts, one list of ids or several."""
    p = body.prompt
    if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
        p = [p]
    elif not isinstance(p, list) or not p:
        p = [p or ""]
    return [_one_prompt(tok, x, f"prompt {i + 1}: " if len(p) > 1 else "") for i, x in enumerate(p)]


def _one_prompt(tok, p, where: str) -> tuple[list[int], str]:
    if isinstance(p, list):
        if not p:
            raise ApiError(400, f"{where}the prompt's token ids are an empty list", "prompt")
        if any(not 0 <= x < tok.vocab_size for x in p):
            raise ApiError(400, f"{where}prompt token ids must be in [0, {tok.vocab_size})", "prompt")
        return list(p), tok.decode(p)
    ids = _encode(tok, p, "prompt", where)
    if not ids:
        if tok.eot_id is None:
            raise ApiError(400, f"{where}the prompt is empty; give some text to continue", "prompt")
        ids = [tok.eot_id]  # an empty prompt starts a fresh document, as in `gptforge sample`
    return ids, p


# ----------------------------------------------------------------------------------------------
# Responses


def _usage(work: "Work", prompt_len: int, tokens: list[int]) -> dict[str, Any]:
    """OpenAI's usage; prompt_tokens_details.cached_tokens: prompt tokens the prefix cache held (not prefilled)."""
    return {"prompt_tokens": prompt_len, "completion_tokens": sum(tokens), "total_tokens": prompt_len + sum(tokens),
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in work.reqs)}}


@dataclass
class Collected:
    """Every choice's text, finish reason, generated tokens and their logprob entries; every prompt's scores."""
    texts: list[str]
    reasons: list[Optional[str]]
    tokens: list[int]
    logprobs: list[list[TokenLogprob]]
    scores: dict[int, Scored]


def _take(got: Collected, ev: "Event | Scores") -> None:
    """Account for one answer from the batcher; an ApiError if it reports a failure."""
    if isinstance(ev, Scores):
        if ev.scored is None:
            raise ApiError(500, "the model failed while scoring this prompt", code="engine_error")
        got.scores[ev.prompt] = ev.scored
        return
    if ev.finish_reason == "error":
        raise ApiError(500, "the model failed while generating this reply", code="engine_error")
    got.texts[ev.index] += ev.text
    got.tokens[ev.index] = max(got.tokens[ev.index], ev.completion_tokens)
    got.logprobs[ev.index] += ev.logprobs
    got.reasons[ev.index] = ev.finish_reason or got.reasons[ev.index]


async def _collect(work: Work, choices: int, http: Request) -> Collected:
    """Wait for all of `work`; cancels it if the client goes away. Choices with no generation (max_tokens 0)
    end with "length"."""
    got = Collected([""] * choices, [None] * work.choices + ["length"] * (choices - work.choices),
                    [0] * choices, [[] for _ in range(choices)], {})
    try:
        while any(r is None for r in got.reasons) or len(got.scores) < work.scored:
            try:
                ev = await asyncio.wait_for(work.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    raise asyncio.CancelledError from None
                continue
            work.observe(ev)
            _take(got, ev)
    finally:
        if any(r is None for r in got.reasons) or len(got.scores) < work.scored:
            work.cancel()
    return got


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Chunks:
    """The SSE text of a stream's chunks: the head (id, object, created, model) is encoded once per stream, and
    each chunk encodes only its choice; the text is what json.dumps of the whole chunk would give."""

    def __init__(self, head: dict, include_usage: bool):
        self.pre = "data: " + json.dumps(head, ensure_ascii=False)[:-1] + ', "choices": ['
        self.post = "]" + (', "usage": null' if include_usage else "") + "}\n\n"

    def __call__(self, choice: dict) -> str:
        return self.pre + json.dumps(choice, ensure_ascii=False) + self.post


async def _answers(work: Work) -> list:
    """The batcher's next answers for `work`: one, waited for, and every other already queued behind it. When the
    event loop falls behind the decode (many streams, busy cores) a stream sends what piled up in one write."""
    got = [await work.events.get()]
    while not work.events.empty():
        got.append(work.events.get_nowait())
    return got


def _merged(answers: list) -> list:
    """`answers` with each run of one choice's consecutive text events (without log-probabilities) as one event:
    the same text in fewer chunks, for the server to encode and the client to parse."""
    out = []
    for ev in answers:
        prev = out[-1] if out else None
        if (isinstance(ev, Event) and isinstance(prev, Event) and prev.index == ev.index and prev.finish_reason is None
                and not prev.logprobs and not ev.logprobs):
            out[-1] = replace(ev, text=prev.text + ev.text)
        else:
            out.append(ev)
    return out


async def _stream(work: Work, prompt_len: int, include_usage: bool, head: dict, chunks,
                  first: Optional[list[dict]]) -> AsyncIterator[str]:
    """Server-sent events: `first` chunks (the role, or an echoed prompt), then for each answer of the batcher
    the chunks `chunks(answer)` makes of it, the usage chunk if asked, then [DONE]. A client that disconnects
    closes this generator, which cancels the work: the batcher frees its rows at its next step."""
    sse = _Chunks(head, include_usage)
    left, scores = work.choices, work.scored
    tokens = [0] * max(work.choices, 1)
    try:
        if first:
            yield "".join(map(sse, first))
        while left or scores:
            out = []
            answers = await _answers(work)
            for ev in answers:
                work.observe(ev)
            for ev in _merged(answers):
                if isinstance(ev, Scores) and ev.scored is None or isinstance(ev, Event) and ev.finish_reason == "error":
                    yield "".join(out) + _sse(error_body("the model failed while answering this request",
                                                         "server_error", code="engine_error"))
                    return
                if isinstance(ev, Scores):
                    scores -= 1
                else:
                    tokens[ev.index] = max(tokens[ev.index], ev.completion_tokens)
                    left -= bool(ev.finish_reason)
                out += map(sse, chunks(ev))
            if out:
                yield "".join(out)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(work, prompt_len, tokens)})
        yield "data: [DONE]\n\n"
    finally:
        if left or scores:
            work.cancel()


def _log_tokens(http: Request, work: Work, prompt_len: int) -> None:
    """The access log's token counts for this request, read once its reply has gone (a stream's too)."""
    http.state.tokens = lambda: (prompt_len, work.cached, work.timing.generated)


def _streaming(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ----------------------------------------------------------------------------------------------
# The app


def create_app(batcher: Batcher, tokenizer, served: "Served | str", limits: Limits, *, api_key: Optional[str] = None,
               cors: Optional[list[str]] = None) -> FastAPI:
    """The app for `batcher` (started) and the model `served` describes (a name: nothing more is known of it)."""
    app = FastAPI(title="gptforge", docs_url=None, redoc_url=None, openapi_url=None)
    served = Served(served) if isinstance(served, str) else served
    model_name, created = served.name, int(time.time())
    metrics = app.state.metrics = Metrics(batcher, served)
    app.state.served = served
    _install_error_handlers(app)
    app.add_middleware(_BodyLimit, limit=limits.max_request_bytes)
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Observed, metrics=metrics)  # added last: outermost, so it sees every request

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "a valid API key is required: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def open_for_work() -> None:
        if served.draining:
            raise ApiError(503, "the server is shutting down: it finishes the requests it has and takes no new ones",
                           code="shutting_down")

    auth = [Depends(check_key)]
    work_auth = [Depends(check_key), Depends(open_for_work)]

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: the same headers, no body (uvicorn drops it)
    async def health():
        p = batcher.prefix
        return {"status": "draining" if served.draining else "ok", "model": model_name, "step": served.step,
                "follow": served.follow, "context_length": limits.context_length, "running": batcher.active,
                "waiting": batcher.waiting, "max_seqs": batcher.max_seqs, "max_queue": batcher.max_queue,
                "prefix_cache": {"entries": len(p), "bytes": p.nbytes, "max_bytes": p.max_bytes}}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/run", dependencies=auth)
    async def run_info():
        if served.curve is not None:
            await asyncio.to_thread(served.curve.refresh)  # a long metrics.jsonl is read off the event loop
        return served.run_info()

    @app.api_route("/v1/models", methods=["GET", "HEAD"], dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "gptforge", "max_model_len": limits.context_length}]}

    @app.post("/v1/chat/completions", dependencies=work_auth)
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        prompt = _chat_prompt(tokenizer, body)
        stop_ids = tokenizer.chat.stop_ids(tokenizer.eot_id)
        work = _submit_work(body, [prompt], body.max_completion_tokens or body.max_tokens, stop_ids, limits,
                            batcher, logprobs=body.logprobs_top, metrics=metrics)
        _log_tokens(http, work, len(prompt))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        def logprobs(entries: list[TokenLogprob]) -> Optional[dict]:
            return chat_logprobs(tokenizer, entries) if body.logprobs else None

        if body.stream:
            def chunks(ev: Event) -> list[dict]:
                out = []
                if ev.text or ev.logprobs:
                    out.append({"index": ev.index, "delta": {"content": ev.text}, "logprobs": logprobs(ev.logprobs),
                                "finish_reason": None})
                if ev.finish_reason:
                    out.append({"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason})
                return out
            first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(body.n)]
            return _streaming(_stream(work, len(prompt), body.include_usage,
                                      {**head, "object": "chat.completion.chunk"}, chunks, first))
        got = await _collect(work, body.n, http)
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": logprobs(lp),
                    "finish_reason": r} for i, (t, r, lp) in enumerate(zip(got.texts, got.reasons, got.logprobs))]
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(work, len(prompt), got.tokens)}

    @app.post("/v1/completions", dependencies=work_auth)
    async def completions(body: CompletionRequest, http: Request):
        prompts = _completion_prompts(tokenizer, body)
        stop_ids = frozenset({tokenizer.eot_id} if tokenizer.eot_id is not None else ())
        scoring = body.echo and body.logprobs is not None  # the prompt's own logprobs: a scoring job
        work = _submit_work(body, [ids for ids, _ in prompts], body.max_tokens, stop_ids, limits, batcher,
                            logprobs=body.logprobs, score_top=body.logprobs if scoring else None, metrics=metrics)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        shape = _Completions(tokenizer, body, [text for _, text in prompts], scoring)
        prompt_len = sum(len(ids) for ids, _ in prompts)
        _log_tokens(http, work, prompt_len)
        if body.stream:
            return _streaming(_stream(work, prompt_len, body.include_usage, head, shape.chunks, shape.first()))
        got = await _collect(work, shape.choices, http)
        return {**head, "choices": shape.whole(got), "usage": _usage(work, prompt_len, got.tokens)}

    _add_tokenizer_routes(app, tokenizer, limits, auth)
    _add_page(app)
    return app


class _Completions:
    """The choices of a completions response, whole or as stream chunks: choice c answers prompt c // n,
    starts with that prompt's text when echoed, and carries logprobs when asked (the prompt's, from its
    scores, when echoed), their text offsets counted over the choice's text."""

    def __init__(self, tok, body: CompletionRequest, texts: list[str], scoring: bool):
        self.tok, self.n, self.scoring, self.top = tok, body.n, scoring, body.logprobs
        self.echo = texts if body.echo else [""] * len(texts)
        self.score_only = body.max_tokens == 0
        self.choices = len(texts) * body.n
        self.offsets = [Offsets() for _ in range(self.choices)]

    def _logprobs(self, c: int, entries: list[TokenLogprob]) -> Optional[dict]:
        return None if self.top is None else completion_logprobs(self.tok, entries, self.offsets[c])

    def _choice(self, c: int, text: str, logprobs: Optional[dict] = None, reason: Optional[str] = None) -> dict:
        return {"index": c, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def _ends(self, cs) -> list[dict]:
        return [self._choice(c, "", reason="length") for c in cs] if self.score_only else []

    def whole(self, got: Collected) -> list[dict]:
        out = []
        for c in range(self.choices):
            entries = (got.scores[c // self.n].entries() if self.scoring else []) + got.logprobs[c]
            out.append(self._choice(c, self.echo[c // self.n] + got.texts[c], self._logprobs(c, entries),
                                    got.reasons[c]))
        return out

    def first(self) -> Optional[list[dict]]:
        """The echoed prompts when there are no scores to wait for (and their ends, when nothing follows)."""
        if self.scoring or not any(self.echo):
            return None
        cs = range(self.choices)
        return [self._choice(c, self.echo[c // self.n]) for c in cs] + self._ends(cs)

    def chunks(self, ev: "Event | Scores") -> list[dict]:
        if isinstance(ev, Scores):
            cs = range(ev.prompt * self.n, (ev.prompt + 1) * self.n)
            return [self._choice(c, self.echo[ev.prompt], self._logprobs(c, ev.scored.entries()))
                    for c in cs] + self._ends(cs)
        out = []
        if ev.text or ev.logprobs:
            out.append(self._choice(ev.index, ev.text, self._logprobs(ev.index, ev.logprobs)))
        if ev.finish_reason:
            out.append(self._choice(ev.index, "", reason=ev.finish_reason))
        return out


def _add_tokenizer_routes(app: FastAPI, tok, limits: Limits, auth: list) -> None:
    """vLLM's /tokenizer_info, /tokenize and /detokenize: what lets a client that sends token ids (such as
    lm-evaluation-harness's local-completions) use the served model's own tokenizer, whatever its kind.
    /tokenize reads the text of a special token (end-of-text, the chat markers) as that token, as vLLM's
    (Hugging Face tokenizers') does; the completion routes read every prompt as plain text."""
    specials = {tok.piece(i).decode("utf-8"): i for i in sorted(tok.special_ids())}
    split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")") \
        if specials else None

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info():
        eos = tok.piece(tok.eot_id).decode("utf-8") if tok.eot_id is not None else None
        return {"tokenizer_class": f"gptforge-{tok.kind}", "eos_token": eos, "bos_token": None, "pad_token": None,
                "chat_template": None, "vocab_size": tok.vocab_size, "model_max_length": limits.context_length}

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest):
        parts = split.split(body.prompt) if split else [body.prompt]
        ids = [i for k, part in enumerate(parts) if part
               for i in ([specials[part]] if k % 2 else _encode(tok, part, "prompt"))]
        return {"tokens": ids, "count": len(ids), "max_model_len": limits.context_length}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest):
        if any(not 0 <= i < tok.vocab_size for i in body.tokens):
            raise ApiError(400, f"token ids must be in [0, {tok.vocab_size})", "tokens")
        return {"prompt": tok.decode(body.tokens)}


def _add_page(app: FastAPI) -> None:
    """The web page at / and its files beside it (index.html links them relatively); nothing else is served."""
    files = {p.name for p in STATIC.iterdir() if p.is_file()} if STATIC.is_dir() else set()

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        if "index.html" not in files:
            raise ApiError(404, "this installation has no web page")
        return FileResponse(STATIC / "index.html")

    @app.api_route("/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def static_file(name: str):
        if name not in files:
            raise ApiError(404, f"no such page: /{name}")
        return FileResponse(STATIC / name)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        e = errors[0] if errors else {}
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            return ApiError(400, "the request body is not valid JSON", code="invalid_json").response()
        if e.get("type") == "model_attributes_type" and not loc:  # FastAPI reads JSON only when the type says so
            return ApiError(400, "the request body must be a JSON object, sent with 'Content-Type: application/json'",
                            code="invalid_json").response()
        where = ".".join(loc)
        said = str(e.get("msg", "invalid value")).removeprefix("Value error, ")  # pydantic's prefix for ours
        msg = said if not where or said.startswith(f"{where} ") else f"{where}: {said}"
        return ApiError(400, msg, where or None, "invalid_value").response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = {404: "no such route", 405: "method not allowed here"}.get(exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, f"{message}: {request.method} {request.url.path}").response()

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


class _BodyLimit:
    """Refuses request bodies over `limit` bytes before they are read (and bodies of unknown length)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            status, msg = None, None
            if length is None and b"chunked" in headers.get(b"transfer-encoding", b""):
                status, msg = 411, "send the request with a Content-Length"
            elif length is not None and (not length.isdigit() or int(length) > self.limit):
                status, msg = 400, f"the request body is over this server's limit of {self.limit:,} bytes"
            if status is not None:
                await ApiError(status, msg, code="request_too_large").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
